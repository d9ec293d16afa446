"""The training loop: Adam on the trainable (LoRA) parameters, through the model's own causal-LM loss.

The loss is `model.forward(input_ids=..., labels=...).loss`, transformers' loss, with labels of -100 on
pads and masked prompts; training mode turns on the model's and the adapters' dropout. The loop reports
through a callback and leaves saving to one too, so it knows nothing of files or terminals.

Under `mlx.launch` the loop is data parallel: every rank builds the same batch and takes its share of the
rows (padded as the whole batch is); each rank's loss is its rows' summed token losses over the whole
batch's scored tokens, scaled by the number of ranks, so the gradients averaged across ranks
(`mlx.nn.average_gradients`) are the one-process gradient. Dropout masks are keyed by a row's index in the
whole batch (model/dropout.py), so with the same seed the adapter equals one process's up to rounding.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..errors import XGLMError
from ..model.dropout import batch_rows
from ..model.loss import IGNORE_INDEX
from ..world import agree, check_same, world
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

    def check(self, processes: int = 1) -> None:
        """Raise XGLMError naming the first setting out of range (or a batch that does not split evenly
        over `processes` data-parallel ranks)."""
        for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                raise XGLMError(f"{name} must be 1 or more, got {getattr(self, name)}", param=name)
        if self.val_batches < -1:
            raise XGLMError(
                f"val_batches must be -1 (all) or 0 or more, got {self.val_batches}", param="val_batches"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise XGLMError(
                f"learning_rate must be a finite number above 0, got {self.learning_rate}",
                param="learning_rate",
            )
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise XGLMError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed}", param="seed")
        if self.batch_size % processes:
            raise XGLMError(
                f"batch_size {self.batch_size} does not split evenly over {processes} processes; use a "
                f"multiple of {processes}",
                param="batch_size",
            )


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


def scored_tokens(labels: mx.array) -> mx.array:
    """How many tokens of a batch count in its loss (label t + 1 scores position t)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def share(batch: tuple[mx.array, mx.array], group) -> tuple[int, mx.array, mx.array]:
    """This rank's rows of a batch every rank holds, as (first row's index, ids, labels): rank r of N takes
    rows r*B//N up to (r+1)*B//N. A rank left without rows (a short last batch) gets the first row with
    every label ignored, so it still runs the step (and draws the same dropout keys) at no loss."""
    ids, labels = batch
    rows, size, rank = ids.shape[0], group.size(), group.rank()
    first, end = rank * rows // size, (rank + 1) * rows // size
    if first == end:
        return 0, ids[:1], mx.full(labels[:1].shape, IGNORE_INDEX, labels.dtype)
    return first, ids[first:end], labels[first:end]


def evaluate(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    num_batches: int = -1,
    mask_prompt=False,
    group=None,
) -> float:
    """The loss over `num_batches` batches of `examples` (-1: all), weighted by scored tokens, in eval
    mode (no dropout); the model's mode is restored afterwards. With a `group` of several processes
    (default: the launcher's) each rank scores its share of every batch and the sums are added up."""
    group = world(group)
    training = model.training
    model.eval()
    total, tokens = mx.array(0.0), mx.array(0)
    batches = iterate_batches(examples, batch_size, mask_prompt)
    for i, batch in enumerate(batches):
        if i == num_batches:
            break
        _, ids, labels = share(batch, group)
        total = total + model.forward(input_ids=ids, labels=labels, num_items_in_batch=1).loss
        tokens = tokens + scored_tokens(batch[1])
        mx.eval(total, tokens)
    model.train(training)
    if group.size() > 1:
        total = mx.distributed.all_sum(total, group=group, stream=mx.cpu)
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

    Validation runs before the first step, every `steps_per_eval` steps and after the last; `save(it)`
    is called every `save_every` steps and after the last, and also when Ctrl-C stops the run (with the
    last finished step; the KeyboardInterrupt is then raised again). Batches are drawn from `train_set`
    in a shuffled order seeded by `args.seed`. An adapter that is no longer finite after a step (a NaN or
    infinite loss: a learning rate too high) stops training with an XGLMError before it is saved.

    `group` (an `mx.distributed` group; default: the launcher's, one process when not launched) makes
    the run data parallel: `args.batch_size` is the whole batch, split over the ranks, and every rank
    must call `train` with the same model, data and arguments. Only rank 0 calls `save` and `callback`;
    the figures it reports are those of the whole batch. A failure on any rank (a bad setting, different
    data, a failed save) stops every rank with the same error (see mlx_xglm/world.py).
    """
    group = world(group)
    agree(lambda: args.check(group.size()), group)
    if group.size() > 1:
        check_same(_fingerprint(train_set, valid_set), "training or validation data", group)
    main = group.rank() == 0
    report = callback if main else lambda update: None
    mx.random.seed(args.seed)
    optimizer = optimizer or optim.Adam(learning_rate=args.learning_rate)
    step = nn.value_and_grad(model, _share_loss)
    batches = iterate_batches(
        train_set, args.batch_size, args.mask_prompt, loop=True, rng=np.random.default_rng(args.seed)
    )
    model.train()
    model.model.grad_checkpoint = args.grad_checkpoint
    meter, done = _Meter(), 0
    try:
        _validate(model, valid_set, args, 0, report, group)
        for it in range(1, args.iters + 1):
            _run_step(model, step, optimizer, next(batches), it, args, meter, report, group)
            done = it
            if it % args.steps_per_eval == 0 or it == args.iters:
                _validate(model, valid_set, args, it, report, group)
            if it % args.save_every == 0 or it == args.iters:
                agree(lambda it=it: save(it) if main else None, group)
                report(TrainingUpdate("save", it))
    except KeyboardInterrupt:
        if main:
            save(done)
        report(TrainingUpdate("save", done))
        raise
    finally:
        model.model.grad_checkpoint = False
        model.eval()


def _fingerprint(*splits: list[Example]) -> str:
    """A digest of the examples' token ids and prompt lengths."""
    digest = hashlib.sha256()
    for split in splits:
        for example in split:
            digest.update(np.asarray([example.prompt_length, *example.ids], np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _share_loss(model, batch, processes: int) -> tuple[mx.array, mx.array]:
    """This rank's loss (its rows' token losses over the batch's scored tokens, times the number of
    ranks: the mean over ranks is the batch's loss) and the batch's scored tokens."""
    first, rows, ids, labels, tokens = batch
    with batch_rows(first, rows):
        loss = model.forward(input_ids=ids, labels=labels, num_items_in_batch=tokens / processes).loss
    return loss, tokens


@dataclass
class _Meter:
    """Loss, tokens, steps and seconds since the last report; tokens trained in all."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    trained: int = 0


def _run_step(model, step, optimizer, batch, it: int, args, meter: _Meter, callback, group) -> None:
    start = time.perf_counter()
    first, ids, labels = share(batch, group)
    tokens = scored_tokens(batch[1])
    (loss, _), grads = step(model, (first, batch[0].shape[0], ids, labels, tokens), group.size())
    optimizer.update(model, nn.average_gradients(grads, group=group))
    # The averaged update leaves every rank with the same adapter: all of them stop at the same step.
    finite = mx.stack([mx.isfinite(v).all() for _, v in tree_flatten(model.trainable_parameters())]).all()
    mx.eval(model.parameters(), optimizer.state, loss, tokens, finite)
    meter.seconds += time.perf_counter() - start
    if not finite.item():
        raise XGLMError(
            f"training went non-finite at step {it} (loss {loss.item()}); it stopped, and this step's "
            "adapter was not saved (lower the learning rate, or check the data)",
            param="learning_rate",
        )
    meter.loss += loss.item()
    meter.tokens += tokens.item()
    meter.steps += 1
    callback(TrainingUpdate("step", it))
    if it % args.steps_per_report and it != args.iters:
        return
    meter.trained += meter.tokens
    losses = meter.loss
    if group.size() > 1:
        losses = mx.distributed.all_sum(mx.array(losses), group=group, stream=mx.cpu).item() / group.size()
    callback(
        TrainingUpdate(
            "train",
            it,
            train_loss=losses / meter.steps,
            learning_rate=float(optimizer.learning_rate),
            tokens_per_second=meter.tokens / meter.seconds,
            trained_tokens=meter.trained,
            peak_memory=mx.get_peak_memory() / 1e9,
        )
    )
    meter.loss, meter.tokens, meter.steps, meter.seconds = 0.0, 0, 0, 0.0


def _validate(model, valid_set, args: TrainingArgs, iteration: int, callback, group) -> None:
    if args.val_batches == 0:
        return
    loss = evaluate(model, valid_set, args.batch_size, args.val_batches, args.mask_prompt, group)
    callback(TrainingUpdate("val", iteration, val_loss=loss, peak_memory=mx.get_peak_memory() / 1e9))
