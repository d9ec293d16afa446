"""`mlx-xglm eval`: lm-evaluation-harness tasks on an XGLM model, with lm-eval's own flags and files."""

from __future__ import annotations

import argparse

from mlx_xglm import XGLMError

from .options import add_adapter_arg, add_model_args, help_formatter, load_model
from .scoring_options import LAUNCH_NOTE, quiet_renderer, start_group

EXAMPLES = (
    """\
examples:
  mlx-xglm eval --model facebook/xglm-564M --tasks xcopa,xstorycloze --output-path results
  mlx-xglm eval --model ./xglm-564M --tasks xwinograd --num-fewshot 5 --newlines eos --log-samples \\
      --output-path results
  mlx-xglm eval --model ./tiny --tasks my_task --include-path ./tasks --limit 10

lm-eval writes results_<date>.json (and samples_<task>_<date>.jsonl with --log-samples) under
OUTPUT_PATH/<model name>/, then the table is printed.
"""
    + LAUNCH_NOTE % ("eval", "eval")
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks (xcopa, xstorycloze, xwinograd, xnli, paws-x, ...)",
        description="Evaluate an XGLM model on lm-evaluation-harness tasks with the mlx-xglm backend; "
        "results equal `lm_eval --model hf` on the same checkpoint.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    add_model_args(parser)
    add_adapter_arg(parser)
    parser.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAML files")
    parser.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per prompt")
    parser.add_argument(
        "--limit", type=float, metavar="N", help="documents per task (a fraction below 1: that share of them)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="continuations per forward pass (default: 16)"
    )
    parser.add_argument("--output-path", metavar="DIR", help="write lm-eval's results JSON here")
    parser.add_argument(
        "--log-samples", action="store_true", help="also write every document's requests and responses"
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="lm-eval's random, numpy, torch and few-shot seeds"
    )
    parser.add_argument(
        "--newlines",
        choices=["space", "eos"],
        default="space",
        help="space: a newline is a space, as lm-eval's hf backend (default); eos: every newline, few-shot "
        "separators included, is </s>, as in XGLM's training text",
    )
    parser.set_defaults(run=run, usage_error=parser.error)


def run(args: argparse.Namespace) -> int:
    group = start_group()
    if args.log_samples and not args.output_path:
        raise XGLMError("--log-samples needs --output-path, where the samples are written")
    from lm_eval.utils import make_table

    from mlx_xglm.evaluation.harness import XGLMEvalModel
    from mlx_xglm.evaluation.tasks import check_options, evaluate, resolve_tasks, task_manager

    tasks = args.tasks.split(",")
    # Unknown tasks, a missing include path, bad numbers and an unwritable output fail before the model loads.
    resolve_tasks(task_manager(args.include_path), tasks)
    check_options(args.num_fewshot, args.limit, args.output_path, group)
    model, tokenizer, _ = load_model(
        args.model, args.revision, quiet_renderer(group).spinner, args.adapter_path
    )
    lm = XGLMEvalModel(
        pretrained=args.model,
        model=model,
        tokenizer=tokenizer,
        adapter_path=args.adapter_path,
        batch_size=args.batch_size,
        newlines=args.newlines,
        seed=args.seed if args.seed is not None else 1234,
        group=group,
    )
    results = evaluate(
        lm,
        tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        output_path=args.output_path,
        log_samples=args.log_samples,
        seed=args.seed,
        group=group,
    )
    if group.rank() == 0:
        print(
            f"mlx-xglm (pretrained={args.model}, newlines={args.newlines}), limit: {args.limit}, "
            f"num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}"
        )
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
    return 0
