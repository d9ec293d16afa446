"""Flags shared by the subcommands, and turning them into the Python API's objects."""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from huggingface_hub.errors import LocalEntryNotFoundError

from mlx_xglm import XGLMError, load, make_logits_processors, make_sampler, sharded_load
from mlx_xglm.checkpoints.hub import resolve_model_path
from mlx_xglm.decoding.cache import check_kv_bits
from mlx_xglm.decoding.prefix_cache import DEFAULT_PROMPT_CACHE_SIZE
from mlx_xglm.decoding.speculative import check_draft_model

DEFAULT_MODEL = "facebook/xglm-564M"


def unescape(text: str) -> str:
    r"""Read a typed `\n` or `\t` as a newline or tab, as mlx-lm does for its --prompt."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """Keep the line breaks of the examples in each parser's epilog."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PATH",
        help=f"checkpoint folder or Hub repo id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--revision", metavar="REF", help="Hub branch, tag, commit or PR ref such as refs/pr/4"
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        metavar="N",
        default=max_tokens,
        help=f"tokens to generate (default: {max_tokens})",
    )
    group.add_argument(
        "--temp", type=float, metavar="T", default=0.0, help="temperature; 0 picks the likeliest token"
    )
    group.add_argument(
        "--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling mass (default: 1.0, off)"
    )
    group.add_argument(
        "--top-k", type=int, metavar="K", default=0, help="keep the k likeliest tokens (default: 0, off)"
    )
    group.add_argument(
        "--min-p", type=float, metavar="P", default=0.0, help="drop tokens below min-p x the top one"
    )
    group.add_argument(
        "--seed", type=int, metavar="N", default=None, help="random seed, for reproducible sampling"
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help="penalty > 1 for recently used tokens",
    )
    group.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        metavar="N",
        help="keep only the last N positions in the KV cache (bounded memory for long runs)",
    )


def non_negative(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_prompt_cache_args(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's --prompt-cache-size and --prompt-cache-bytes: the bounds of the prefix cache."""
    parser.add_argument(
        "--prompt-cache-size",
        type=non_negative,
        default=DEFAULT_PROMPT_CACHE_SIZE,
        metavar="N",
        help="keep the KV caches of up to N token sequences; a prompt that starts like one reads only the "
        f"rest (0: off; default: {DEFAULT_PROMPT_CACHE_SIZE})",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=non_negative,
        default=None,
        metavar="B",
        help="and at most B bytes of them (0: off; default: no bound)",
    )


def add_kv_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV cache (mlx-lm's flags)")
    group.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        metavar="B",
        help="quantize the KV cache to B bits (default: off)",
    )
    group.add_argument(
        "--kv-group-size",
        type=int,
        default=64,
        metavar="N",
        help="values per quantization scale (default: 64)",
    )
    group.add_argument(
        "--quantized-kv-start",
        type=int,
        default=5000,
        metavar="N",
        help="with --kv-bits, quantize once the cache holds more than N positions (default: 5000)",
    )


def kv_cache_from(args: argparse.Namespace) -> dict:
    """`kv_bits`, `kv_group_size` and `quantized_kv_start` for stream_generate (empty without --kv-bits)."""
    if args.kv_bits is None:
        return {}
    check_kv_bits(args.kv_bits, args.kv_group_size, args.quantized_kv_start, args.max_kv_size)
    return {
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "quantized_kv_start": args.quantized_kv_start,
    }


def check_seed(seed: int | None) -> None:
    """Refuse a --seed that MLX's generator cannot take (it needs 0 to 2**64 - 1)."""
    if seed is not None and not 0 <= seed < 2**64:
        raise XGLMError(f"--seed must be from 0 to 2**64 - 1 (18446744073709551615), got {seed}")


def check_utf8(text: str, flag: str) -> str:
    """`text` from the command line, refused with an XGLMError naming `flag` when its bytes were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise XGLMError(f"{flag} is not UTF-8 text (byte {e.start}); pass UTF-8 or use a file") from None
    return text


def sampling_from(args: argparse.Namespace) -> dict:
    """`sampler` and `logits_processors` for stream_generate, built (and checked) before the model loads."""
    check_seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    processors = make_logits_processors(repetition_penalty=args.repetition_penalty)
    return {"sampler": sampler, "logits_processors": processors}


def seed_from(args: argparse.Namespace) -> None:
    """Seed MLX's generator with --seed; call it after loading, which draws random initial weights."""
    if args.seed is not None:
        mx.random.seed(args.seed)


def add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter-path",
        metavar="DIR",
        help="apply this LoRA adapter (PEFT format: ours from `mlx-xglm lora`, or peft's) to the model",
    )


def load_model(
    name: str,
    revision: str | None,
    spinner,
    adapter_path: str | None = None,
    group=None,
    pipeline: bool = False,
) -> tuple:
    """`(model, tokenizer, seconds)` for `--model NAME --revision REF` (and `--adapter-path DIR`),
    showing a spinner while it loads; split over `group` under mlx.launch (`pipeline`: by layers).

    A Hub repo id that is not in the local cache while offline gets a hint to pass a local folder.
    """
    start = time.perf_counter()
    # Outside the spinner: a download draws its own progress bar (mlx_xglm.checkpoints.hub).
    try:
        path = resolve_model_path(name, revision)
    except XGLMError as e:
        if isinstance(e.__context__, LocalEntryNotFoundError):
            raise XGLMError(f"{e} (--model PATH)") from None
        raise
    with spinner(f"Loading {name}"):
        if group is not None and group.size() > 1:
            groups = {"pipeline_group" if pipeline else "tensor_group": group}
            model, tokenizer = sharded_load(path, adapter_path=adapter_path, **groups)
        else:
            model, tokenizer = load(path, adapter_path=adapter_path)
    return model, tokenizer, time.perf_counter() - start


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--draft-model",
        metavar="PATH_OR_REPO",
        help="a smaller XGLM with the same tokenizer (e.g. facebook/xglm-564M) that proposes tokens for "
        "--model to check: the same output, faster when most proposals are kept",
    )
    group.add_argument(
        "--num-draft-tokens", type=int, default=3, metavar="N", help="tokens proposed per step (default: 3)"
    )
    group.add_argument(
        "--prompt-lookup-tokens",
        type=int,
        metavar="N",
        help="no draft model: propose up to N tokens copied from where the last tokens occurred earlier in "
        "the prompt or the text so far (the same output, faster when the text copies its prompt)",
    )


def load_draft(args: argparse.Namespace, model, tokenizer, spinner) -> dict:
    """`draft_model` and `num_draft_tokens` for stream_generate from --draft-model, or
    `prompt_lookup_num_tokens` from --prompt-lookup-tokens (empty without either)."""
    lookup = args.prompt_lookup_tokens
    if lookup is not None:
        if args.draft_model is not None:
            raise XGLMError("give --draft-model or --prompt-lookup-tokens, not both")
        if lookup < 1:
            raise XGLMError(f"--prompt-lookup-tokens must be 1 or more, got {lookup}")
        if args.max_kv_size is not None:
            raise XGLMError(
                "--prompt-lookup-tokens cannot take --max-kv-size (rejected tokens are taken back)"
            )
        return {"prompt_lookup_num_tokens": lookup}
    if args.draft_model is None:
        return {}
    if args.kv_bits is not None:
        raise XGLMError("--draft-model cannot take --kv-bits (speculative decoding keeps float caches)")
    if args.num_draft_tokens < 1:
        raise XGLMError(f"--num-draft-tokens must be 1 or more, got {args.num_draft_tokens}")
    if args.max_kv_size is not None:
        raise XGLMError("--draft-model cannot take --max-kv-size (rejected tokens are taken back)")
    draft, draft_tokenizer, _ = load_model(args.draft_model, None, spinner)
    try:
        check_draft_model(model, draft, tokenizer, draft_tokenizer)
    except XGLMError as e:
        raise XGLMError(f"--draft-model {args.draft_model}: {e}") from None
    return {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens}
