"""The training loop: Adam on the trainable (LoRA) parameters, through the model's own causal-LM loss.

The loss is `model.forward(input_ids=..., labels=...).loss`, transformers' loss, with labels of -100 on
pads and masked prompts; training mode turns on the model's and the adapters' dropout. The loop reports
through a callback and leaves saving to one too, so it knows nothing of files or terminals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..distributed import AgreedError
from ..errors import XGLMError
from ..model.loss import IGNORE_INDEX
from .data import Example, iterate_batches


@dataclass
class TrainingArgs:
    """The settings of one run (mlx-lm's names). `val_batches`/`test batches` of -1 use the whole split;
    `grad_checkpoint` recomputes each decoder layer in the backward pass (less memory, more compute)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    mask_prompt: bool = False
    seed: int = 0
    grad_checkpoint: bool = False

    def check(self) -> None:
        """Raise XGLMError naming the first setting out of range."""
        for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                raise XGLMError(f"{name} must be 1 or more, got {getattr(self, name)}", param=name)
        if self.val_batches < -1:
            raise XGLMError(
                f"val_batches must be -1 (all) or 0 or more, got {self.val_batches}", param="val_batches"
            )
        if not self.learning_rate > 0:
            raise XGLMError(f"learning_rate must be above 0, got {self.learning_rate}", param="learning_rate")


@dataclass
class TrainingUpdate:
    """What the loop tells its callback. `kind`: "step" after each step, "train" with the figures of the
    steps since the last report, "val" with a validation loss, "save" after the adapter was saved."""

    kind: str
    iteration: int
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int = 0
    peak_memory: float = 0.0


def loss_and_tokens(model: nn.Module, ids: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """The mean loss of a batch over the tokens it scores, and how many tokens that is."""
    loss = model.forward(input_ids=ids, labels=labels).loss
    return loss, (labels[:, 1:] != IGNORE_INDEX).sum()


def summed_loss_and_tokens(model: nn.Module, ids: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """The summed loss of a batch over the tokens it scores, and how many tokens that is: what each rank
    of a data-parallel step adds up, so that the sums over ranks give one process's mean."""
    loss, tokens = loss_and_tokens(model, ids, labels)
    return loss * tokens, tokens


def data_parallel_step(model, group) -> Callable:
    """`step(model, ids, labels)` -> ((mean loss, tokens), gradients) over the whole batch of which this
    rank computes rows [rank * B/N, (rank + 1) * B/N): its summed loss's gradients and its token count are
    summed over the ranks (`mx.distributed.all_sum`), then divided by the batch's scored tokens."""
    summed = nn.value_and_grad(model, summed_loss_and_tokens)
    size, rank = group.size(), group.rank()

    def step(model, ids, labels):
        rows = ids.shape[0] // size
        mine = slice(rank * rows, (rank + 1) * rows)
        (loss, tokens), grads = summed(model, ids[mine], labels[mine])
        loss, tokens = mx.distributed.all_sum(mx.stack([loss, tokens.astype(loss.dtype)]), group=group)
        grads = nn.average_gradients(grads, group=group)
        grads = tree_map(lambda g: g * (size / tokens), grads)
        return (loss / tokens, tokens), grads

    return step


def evaluate(
    model: nn.Module, examples: list[Example], batch_size: int, num_batches: int = -1, mask_prompt=False
) -> float:
    """The loss over `num_batches` batches of `examples` (-1: all), weighted by scored tokens, in eval
    mode (no dropout); the model's mode is restored afterwards."""
    training = model.training
    model.eval()
    total, tokens = mx.array(0.0), mx.array(0)
    batches = iterate_batches(examples, batch_size, mask_prompt)
    for i, (ids, labels) in enumerate(batches):
        if i == num_batches:
            break
        loss, count = loss_and_tokens(model, ids, labels)
        total, tokens = total + loss * count, tokens + count
        mx.eval(total, tokens)
    model.train(training)
    return (total / tokens).item()


def train(
    model: nn.Module,
    train_set: list[Example],
    valid_set: list[Example],
    args: TrainingArgs,
    save: Callable[[int], None],
    callback: Callable[[TrainingUpdate], None] = lambda update: None,
    optimizer: optim.Optimizer | None = None,
    group=None,
) -> None:
    """Train the model's trainable parameters for `args.iters` steps.

    With a `group` of several processes (`mlx.launch`) the training is data parallel: every rank draws
    the same batches, computes its share of each (`batch_size` must split evenly) and the gradients are
    summed over ranks, so that without dropout the steps are one process's (see `data_parallel_step`).

    Validation runs before the first step, every `steps_per_eval` steps and after the last; `save(it)`
    is called every `save_every` steps and after the last, and also when Ctrl-C stops the run (with the
    last finished step; the KeyboardInterrupt is then raised again). Batches are drawn from `train_set`
    in a shuffled order seeded by `args.seed`.
    """
    args.check()
    parallel = group is not None and group.size() > 1
    if parallel and args.batch_size % group.size():
        raise AgreedError(
            f"batch_size {args.batch_size} does not split over {group.size()} processes; use a multiple",
            param="batch_size",
        )
    mx.random.seed(args.seed)
    optimizer = optimizer or optim.Adam(learning_rate=args.learning_rate)
    step = data_parallel_step(model, group) if parallel else nn.value_and_grad(model, loss_and_tokens)
    batches = iterate_batches(
        train_set, args.batch_size, args.mask_prompt, loop=True, rng=np.random.default_rng(args.seed)
    )
    model.train()
    model.model.grad_checkpoint = args.grad_checkpoint
    meter, done = _Meter(), 0
    try:
        _validate(model, valid_set, args, 0, callback)
        for it in range(1, args.iters + 1):
            _run_step(model, step, optimizer, next(batches), it, args, meter, callback)
            done = it
            if it % args.steps_per_eval == 0 or it == args.iters:
                _validate(model, valid_set, args, it, callback)
            if it % args.save_every == 0 or it == args.iters:
                save(it)
                callback(TrainingUpdate("save", it))
    except KeyboardInterrupt:
        save(done)
        callback(TrainingUpdate("save", done))
        raise
    finally:
        model.model.grad_checkpoint = False
        model.eval()


@dataclass
class _Meter:
    """Loss, tokens, steps and seconds since the last report; tokens trained in all."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    trained: int = 0


def _run_step(model, step, optimizer, batch, it: int, args: TrainingArgs, meter: _Meter, callback) -> None:
    start = time.perf_counter()
    ids, labels = batch
    (loss, tokens), grads = step(model, ids, labels)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss, tokens)
    meter.seconds += time.perf_counter() - start
    meter.loss += loss.item()
    meter.tokens += tokens.item()
    meter.steps += 1
    callback(TrainingUpdate("step", it))
    if it % args.steps_per_report and it != args.iters:
        return
    meter.trained += meter.tokens
    callback(
        TrainingUpdate(
            "train",
            it,
            train_loss=meter.loss / meter.steps,
            learning_rate=float(optimizer.learning_rate),
            tokens_per_second=meter.tokens / meter.seconds,
            trained_tokens=meter.trained,
            peak_memory=mx.get_peak_memory() / 1e9,
        )
    )
    meter.loss, meter.tokens, meter.steps, meter.seconds = 0.0, 0, 0, 0.0


def _validate(model, valid_set, args: TrainingArgs, iteration: int, callback) -> None:
    if args.val_batches == 0:
        return
    loss = evaluate(model, valid_set, args.batch_size, args.val_batches, args.mask_prompt)
    callback(TrainingUpdate("val", iteration, val_loss=loss, peak_memory=mx.get_peak_memory() / 1e9))
