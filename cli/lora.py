"""`mlx-xglm lora`: train a LoRA (or, on a quantized model, QLoRA) adapter, with mlx-lm's flags.

Flags, then a `-c config.yaml` (keys are the flag names with underscores), then the defaults, decide each
setting. The adapter is saved in PEFT's format; Ctrl-C saves the last one before leaving.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import mlx.core as mx

from mlx_xglm import XGLMError
from mlx_xglm.checkpoints.adapters import TARGETS, read_adapter_weights
from mlx_xglm.evaluation.perplexity import exp_nll
from mlx_xglm.outputs import check_writable
from mlx_xglm.tuning import (
    TrainingArgs,
    apply_lora,
    evaluate,
    load_dataset,
    lora_config,
    save_adapter,
    train,
    trainable_parameters,
)
from mlx_xglm.tuning.lora import check_lora_options, resume_adapter
from mlx_xglm.world import RankFailed, agree, world

from .options import DEFAULT_MODEL, help_formatter, load_model
from .progress import TrainingDisplay

EXAMPLES = """\
examples:
  mlx-xglm lora --model facebook/xglm-564M --train --data ./data --iters 600
  mlx-xglm lora --model ./xglm-564M-4bit --train --data ./data --mask-prompt --num-layers 8  # QLoRA
  mlx-xglm lora --model ./xglm-564M --train --data ./data --resume-adapter-file adapters
  mlx-xglm lora --model ./xglm-564M --test --data ./data --adapter-path adapters
  mlx-xglm lora -c lora.yaml
  mlx.launch --backend ring -n 2 -- mlx-xglm lora --model ./xglm-564M --train --data ./data --batch-size 8

Under mlx.launch the run is data parallel: --batch-size is the whole batch, split over the processes; the
adapter equals one process's, and rank 0 alone prints and writes it.

--data DIR holds train.jsonl and valid.jsonl (and test.jsonl for --test), one JSON object a line:
{"text": "..."} or {"prompt": "...", "completion": "..."}. The adapter (adapter_config.json and
adapter_model.safetensors in PEFT's format) loads in transformers + peft, in `mlx-xglm generate
--adapter-path`, and merges into the model with `mlx-xglm fuse`.
"""

DEFAULTS = {
    "model": DEFAULT_MODEL,
    "revision": None,
    "train": False,
    "data": None,
    "iters": 1000,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "num_layers": -1,
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.0,
    "target_modules": ",".join(TARGETS),
    "max_seq_length": 2048,
    "mask_prompt": False,
    "newlines": "space",
    "val_batches": 25,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "resume_adapter_file": None,
    "seed": 0,
    "grad_checkpoint": False,
    "adapter_path": "adapters",
    "test": False,
    "test_batches": 500,
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lora",
        help="fine-tune a LoRA adapter (QLoRA on quantized models)",
        description="Train a LoRA adapter on JSONL data, saved in PEFT's format.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
        argument_default=None,
    )
    flag = parser.add_argument
    flag("--model", metavar="PATH", help=f"checkpoint folder or Hub repo id (default: {DEFAULT_MODEL})")
    flag("--revision", metavar="REF", help="Hub branch, tag, commit or PR ref such as refs/pr/4")
    flag("--train", action="store_true", default=None, help="train an adapter")
    flag("--data", metavar="DIR", help="folder with train.jsonl, valid.jsonl and optionally test.jsonl")
    flag("--iters", type=int, metavar="N", help="training steps (default: 1000)")
    flag("--batch-size", type=int, metavar="N", help="rows per step (default: 4)")
    flag("--learning-rate", type=float, metavar="LR", help="Adam learning rate (default: 1e-4)")
    flag("--num-layers", type=int, metavar="K", help="adapt the last K layers; -1 all (default: -1)")
    flag("--rank", type=int, metavar="R", help="LoRA rank r (default: 8)")
    flag(
        "--alpha", type=float, metavar="A", help="LoRA alpha; the update is scaled by alpha / r (default: 16)"
    )
    flag("--dropout", type=float, metavar="P", help="dropout on the adapters' input (default: 0)")
    flag(
        "--target-modules",
        metavar="NAMES",
        help=f"comma-separated Linear names (default: {DEFAULTS['target_modules']})",
    )
    flag("--max-seq-length", type=int, metavar="N", help="truncate rows to N tokens (default: 2048)")
    flag("--mask-prompt", action="store_true", default=None, help="score only the completion of prompt rows")
    flag(
        "--newlines",
        choices=["space", "eos"],
        help="how data newlines are read, as in generate (default: space)",
    )
    flag("--val-batches", type=int, metavar="N", help="validation batches, -1 all, 0 none (default: 25)")
    flag("--steps-per-report", type=int, metavar="N", help="steps between training reports (default: 10)")
    flag("--steps-per-eval", type=int, metavar="N", help="steps between validations (default: 200)")
    flag("--save-every", type=int, metavar="N", help="steps between adapter saves (default: 100)")
    flag(
        "--resume-adapter-file", metavar="F", help="start from this adapter_model.safetensors (or its folder)"
    )
    flag(
        "--grad-checkpoint",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass: less memory, more compute",
    )
    flag(
        "--seed", type=int, metavar="N", help="seed of the adapter init, dropout and batch order (default: 0)"
    )
    flag(
        "--adapter-path",
        metavar="DIR",
        help="where the adapter is saved, or read by --test (default: adapters)",
    )
    flag("--test", action="store_true", default=None, help="report the test-set loss and perplexity")
    flag("--test-batches", type=int, metavar="N", help="test batches, -1 all (default: 500)")
    flag("-c", "--config", metavar="FILE", help="YAML file of settings; flags given win over it")
    parser.set_defaults(run=run, usage_error=parser.error)


def settings_from(args: argparse.Namespace) -> argparse.Namespace:
    """Flags first, then the YAML config's values, then DEFAULTS."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    config = _read_yaml(Path(args.config)) if args.config else {}
    merged = {**DEFAULTS, **config, **given}
    if isinstance(merged["target_modules"], (list, tuple)):
        merged["target_modules"] = ",".join(merged["target_modules"])
    if merged["data"] is None:
        raise XGLMError("give the data folder with --data DIR (or data: in the -c config)")
    if not (merged["train"] or merged["test"]):
        raise XGLMError("nothing to do: pass --train, --test or both")
    return argparse.Namespace(**merged)


# A settings file is a few lines; a bigger one is a mistake (or an attack), and so are YAML aliases,
# which can make a small file expand to gigabytes ("billion laughs").
MAX_CONFIG_BYTES = 1 << 20


def _load_yaml(text: str):
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"line {mark.line + 1}: aliases (*name) are not allowed in a settings file"
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)  # noqa: S506 (a SafeLoader)


def _read_yaml(file: Path) -> dict:
    import yaml

    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise XGLMError(f"-c {file} is over {MAX_CONFIG_BYTES >> 20} MB; a settings file is a few lines")
        config = _load_yaml(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise XGLMError(f"cannot read -c {file}: {e.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        raise XGLMError(f"-c {file} is not a valid YAML settings file: {reason}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise XGLMError(
            f"-c {file} must hold a mapping of settings (name: value lines), got a {type(config).__name__}"
        )
    config = {str(k).replace("-", "_"): v for k, v in config.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 60 else unknown[0][:60] + "..."
        raise XGLMError(f"-c {file}: unknown setting {name}; the settings are the flag names of lora")
    return {key: _typed(file, key, value) for key, value in config.items()}


def _typed(file: Path, key: str, value):
    """`value` as the type of the setting's default (YAML reads `1e-4` as a string, say)."""
    kind = type(DEFAULTS[key])
    if value is None or kind is str or key == "target_modules" or DEFAULTS[key] is None:
        return value if value is None or isinstance(value, (list, tuple)) else str(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise XGLMError(f"-c {file}: {key} must be true or false, got {value!r}")
        return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
    try:
        if isinstance(value, (list, dict, bool)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise XGLMError(f"-c {file}: {key} must be a number, got {shown}") from None
    if not math.isfinite(number):
        raise XGLMError(f"-c {file}: {key} must be a finite number, got {shown}")
    if kind is int:
        if number != int(number):
            raise XGLMError(f"-c {file}: {key} must be a whole number, got {shown}")
        return int(number)
    return number


def run(args: argparse.Namespace) -> int:
    group = world()
    display = TrainingDisplay(quiet=group.rank() != 0)
    try:
        return _run(args, group, display)
    except RankFailed:
        if group.rank() != 0:
            return 1  # rank 0 says what failed
        raise


def _run(args: argparse.Namespace, group, display: TrainingDisplay) -> int:
    # Every step that can fail on one rank alone (files, flags) is agreed on before the first collective
    # of the training, so a failure stops every rank instead of leaving the others waiting.
    s, train_args, model, data, config = agree(lambda: _prepare(args, group, display), group)
    if s.train:
        display.note(_parameters_line(*trainable_parameters(model)))
        if group.size() > 1:
            display.note(
                f"Data parallel over {group.size()} processes: {s.batch_size // group.size()} of the "
                f"{s.batch_size} rows of each batch per process"
            )
        folder = Path(s.adapter_path)
        try:
            with display.training(s.iters):
                train(
                    model,
                    data["train"],
                    data["valid"],
                    train_args,
                    save=lambda it: save_adapter(model, folder, config),
                    callback=lambda update: display.update(update, folder),
                    group=group,
                )
        except KeyboardInterrupt:
            display.note(f"Interrupted: the adapter of the last finished step is in {folder}")
            return 130
    if s.test:
        loss = evaluate(model, data["test"], s.batch_size, s.test_batches, s.mask_prompt, group)
        display.note(f"Test loss {loss:.3f}, Test ppl {exp_nll(loss, 1):.3f}.")
    return 0


def _prepare(args: argparse.Namespace, group, display: TrainingDisplay):
    """The settings, training arguments, model (with its new LoRA layers), data and LoRA config."""
    s = settings_from(args)
    train_args = TrainingArgs(
        iters=s.iters,
        batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        val_batches=s.val_batches,
        steps_per_report=s.steps_per_report,
        steps_per_eval=s.steps_per_eval,
        save_every=s.save_every,
        mask_prompt=s.mask_prompt,
        seed=s.seed,
        grad_checkpoint=s.grad_checkpoint,
    )
    train_args.check(group.size() if s.train else 1)
    if s.test_batches == 0 or s.test_batches < -1:
        raise XGLMError(f"--test-batches must be -1 (all) or 1 or more, got {s.test_batches}")
    if s.train:
        # Everything that would fail after training, checked before it (and before the model loads).
        check_lora_options(s.rank, s.alpha, s.dropout)
        if group.rank() == 0:
            check_writable(s.adapter_path, "adapter_path", folder=True)
    model, tokenizer, _ = load_model(
        s.model, s.revision, display.spinner, adapter_path=None if s.train else s.adapter_path
    )
    splits = (("train", "valid") if s.train else ()) + (("test",) if s.test else ())
    data = load_dataset(s.data, tokenizer, splits, s.mask_prompt, s.max_seq_length, s.newlines)
    config = None
    if s.train:
        mx.random.seed(s.seed)
        config = lora_config(
            model, s.rank, s.alpha, s.dropout, _names(s.target_modules), s.num_layers, base_model=s.model
        )
        apply_lora(model, config)
        if s.resume_adapter_file:
            resume_adapter(model, read_adapter_weights(Path(s.resume_adapter_file)), s.resume_adapter_file)
        if group.rank() == 0:
            # float32 arrays, and room for the new file beside the old one while it is replaced.
            need = 2 * 4 * trainable_parameters(model)[0] + (1 << 20)
            check_writable(s.adapter_path, "adapter_path", folder=True, need_bytes=need)
    return s, train_args, model, data, config


def _names(text: str) -> list[str]:
    return [name.strip() for name in str(text).split(",") if name.strip()]


def _parameters_line(trainable: int, total: int) -> str:
    return f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)"
