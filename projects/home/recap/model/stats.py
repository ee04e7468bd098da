"""Per-feature statistics of sign(x)*log1p(|x|) for the z_score_log featurization.

`compute_continuous_stats` accumulates in float64 over any iterable of batches, ignoring non-finite values;
`save_stats` / `load_stats` write and read JSON through fsspec (local paths or any fsspec URL).
File format: {"feature": "continuous", "count": [C ints], "mean": [C floats], "std": [C floats]}.

Example:
    stats = compute_continuous_stats(batches)
    save_stats(stats, "/tmp/stats.json")
    stats = load_stats("/tmp/stats.json")  # ContinuousStats(mean=[...], std=[...], count=[...])
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

import fsspec
import torch

from tml.core.config.loader import ConfigError
from tml.ml_logging.log import get_logger
from tml.reader.batch import RecapBatch

logger = get_logger(__name__)


@dataclasses.dataclass
class ContinuousStats:
    """Population mean/std (per column) of the log-transformed values; count = finite values seen."""

    mean: list[float]
    std: list[float]
    count: list[int]
    feature: str = "continuous"

    @property
    def width(self) -> int:
        return len(self.mean)


def compute_continuous_stats(batches: Iterable[RecapBatch], feature: str = "continuous") -> ContinuousStats:
    """Mean and std per column of sign(x)*log1p(|x|) over every batch (non-finite values skipped)."""
    total = total_sq = count = None
    for batch in batches:
        if feature not in batch.dense:
            raise KeyError(f"batch.dense has no {feature!r} tensor (has: {sorted(batch.dense)})")
        x = batch.dense[feature].detach().to(torch.float64)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros_like(x))
        x = torch.sign(x) * torch.log1p(torch.abs(x))
        if total is None:
            total = torch.zeros(x.shape[1], dtype=torch.float64)
            total_sq = torch.zeros_like(total)
            count = torch.zeros(x.shape[1], dtype=torch.int64)
        elif x.shape[1] != total.shape[0]:
            raise ValueError(f"{feature!r} width changed between batches: {total.shape[0]} then {x.shape[1]}")
        total += x.sum(dim=0)
        total_sq += (x * x).sum(dim=0)
        count += finite.sum(dim=0)
    if total is None:
        raise ValueError("compute_continuous_stats: no batches")
    n = count.clamp(min=1).to(torch.float64)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0.0)
    return ContinuousStats(mean.tolist(), var.sqrt().tolist(), count.tolist(), feature)


def compute_stats_file(config, output: str | None) -> str:
    """`tml-recap compute-stats`: stats of `config.train_data` (one pass) to `output` or the path the
    config's z_score_log_config reads; returns the path."""
    from tml.reader.config import dense_widths
    from tml.reader.dataset import build_dataset

    z = config.model.featurization_config.z_score_log_config
    path = output or (z.analysis_path if z is not None else None)
    if path is None:
        raise ConfigError("compute-stats: give --output or set model.featurization_config.z_score_log_config")
    widths = dense_widths(config.train_data)
    if "continuous" not in widths:
        raise ConfigError(
            f"compute-stats: train_data has no dense tensor 'continuous' to take statistics of (its dense "
            f"tensors: {sorted(widths)}; seg_dense_schema / dense_columns)"
        )
    dataset = build_dataset(config.train_data, [], num_epochs=1, shuffle=False)
    if dataset.stats["rows"] == 0:
        raise ConfigError(f"compute-stats: train_data.inputs {config.train_data.inputs!r} hold no rows")
    save_stats(compute_continuous_stats(dataset), path)
    logger.info("statistics of %s written to %s", config.train_data.inputs, path)
    return path


def save_stats(stats: ContinuousStats, path: str) -> None:
    """Write the stats as JSON to `path` (any fsspec URL)."""
    with fsspec.open(path, "w") as f:
        json.dump(dataclasses.asdict(stats), f)


def load_stats(path: str) -> ContinuousStats:
    """Read stats written by `save_stats`; errors name the file and the problem."""
    try:
        with fsspec.open(path, "r") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: stats file not found (run `tml-recap compute-stats`)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} (z_score_log_config.analysis_path): not a JSON stats file ({e})") from e
    missing = {"mean", "std", "count"} - set(data) if isinstance(data, dict) else {"mean", "std", "count"}
    if missing:
        raise ConfigError(
            f"{path} (z_score_log_config.analysis_path): stats file lacks keys {sorted(missing)} "
            "(write it with `tml-recap compute-stats`)"
        )
    if not len(data["mean"]) == len(data["std"]) == len(data["count"]):
        raise ConfigError(
            f"{path} (z_score_log_config.analysis_path): mean, std and count have different lengths"
        )
    return ContinuousStats(
        [float(v) for v in data["mean"]],
        [float(v) for v in data["std"]],
        [int(v) for v in data["count"]],
        str(data.get("feature", "continuous")),
    )
