"""torch's CPU threads against the data reader's: the core kept for the reader goes to torch when that wins.

A CPU training process starts with its share of the cores minus one left to the reader's decoding threads
(`core.distributed.configure_cpu_threads`): OpenMP threads that share their cores with busy reader threads
wait on each other at every parallel region. That is right for an input-bound model (local.yaml: its
reader keeps most of a core busy) and wrong for a compute-bound one (prod.yaml: the reader needs a few
percent of a core, and the reserved core idles). No static rule tells the two apart, so `ThreadTuner`
measures, once per process, over the first steps:

1. warm-up (`warmup_steps` steps), then a window at the start count: steps/s, and from the reader's CPU
   seconds per batch (`reader_seconds_per_batch`, tml.reader's `ParquetDataset.cpu_seconds_per_batch`,
   averaged over every row it decoded: its queues hold many batches, a short window would miss them) the
   share of a core it needs at that speed; a reader that needs at least `busy_reader` of a core keeps its
   core, no trial;
2. otherwise a window twice as long with every core of the process's share, then a second window at the
   start count (each after `settle_steps` steps at the new count): the two counts' windows are centred on
   the same moment, so a speed that drifts over the first steps (the reader filling its queues, a
   neighbour's load) weighs on both alike (one window each, in turn, let a fast first window decide:
   benchmarks/RESULTS.md, "bf16 autocast on AMX", the thread trial);
3. the faster count is kept (the full share must win by `margin`), and the decision is logged.

A reader that decodes in the training thread (`train_data.num_workers: 0`, the automatic choice on up to
2 cores: tml.reader.pipeline.resolve_decoding) or in a separate idle-priority process
(`train_data.decode_process`) runs no thread beside torch's, so torch gets the whole share at once and
nothing is measured.

Windows last at least `window_steps` steps and `window_seconds` of step time (logging, checkpoints and
evaluations between steps are not counted). A resumed run measures again. The decision depends on timing,
and a different thread count changes floating-point results in their last bits: set `training.num_threads`
(or OMP_NUM_THREADS) for bit-identical reruns; either disables the tuner. Measured in
benchmarks/RESULTS.md ("End to end").

Example:
    tuner = thread_tuner(config.training.num_threads, env, dataset)  # None when nothing is to decide
    train(..., LoopOptions(..., threads=tuner))  # the loop calls before(step) / after(step)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from tml.core.cores import cpu_share
from tml.core.distributed import DistEnv
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


class ThreadTuner:
    """Told before and after every training step; sets torch's thread count once it has measured."""

    def __init__(
        self,
        reader_seconds_per_batch: Callable[[], float | None],
        share: int,
        batches_per_step: int = 1,
        warmup_steps: int = 5,
        window_steps: int = 5,
        window_seconds: float = 2.0,
        settle_steps: int = 2,
        busy_reader: float = 0.5,
        margin: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.reader, self.clock, self.batches_per_step = reader_seconds_per_batch, clock, batches_per_step
        self.low, self.high = torch.get_num_threads(), share
        self.warmup_steps, self.window_steps, self.window_seconds = warmup_steps, window_steps, window_seconds
        self.settle_steps, self.busy_reader, self.margin = settle_steps, busy_reader, margin
        self._open("warmup")
        # The windows still to measure: (thread count, length in windows); low, high twice, low again.
        self._windows = [(self.low, 1), (self.high, 2), (self.low, 1)]
        self._totals: dict[int, tuple[int, float]] = {}  # steps, seconds measured per thread count
        self.reader_busy: float | None = None  # cores, measured in the first window
        self.decided: int | None = None
        self._step_start = 0.0

    @property
    def rates(self) -> dict[int, float]:
        """Steps/s measured so far per thread count, over all of that count's windows."""
        return {threads: steps / seconds for threads, (steps, seconds) in self._totals.items()}

    def before(self, step: int) -> None:
        self._step_start = self.clock()

    def after(self, step: int) -> None:
        if self.decided is not None:
            return
        self.count += 1
        self.step_time += self.clock() - self._step_start
        if self.phase in ("warmup", "settle"):
            if self.count >= (self.warmup_steps if self.phase == "warmup" else self.settle_steps):
                self._open("window")
            return
        threads, length = self._windows[0]
        if self.count < self.window_steps * length or self.step_time < self.window_seconds * length:
            return
        steps, seconds = self._totals.get(threads, (0, 0.0))
        self._totals[threads] = steps + self.count, seconds + self.step_time
        self._windows.pop(0)
        if self.reader_busy is None:  # the first window, at the start count
            per_batch = self.reader() or 0.0
            self.reader_busy = per_batch * self.batches_per_step * self.rates[self.low]
            if self.reader_busy >= self.busy_reader:
                self._decide(self.low, step)
                return
        if not self._windows:
            faster = self.rates[self.high] > self.rates[self.low] * (1 + self.margin)
            self._decide(self.high if faster else self.low, step)
            return
        torch.set_num_threads(self._windows[0][0])
        self._open("settle")

    def _open(self, phase: str) -> None:
        self.phase, self.count, self.step_time = phase, 0, 0.0

    def _decide(self, threads: int, step: int) -> None:
        self.decided = threads
        torch.set_num_threads(threads)
        rates = ", ".join(f"{n} thread(s) {rate:.3g} steps/s" for n, rate in sorted(self.rates.items()))
        logger.info(
            "torch CPU threads: %d from step %d (measured %s; the data reader needs %.2f of a core)",
            threads,
            step + 1,
            rates,
            self.reader_busy,
        )


def thread_tuner(
    requested: int | None,
    env: DistEnv,
    train_data: object,
    batches_per_step: int = 1,
    compiled: bool = False,
) -> ThreadTuner | None:
    """A ThreadTuner when the thread count is automatic (no `requested`, no OMP_NUM_THREADS), the model
    trains on the CPU, the data reports its CPU cost (`cpu_seconds_per_batch()`) and a core was kept for
    the reader. Not for a `compiled` model: torch.compile's graphs guard on the thread count, so each
    change would recompile every compiled part, inside the windows that time it. When the reader decodes
    in the training thread (`decoding`), torch gets the whole share here, before the first step (so
    before anything is compiled), and there is no tuner; so also when a separate process decodes
    (`decoding`: it runs at idle priority, in the gaps torch's threads leave)."""
    reader = getattr(train_data, "cpu_seconds_per_batch", None)
    if requested is not None or os.environ.get("OMP_NUM_THREADS") or env.device.type != "cpu":
        return None
    decoding = getattr(train_data, "decoding", None)
    if decoding:
        if torch.get_num_threads() < cpu_share():
            torch.set_num_threads(cpu_share())
            logger.info("torch CPU threads: %d (the data reader decodes %s)", cpu_share(), decoding)
        return None
    if compiled:
        return None
    if reader is None or torch.get_num_threads() >= cpu_share():
        return None
    return ThreadTuner(reader, cpu_share(), batches_per_step)
