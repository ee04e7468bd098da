"""`training.profile`: torch.profiler over a few optimizer steps of every rank, written as Chrome traces.

The loop tells the profiler which step is about to run and which just ended; it decides for itself when to
start and stop. Traces go to `<save_dir>/profile/rank<r>/<host>.<pid>.<time>.pt.trace.json` (torch's
TensorBoard trace format): TensorBoard's profiler plugin reads the folder (`pip install torch-tb-profiler`,
`tensorboard --logdir <save_dir>/profile`) and Perfetto (ui.perfetto.dev) or chrome://tracing open a file.
The loop marks `data_wait`, `forward`, `backward` and `optimizer` ranges (core/train_loop.py).

Example:
    profiler = StepProfiler(start_step=10, num_steps=3, folder="runs/x/profile", rank=0)
    for step in ...:
        profiler.before(step); run_step(); profiler.after(step)
    profiler.close()
"""

from __future__ import annotations

import os

import torch

from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


class StepProfiler:
    """Profiles steps [start_step, start_step + num_steps) (1-based, counted across resumes) of this rank.

    Args:
        start_step / num_steps: the steps traced.
        folder: the run's `profile/` folder; this rank writes into `rank<r>/`.
        rank: this process's rank.
        record_shapes / profile_memory / with_stack: torch.profiler options (cost time, add detail).
    """

    def __init__(
        self,
        start_step: int,
        num_steps: int,
        folder: str,
        rank: int,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        self.first, self.last = start_step, start_step + num_steps - 1
        self.folder = os.path.join(folder, f"rank{rank}")
        self.options = {
            "record_shapes": record_shapes,
            "profile_memory": profile_memory,
            "with_stack": with_stack,
        }
        self._profile: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        if step == self.first and self._profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, **self.options)
            self._profile.__enter__()

    def after(self, step: int) -> None:
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when training ends before the last profiled step)."""
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(self.folder)(profile)
        logger.info("profile of steps %d-%d written to %s", self.first, self.last, self.folder)
