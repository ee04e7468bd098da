"""Read a run folder back: its resolved `config.yaml` and the metric history in `metrics.jsonl`.

A run folder is what `training.save_dir` names. `config.yaml` is written when the run starts, so a folder
without it is not a run; `metrics.jsonl` grows while the run trains and may be absent (nothing logged yet)
or end in a half-written line (the writer is mid-append), which is skipped.

Example:
    run = read_run("runs/lr-3e-3")
    run.config["optimizer"]["adam"]["lr"]     # 0.003
    run.history["train/loss"]                 # [(100, 0.52), (200, 0.47), ...]
    final_metrics("runs/lr-3e-3")             # {"train/loss": 0.41, "eval/valid/fav/auroc": 0.73, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Leaves of `eval/...` names that measure the model; the others (count, weight_sum, mean_label,
# mean_prediction) describe the evaluation data and are equal across runs on the same data.
QUALITY_METRICS = ("auroc", "pr_auc", "log_loss", "rce", "nrce", "calibration")


class NotARunError(ValueError):
    """A folder given as a run has no `config.yaml` (or is no folder at all)."""


@dataclasses.dataclass
class Run:
    """One run folder read back.

    Args:
        path: the folder as given.
        config: the parsed `config.yaml` (nested dicts and lists).
        history: metric name -> [(step, value), ...] by step (see `read_metrics`); NaN/inf come back
            as floats.
    """

    path: str
    config: dict[str, Any]
    history: dict[str, list[tuple[int, float]]]

    @property
    def last_step(self) -> int | None:
        """The highest step any metric was logged at (None: nothing logged yet)."""
        return max((points[-1][0] for points in self.history.values()), default=None)


def read_run(path: str) -> Run:
    """Read `path`'s config.yaml and metrics.jsonl.

    Raises:
        NotARunError: `path` is not a folder or has no config.yaml (the message names both).
        ValueError: config.yaml is not a YAML mapping, or a complete line of metrics.jsonl is not a
            JSON record with an integer `step` (naming the file and line).
    """
    if not os.path.isdir(path):
        raise NotARunError(f"{path}: no such folder")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise NotARunError(f"{path} is not a run folder: it has no {CONFIG_FILE}{_runs_inside_hint(path)}")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{config_path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping of config sections, got {type(config).__name__}")
    return Run(path, config, read_metrics(os.path.join(path, METRICS_FILE)))


def _runs_inside_hint(path: str) -> str:
    inner = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, CONFIG_FILE)))
    if not inner:
        return ""
    shown = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
    return f" (it holds run folders: {shown}; pass those, e.g. {os.path.join(path, '*')})"


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(step, value), ...] by step from a metrics.jsonl file ({} when there is none).

    A step logged twice keeps its later value: a run resumed from a checkpoint before its last logged
    step logs those steps again, and the second attempt is the one that continued.
    """
    by_step: dict[str, dict[int, float]] = {}
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline yet: the writer is appending this record right now
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from err
        step = record.pop("step", None) if isinstance(record, dict) else None
        if not isinstance(step, int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        for name, value in record.items():
            by_step.setdefault(name, {})[step] = _float(value, path, number, name)
    return {name: sorted(values.items()) for name, values in by_step.items()}


def _float(value: Any, path: str, number: int, name: str) -> float:
    # MetricLogger writes NaN and inf as the strings "nan", "inf", "-inf" (JSON has no such numbers).
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{number}: metric {name!r} has a non-numeric value {value!r}") from None


def first_partition(names: list[str]) -> str | None:
    """The partition of the first `eval/<partition>/...` name (runs log their partitions in config order)."""
    for name in names:
        parts = name.split("/")
        if parts[0] == "eval" and len(parts) >= 4:
            return parts[1]
    return None


def default_metrics(names: list[str]) -> list[str]:
    """`train/loss` and the model-quality metrics of the first evaluation partition, whole-partition only
    (`eval/<partition>/<task>/<metric>`, no `<stratifier>=<value>` segments), in logged order."""
    partition = first_partition(names)
    chosen = [name for name in names if name == "train/loss"]
    for name in names:
        parts = name.split("/")
        if (
            len(parts) == 4
            and parts[0] == "eval"
            and parts[1] == partition
            and parts[3] in QUALITY_METRICS
            and "=" not in parts[2]
        ):
            chosen.append(name)
    return chosen


def final_metrics(save_dir: str, names: list[str] | None = None) -> dict[str, float]:
    """The last logged value of each metric in `names` (default: `default_metrics`) of a run folder's
    metrics.jsonl; finite values only, since a NaN cannot be ranked or compared."""
    history = read_metrics(os.path.join(save_dir, METRICS_FILE))
    chosen = default_metrics(list(history)) if names is None else names
    last = {name: history[name][-1][1] for name in chosen if name in history}
    return {name: value for name, value in last.items() if math.isfinite(value)}
