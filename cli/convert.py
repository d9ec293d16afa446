"""`mlx-xglm convert`: the command-line face of `mlx_xglm.checkpoints.convert`, with mlx-lm's flags."""

from __future__ import annotations

import argparse

from mlx_xglm.checkpoints import DTYPES, convert
from mlx_xglm.checkpoints.quantize import MODES, RECIPES

EXAMPLES = """examples:
  mlx-xglm convert --hf-path facebook/xglm-564M --mlx-path xglm-564M-fp16
  mlx-xglm convert --hf-path facebook/xglm-564M -q --mlx-path xglm-564M-4bit
  mlx-xglm convert --hf-path facebook/xglm-564M -q --q-bits 8 --mlx-path xglm-564M-8bit
  mlx-xglm convert --hf-path facebook/xglm-564M -q --quant-predicate mixed_3_6 --mlx-path xglm-564M-3-6
  mlx-xglm convert --hf-path facebook/xglm-564M -q --embed-bits 8 --mlx-path xglm-564M-4bit-e8
  mlx-xglm convert --hf-path xglm-564M-4bit -d --mlx-path xglm-564M-dequantized
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Hub or PyTorch XGLM checkpoint to MLX, optionally quantized",
        description=(
            "Convert an XGLM checkpoint (a local folder or a Hub repo id; safetensors or pytorch_model.bin, "
            "read without torch) into an MLX folder, optionally quantized."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hf-path", "--model", required=True, help="local checkpoint folder or Hub repo id")
    parser.add_argument("--revision", help="Hub branch, tag, commit or PR ref such as refs/pr/4")
    parser.add_argument(
        "--mlx-path", default="mlx_model", help="output folder; must not exist yet (default: mlx_model)"
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, help="bits per weight: 2, 3, 4, 5, 6, 8 (default: 4)")
    parser.add_argument("--q-group-size", type=int, help="weights per scale: 32, 64, 128 (default: 64)")
    parser.add_argument(
        "--q-mode",
        choices=list(MODES),
        default="affine",
        help="quantization mode; mxfp4/mxfp8/nvfp4 fix their own bits and group size (default: affine)",
    )
    parser.add_argument(
        "--quant-predicate",
        choices=list(RECIPES),
        help="mixed recipe: low/high bits, high for the embedding and for v_proj and fc2 in key layers",
    )
    parser.add_argument(
        "--embed-bits", type=int, help="bits for the token embedding, which is also the LM head"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="floating-point type of the weights (default: the checkpoint's)"
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="turn a quantized MLX folder back into floats"
    )
    parser.add_argument("--upload-repo", help="Hub repository to upload the converted folder to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    convert(
        args.hf_path,
        mlx_path=args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode,
        quant_predicate=args.quant_predicate,
        dtype=args.dtype,
        dequantize=args.dequantize,
        upload_repo=args.upload_repo,
        revision=args.revision,
        embed_bits=args.embed_bits,
    )
    return 0
