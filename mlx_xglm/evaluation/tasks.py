"""Running lm-evaluation-harness tasks on an XGLM model, writing lm-eval's own results and samples files."""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import XGLMError
from ..outputs import check_writable
from .distributed import world

# lm-eval's own defaults for its random, numpy, torch and few-shot seeds.
LM_EVAL_SEEDS = (0, 1234, 1234, 1234)


def task_manager(include_path: str | None):
    """lm-eval's TaskManager, with the tasks in `include_path` (a folder of task YAMLs) added."""
    if include_path is not None and not Path(include_path).is_dir():
        raise XGLMError(
            f"the include path {include_path} is not a folder; pass a folder of lm-eval task YAML files",
            param="include_path",
        )
    return _indexed_tasks(None if include_path is None else str(Path(include_path).resolve()))


@functools.cache
def _indexed_tasks(include_path: str | None):
    # Building the index reads every task YAML lm-eval ships (seconds of CPU): once per folder.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def resolve_tasks(manager, tasks: list[str]) -> list[str]:
    """The task names, checked against `manager`; unknown names are an XGLMError naming them, and so is
    a task of the include path whose YAML lm-eval cannot build (a bad output_type, split, template...)."""
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise XGLMError("no tasks given; name at least one lm-eval task", param="tasks")
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        raise XGLMError(
            f"unknown task(s): {', '.join(unknown)}; list lm-eval's tasks with `lm-eval ls tasks` (with "
            "`--include_path DIR` for a folder of your own task YAML files), or pass that folder as the "
            "include path",
            param="tasks",
        )
    _check_own_tasks(manager, names)
    return names


def _check_own_tasks(manager, names: list[str]) -> None:
    # The user's own YAML files are where mistakes are: build those tasks now, before any model work.
    if not manager.include_path:
        return
    roots = [
        Path(p).resolve()
        for p in ([manager.include_path] if isinstance(manager.include_path, str) else manager.include_path)
    ]
    for name in names:
        path = getattr(manager.task_index.get(name), "yaml_path", None)
        if path is None or not any(root in Path(path).resolve().parents for root in roots):
            continue
        try:
            manager.load([name])
        except Exception as e:  # lm-eval raises whatever its builders raise
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            reason = reason if len(reason) <= 200 else reason[:200] + "..."
            raise XGLMError(
                f"task {name} ({path}) cannot be built by lm-eval ({reason}); fix its YAML",
                param="include_path",
            ) from None


def check_options(num_fewshot: int | None, limit: float | None, output_path: str | None, group=None) -> None:
    """Refuse, before any model work, settings `evaluate` cannot finish with: a negative few-shot count,
    a limit that is not a positive number, or an output path that cannot be written (a file, say)."""
    if num_fewshot is not None and num_fewshot < 0:
        raise XGLMError(f"num_fewshot must be 0 or more, got {num_fewshot}", param="num_fewshot")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise XGLMError(f"limit must be a number above 0, got {limit}", param="limit")
    if output_path is not None and world(group).rank() == 0:
        check_writable(output_path, "output_path", folder=True)


def _check_fewshot(manager, names: list[str], num_fewshot: int) -> None:
    """Refuse a few-shot count larger than a task's few-shot split, before any model work."""
    for name, task in manager.load(names)["tasks"].items():
        if task.get_config("num_fewshot") == 0:
            continue  # lm-eval ignores the override for tasks configured as zero-shot
        docs = task.fewshot_docs()
        available = len(docs) if docs is not None else 0
        # When the few-shot examples come from the evaluated split, lm-eval leaves out the document itself.
        same_split = getattr(task, "fewshot_cfg", None) and task.fewshot_cfg.split == task.config.test_split
        if num_fewshot + (1 if same_split else 0) > available:
            raise XGLMError(
                f"num_fewshot={num_fewshot} is more than task {name} can draw from its few-shot split "
                f"({available} documents{', one of them the evaluated one' if same_split else ''}); "
                "lower it",
                param="num_fewshot",
            )


def evaluate(
    model: str = "facebook/xglm-564M",
    tasks: list[str] = (),
    *,
    revision: str | None = None,
    adapter_path: str | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    output_path: str | None = None,
    log_samples: bool = False,
    seed: int | None = None,
    newlines: str = "space",
    group=None,
) -> dict:
    """Run lm-eval `tasks` with the `mlx-xglm` adapter; returns lm-eval's results dict.

    `model` is a folder or Hub repo id (with `adapter_path` a LoRA adapter applied to it), or an
    `XGLMEvalModel`. The other arguments are lm-eval's:
    `include_path` (a folder of task YAMLs), `num_fewshot`, `limit`, `batch_size`, `seed` (all four of
    lm-eval's seeds; default lm-eval's 0/1234/1234/1234), `log_samples` (per-document records under
    `results["samples"]`). With `output_path`, rank 0 writes lm-eval's results JSON (and samples JSONL)
    through its EvaluationTracker, into a temporary folder moved into place at the end.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from .harness import XGLMEvalModel

    manager = task_manager(include_path)
    names = resolve_tasks(manager, list(tasks))
    check_options(num_fewshot, limit, output_path, group)
    if num_fewshot:
        _check_fewshot(manager, names, num_fewshot)
    seeds = LM_EVAL_SEEDS if seed is None else (seed,) * 4
    if isinstance(model, XGLMEvalModel):
        lm, model_args = model, {"pretrained": model.pretrained, "newlines": model.newlines}
        if model.adapter_path:
            model_args["adapter_path"] = model.adapter_path
    else:
        model_args = {"pretrained": model, "newlines": newlines, "seed": seeds[2]}
        model_args |= {k: v for k, v in (("revision", revision), ("adapter_path", adapter_path)) if v}
        lm = XGLMEvalModel(**model_args, batch_size=batch_size, group=group)
    main = world(group).rank() == 0
    staging = None
    if output_path is not None and main:
        parent = Path(output_path).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".mlx-xglm-eval-", dir=parent)
    try:
        tracker = EvaluationTracker(output_path=staging) if staging else None
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=names,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            limit=limit,
            log_samples=log_samples,
            evaluation_tracker=tracker,
            task_manager=manager,
            random_seed=seeds[0],
            numpy_random_seed=seeds[1],
            torch_random_seed=seeds[2],
            fewshot_random_seed=seeds[3],
        )
        results["config"]["model"] = "mlx-xglm"
        if tracker is not None:
            samples = results.get("samples") if log_samples else None
            summary = {k: v for k, v in results.items() if k != "samples"}
            tracker.save_results_aggregated(results=summary, samples=samples)
            for task_name in summary["configs"] if log_samples else ():
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            _move_into_place(Path(staging), Path(output_path))
        return results
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, destination: Path) -> None:
    """Move every file written under `staging` to the same place under `destination`."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = destination / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
