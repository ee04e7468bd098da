"""The training loop: torchrec's train pipelines (wrapped, not forked) plus the loop's side concerns.

Each optimizer step consumes `gradient_accumulation` batches; every batch's loss is divided by that count,
so the summed gradient is the mean over the step's batches, and DDP all-reduces gradients only on the last
batch of a step. Fused (in-backward) table optimizers still update their tables on every batch's backward
(see docs/training.md). The loop knows two things about a batch (docs/design.md): it moves like torchrec's
`Pipelineable` (`to`, `pin_memory`, `record_stream`) and tells its `batch_size`; and one about the model:
`loss, outputs = module(batch)`.

Pipelines (`LoopOptions.pipeline`): `eager` (copy, forward, backward, step), `base` (torchrec's
TrainPipelineBase: the copy of batch i+1 overlaps batch i on a CUDA stream) and `sparse_dist` (torchrec's
TrainPipelineSparseDist: also the embedding input all-to-alls of batch i+1 overlap batch i); `auto` picks
sparse_dist on CUDA for models with fused tables, eager otherwise. All of them run on CPU too (without
streams), which is how the CPU tests cover the GPU path.

Example:
    state = LoopState()
    result = train(sharded.module, [optimizer, *sharded.table_optimizers.values()], scheduler, batches,
                   env, LoopOptions(num_train_steps=1000, batch_type=MyBatch), metric_logger,
                   checkpointer, evaluate, state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch.profiler import record_function

from tml.core.distributed import DistEnv, min_over_ranks
from tml.core.eval_loop import close_iterator
from tml.core.state import LoopState
from tml.ml_logging.log import get_logger
from tml.ml_logging.progress import progress_bar

logger = get_logger(__name__)

Pipeline = Literal["auto", "eager", "base", "sparse_dist"]


@dataclasses.dataclass
class LoopOptions:
    """Flat settings of the loop (built from the training and optimizer configs by the caller).

    `batch_type`: the project's batch class, registered as torchrec `Pipelineable` for the pipelines.
    `profiler`: a core.profiling.StepProfiler, or None.
    """

    num_train_steps: int
    gradient_accumulation: int = 1
    train_log_every_n: int = 100
    eval_every_n: int | None = None
    bf16: bool = False
    pipeline: Pipeline = "auto"
    batch_type: type | None = None
    profiler: object | None = None  # core.profiling.StepProfiler: told before and after every step
    threads: object | None = None  # core.cpu_threads.ThreadTuner: told before and after every step


@dataclasses.dataclass
class TrainResult:
    step: int
    batches_trained: int
    losses: list[float]  # this rank's mean loss of each optimizer step of this call


class NonFiniteLossError(RuntimeError):
    pass


class _StepControl:
    """What the pipeline sees as its optimizer: zero_grad/step only at accumulation boundaries, every
    optimizer (each clips its own gradients when configured to: optimizers/build.py) and the scheduler
    behind one step()."""

    def __init__(self, optimizers, scheduler, accumulation: int) -> None:
        self.optimizers, self.scheduler = optimizers, scheduler
        self.accumulation, self.micro = accumulation, 0

    @property
    def last_micro_step(self) -> bool:
        """The batch about to run ends an optimizer step (its backward must all-reduce gradients)."""
        return (self.micro + 1) % self.accumulation == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.micro % self.accumulation == 0:
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation:
            return
        with record_function("optimizer"):
            for optimizer in self.optimizers:
                optimizer.step()
            self.scheduler.step()


class _AgreedIterator:
    """Yields while every rank still has a batch, so a rank whose share ends first stops every rank at
    the same batch (no hang in the next collective), and carries the ranks' agreement on a stop request
    (`stop_agreed`, the same on every rank after the same batch). Agreeing costs one tiny all_reduce per
    batch; it is started one batch ahead and waited for a step later, so it overlaps the step's compute."""

    def __init__(self, batches: Iterable, env: DistEnv, stop_requested: Callable[[], bool]) -> None:
        self.it, self.env, self.stop_requested = iter(batches), env, stop_requested
        self.done, self.stop_agreed = False, False
        self.ahead: tuple | None = None  # (batch or None, agreement flags, async work or None)

    def __iter__(self) -> Iterator:
        return self

    def _fetch(self) -> None:
        with record_function("data_wait"):
            batch = next(self.it, None)
        # MIN over ranks of [has a batch, has no stop request].
        flags = torch.tensor([batch is not None, not self.stop_requested()], dtype=torch.int32)
        work = None
        if self.env.world_size > 1:
            work = torch.distributed.all_reduce(
                flags, op=torch.distributed.ReduceOp.MIN, group=self.env.control_group, async_op=True
            )
        self.ahead = (batch, flags, work)

    def __next__(self):
        if self.done:
            raise StopIteration
        if self.ahead is None:
            self._fetch()
        batch, flags, work = self.ahead
        if work is not None:
            work.wait()
        all_have_batch, none_stop = flags.tolist()
        self.stop_agreed = self.stop_agreed or not none_stop
        if not all_have_batch:
            self.done, self.ahead = True, None
            raise StopIteration
        self._fetch()
        return batch

    def close(self) -> None:
        """Finish the agreement still in flight (every rank has one), so no collective is left pending."""
        if self.ahead is not None and self.ahead[2] is not None:
            self.ahead[2].wait()
        self.ahead = None


def _pinned(batches: Iterable) -> Iterator:
    """Batches in page-locked host memory, so the pipelines' `to(device, non_blocking=True)` copies run
    asynchronously (from pageable memory CUDA copies synchronously). Closing it closes `batches`' iterator."""
    it = iter(batches)
    try:
        for batch in it:
            yield batch.pin_memory()
    finally:
        close_iterator(it)


def _make_progress(module, control, env: DistEnv, options: LoopOptions) -> tuple[Callable, object | None]:
    autocast = (
        (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16))
        if options.bf16
        else contextlib.nullcontext
    )
    ddps = [m for m in module.modules() if isinstance(m, torch.nn.parallel.DistributedDataParallel)]

    def forward(batch):
        if options.gradient_accumulation > 1:
            # What DDP's no_sync() does, for the pipelines that run forward and backward themselves.
            for ddp in ddps:
                ddp.require_backward_grad_sync = control.last_micro_step
        with record_function("forward"), autocast():
            loss, _ = module(batch)
        return loss / options.gradient_accumulation, (loss.detach().float(), batch.batch_size)

    kind = options.pipeline
    if kind == "auto":
        kind = "sparse_dist" if env.device.type == "cuda" and hasattr(module, "fused_optimizer") else "eager"
    if kind == "eager":

        def progress(it):
            batch = next(it).to(env.device, non_blocking=True)
            control.zero_grad()
            scaled, out = forward(batch)
            with record_function("backward"):
                scaled.backward()
            control.step()
            return out

        return progress, None
    from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
    from torchrec.streamable import Pipelineable

    if options.batch_type is None:
        raise ValueError(f"pipeline '{kind}' needs LoopOptions.batch_type (the project's batch class)")
    Pipelineable.register(options.batch_type)
    if kind == "sparse_dist":
        pipeline = TrainPipelineSparseDist(module, control, env.device, custom_model_fwd=forward)
    elif kind == "base":
        # TrainPipelineBase accepts custom_model_fwd but calls the model itself: hand it a wrapper.
        pipeline = TrainPipelineBase(_ForwardModule(module, forward), control, env.device)
    else:
        raise ValueError(f"pipeline must be auto, eager, base or sparse_dist, got {kind!r}")
    return pipeline.progress, pipeline


class _ForwardModule(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, forward: Callable) -> None:
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, batch):
        return self._forward(batch)


def train(
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable,
    env: DistEnv,
    options: LoopOptions,
    metric_logger=None,
    checkpointer=None,
    evaluate: Callable[[int], None] | None = None,
    state: LoopState | None = None,
) -> TrainResult:
    """Train from `state.step` to `options.num_train_steps` or until any rank's data ends.

    `optimizers[0]` is the dense optimizer (its param groups' `name` label `train/lr/<name>`). After each step `checkpointer.maybe_save` and, every `eval_every_n` steps, `evaluate(step)`
    run; at the end the last step is saved and evaluated unless that just happened. `state` (the loop's
    counters, also registered with the checkpointer) is updated in place. Losses are read (and checked for
    NaN/inf) at log lines, evaluations, saves and the end.
    """
    state = state if state is not None else LoopState()
    module.train()
    control = _StepControl(optimizers, scheduler, options.gradient_accumulation)
    progress, pipeline = _make_progress(module, control, env, options)
    stop_requested = (lambda: checkpointer.stop_requested) if checkpointer is not None else (lambda: False)
    source = _pinned(batches) if env.device.type == "cuda" else batches
    data, losses = _AgreedIterator(source, env, stop_requested), []
    bar = progress_bar(options.num_train_steps - state.step, "train", env.rank)
    window = _Window(env, checkpointer, losses)
    evaluated, profiler = None, options.profiler or _NoProfiler()
    threads = options.threads or _NoProfiler()
    try:
        while state.step < options.num_train_steps:
            profiler.before(state.step + 1)
            threads.before(state.step + 1)
            step_loss = _step(progress, data, options, state, window)
            if step_loss is None:
                logger.info("data ended on a rank after %d steps; all ranks stop", state.step)
                break
            step = state.step
            profiler.after(step)
            threads.after(step)
            window.pending.append(step_loss)
            bar.update(1)
            if step % options.train_log_every_n == 0 or step == options.num_train_steps:
                window.verify(step)
                bar.update(0, loss=window.loss / max(window.steps, 1))
                window = _log_train(metric_logger, step, optimizers[0], env, window)
            if checkpointer is not None:
                checkpointer.maybe_save(step, before_save=window.verify, stop=data.stop_agreed)
            if evaluate is not None and options.eval_every_n and step % options.eval_every_n == 0:
                window.verify(step)
                _run_eval(evaluate, step, module, pipeline)
                evaluated = step
    finally:
        profiler.close()  # a trace of the steps before a failure or a stop is still written
        # The reader's threads stop now, also after a failure: a pipeline keeps this iterator referenced
        # long after training, and reader threads still running at interpreter exit can abort it.
        close_iterator(data.it)
    data.close()  # not after a failure: another rank may never join the agreement in flight
    window.verify(state.step)
    bar.close()
    if checkpointer is not None:
        checkpointer.maybe_save(state.step, stop=False, last_step=True)
    if evaluate is not None and evaluated != state.step:
        _run_eval(evaluate, state.step, module, pipeline)
    return TrainResult(state.step, state.batches_trained, losses)


def _step(progress, data, options: LoopOptions, state: LoopState, window: _Window) -> torch.Tensor | None:
    """One optimizer step of `gradient_accumulation` batches: its loss (on the device), or None when the
    ranks' data ended."""
    step_loss = None
    try:
        for _ in range(options.gradient_accumulation):
            loss, batch_size = progress(data)
            state.batches_trained += 1
            # Kept on the device: reading it every step would stall the GPU (see _Window.verify).
            loss = loss / options.gradient_accumulation
            step_loss = loss if step_loss is None else step_loss + loss
            window.examples += batch_size
    except StopIteration:
        return None
    state.step += 1
    return step_loss


class _NoProfiler:
    def before(self, step: int) -> None: ...
    def after(self, step: int) -> None: ...
    def close(self) -> None: ...


def _run_eval(evaluate, step: int, module, pipeline) -> None:
    # The sparse-dist pipeline rewrites sharded modules' forwards; detach restores them and keeps
    # in-flight batches, and the next progress() re-attaches.
    if pipeline is not None and hasattr(pipeline, "detach"):
        pipeline.detach()
    evaluate(step)
    module.train()


class _Window:
    """The steps since the last train log line; step losses wait on the device until `verify`."""

    def __init__(self, env: DistEnv, checkpointer, losses: list[float]) -> None:
        self.env, self.checkpointer, self.losses = env, checkpointer, losses
        self.pending: list[torch.Tensor] = []
        self.loss, self.steps, self.examples = 0.0, 0, 0
        self.start = time.monotonic()

    def verify(self, step: int) -> None:
        """Read the pending step losses (one host sync) and stop every rank if one is not finite.

        Called at log lines, evaluations, before every checkpoint and at the end, so a non-finite loss is
        caught before anything is saved, at the cost of up to train_log_every_n wasted steps.
        """
        values = (
            torch.stack([p.detach().float() for p in self.pending]).cpu().tolist() if self.pending else []
        )
        self.pending = []
        first = step - len(values)
        bad = next((first + i + 1 for i, v in enumerate(values) if not math.isfinite(v)), math.inf)
        bad = min_over_ranks(bad, self.env)  # every rank takes part, with or without pending losses
        if bad != math.inf:
            last = self.checkpointer.latest_step() if self.checkpointer is not None else None
            raise NonFiniteLossError(
                f"loss is NaN/inf at step {int(bad)} on some rank (seen when the losses were read at step "
                f"{step}); last good checkpoint: {'step ' + str(last) if last is not None else 'none'}"
            )
        self.losses.extend(values)
        self.loss += sum(values)
        self.steps += len(values)


def _log_train(metric_logger, step: int, optimizer, env: DistEnv, window: _Window) -> _Window:
    # One all_reduce for both figures: the mean loss over ranks and the global example count.
    totals = torch.tensor([window.loss, float(window.examples)], dtype=torch.float64)
    if env.world_size > 1:
        torch.distributed.all_reduce(totals, group=env.control_group)
    if metric_logger is not None:
        metrics = {
            "train/loss": totals[0].item() / env.world_size / max(window.steps, 1),
            "train/examples_per_s": totals[1].item() / max(time.monotonic() - window.start, 1e-9),
        }
        for group in optimizer.param_groups:
            metrics[f"train/lr/{group.get('name', 'default')}"] = float(group["lr"])
        metric_logger.log(step, metrics)
    return _Window(env, window.checkpointer, window.losses)
