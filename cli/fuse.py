"""`mlx-xglm fuse`: merge a LoRA adapter into its base model and write a plain checkpoint folder."""

from __future__ import annotations

import argparse

from mlx_xglm.tuning import fuse

from .options import help_formatter

EXAMPLES = """\
examples:
  mlx-xglm fuse --model ./xglm-564M --adapter-path adapters --save-path xglm-564M-tuned
  mlx-xglm fuse --model ./xglm-564M-4bit --adapter-path adapters --save-path tuned-4bit
  mlx-xglm fuse --model ./xglm-564M-4bit --adapter-path adapters --save-path tuned-fp16 --de-quantize

A float result loads with transformers' XGLMForCausalLM.from_pretrained as well as with mlx-xglm. A
quantized base stays quantized, its merged layers quantized again, unless --de-quantize is given.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fuse",
        help="merge a LoRA adapter into its base model",
        description="Merge a LoRA adapter (PEFT format) into its base model and save the result.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    parser.add_argument(
        "--model", required=True, metavar="PATH", help="base checkpoint folder or Hub repo id"
    )
    parser.add_argument("--revision", metavar="REF", help="Hub branch, tag, commit or PR ref of --model")
    parser.add_argument(
        "--adapter-path", default="adapters", metavar="DIR", help="the adapter folder (default: adapters)"
    )
    parser.add_argument(
        "--save-path",
        default="fused_model",
        metavar="DIR",
        help="output folder, must not exist (default: fused_model)",
    )
    parser.add_argument(
        "--de-quantize",
        "--dequantize",
        dest="dequantize",
        action="store_true",
        help="write a quantized base in floating point",
    )
    parser.add_argument("--upload-repo", metavar="REPO", help="Hub repository to upload the fused folder to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = fuse(
        args.model,
        args.adapter_path,
        args.save_path,
        dequantize=args.dequantize,
        upload_repo=args.upload_repo,
        revision=args.revision,
    )
    print(f"Fused {args.adapter_path} into {args.model}: {path}")
    return 0
