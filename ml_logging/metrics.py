"""One metric logger with three sinks: console, `<save_dir>/metrics.jsonl` and TensorBoard.

Metric names are flat and namespaced (`train/loss`, `eval/<partition>/<task>/auroc`); every record carries
the step. The console gets a readable digest (evaluation tables, one learning rate per distinct value:
tml.ml_logging.console); metrics.jsonl and TensorBoard get every name. Only rank 0 writes; on other ranks
every call is a no-op.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from tml.ml_logging.console import console_messages
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


def _json_value(value: float) -> float | str:
    # JSON has no NaN/inf; keep them visible as strings instead of writing invalid JSON.
    return value if math.isfinite(value) else str(value)


class MetricLogger:
    """Write scalar metrics to the console, a JSON-lines file and TensorBoard event files.

    Args:
        save_dir: run folder; `metrics.jsonl` and `tensorboard/` go there (None: console only).
        rank: this process's rank; only rank 0 writes.
        console / jsonl / tensorboard: switch each sink.
        sinks: more destinations, each with `log_metrics(step, metrics)` (e.g. the MLflow sink).

    Example:
        metrics = MetricLogger("runs/x", rank=0)
        metrics.log(100, {"train/loss": 0.41, "train/examples_per_s": 5321.0})
        metrics.close()
    """

    def __init__(
        self,
        save_dir: str | None,
        rank: int = 0,
        console: bool = True,
        jsonl: bool = True,
        tensorboard: bool = True,
        sinks: Sequence = (),
    ) -> None:
        self.active = rank == 0
        self.console = console
        self.sinks = list(sinks)
        self._jsonl = None
        self._tb = None
        if not self.active or save_dir is None:
            return
        os.makedirs(save_dir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(save_dir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(save_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active or not metrics:
            return
        values = {name: float(value) for name, value in metrics.items()}
        if self.console:
            for message in console_messages(step, values):
                logger.info("%s", message)
        if self._jsonl is not None:
            record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()
        for sink in self.sinks:
            sink.log_metrics(step, values)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
