"""`tml-recap calibrate-discretizer`: percentile boundaries of every discretized feature, from a sample of
train_data, into `model.discretizer.boundaries_path` (format: model/discretizer.py).

**The sample** is a set of whole row groups fixed by the data alone: every non-empty row group of
train_data, ordered by a hash of (file name relative to the files' common folder, row group index), is
taken in that order until `max_rows` rows are in (None: all). Rank r of W reads the sampled row groups
r, r + W, ...; every row of the sample is read exactly once, whatever W.

**The sketch** (`QuantileSketch`, DDSketch: Masson et al., VLDB 2019) counts values per feature in
logarithmic buckets of relative width `relative_accuracy` (`(1 + a) / (1 - a)` apart; values of magnitude
below 1e-30 count as 0, non-finite ones are left out), so that a quantile read from it lies within
relative error `a` of the data's value at that rank. Merging two sketches adds their counts, which is
exact: rank 0 gathers every rank's sketch, and the boundaries of W ranks are **identical** to those of
one process over the same sample (tests/projects/recap/test_discretizer_calibration.py). Boundaries are
cut at the levels `i / num_bins`, i = 1 .. num_bins - 1 (rank `q * (n - 1)` of a feature's n values);
equal neighbours merge into one boundary, which keeps the lowest level (the bin's identity: see
model/discretizer.py).

Memory: one count per (feature, bucket) holding data, e.g. a feature spanning 8 decades with a = 0.005
uses about 1,800 buckets.

Example:
    path = calibrate_discretizer(config, overwrite=False)   # under run_distributed, on every rank
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tml.core.config.loader import ConfigError
from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.projects.home.recap.model.discretizer import (
    FORMAT,
    KEY,
    VERSION,
    DiscretizedInput,
    discretized_inputs,
    write_boundaries,
)
from tml.projects.home.recap.model.sparse_linear import calibration_settings
from tml.reader.fs import filesystem_for, list_inputs, open_input
from tml.reader.pipeline import BACKGROUND_WORKERS
from tml.reader.ranking import DecodePlan, check_schema, decode_table, sparse_values
from tml.reader.schema import resolve_dense_specs
from tml.reader.sparse import SparseContinuousSpec, stable_hash

logger = get_logger(__name__)

MODES = {
    "calibrate-discretizer": "percentile bin boundaries of model.discretizer.features from a sample of "
    "train_data, into model.discretizer.boundaries_path",
}
ARGS = {
    "calibrate-discretizer": [
        ("--overwrite", {"action": "store_true", "help": "replace an existing boundaries file"}),
    ],
}

MIN_MAGNITUDE = 1e-30


class OutputExistsError(UserError, FileExistsError):
    """The boundaries file exists and --overwrite was not given."""


class QuantileSketch:
    """Mergeable relative-error quantile sketch of many features at once (module docstring).

    Args:
        relative_accuracy: a, in (0, 0.1].

    Example:
        sketch = QuantileSketch(0.005)
        sketch.add(features=np.array([0, 0, 1]), values=np.array([1.0, 5.0, -2.0]))
        sketch.merge(other)
        sketch.quantiles(np.array([0.5]))   # {feature: (count, [value at each level])}
    """

    def __init__(self, relative_accuracy: float) -> None:
        self.relative_accuracy = relative_accuracy
        gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self.log_gamma = math.log(gamma)
        self.gamma = gamma
        # Signed bucket index s: 0 for |x| < MIN_MAGNITUDE, +-(k - lowest + 1) for x = +-|x| in bucket k, so
        # that s orders like the values; a feature's keys are `feature * stride + s + half`.
        self.lowest = math.ceil(math.log(MIN_MAGNITUDE) / self.log_gamma)
        highest = math.ceil(math.log(float(np.finfo(np.float64).max)) / self.log_gamma)
        self.half = highest - self.lowest + 1
        self.stride = 2 * self.half + 1
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def _signed(self, values: np.ndarray) -> np.ndarray:
        magnitude = np.abs(values)
        small = magnitude < MIN_MAGNITUDE
        k = np.ceil(np.log(np.where(small, 1.0, magnitude)) / self.log_gamma).astype(np.int64)
        s = k - self.lowest + 1
        return np.where(small, 0, np.where(values < 0, -s, s))

    def add(self, features: np.ndarray, values: np.ndarray) -> None:
        """Count `values` [n] (float) of `features` [n] (int64 indices)."""
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        features, values = np.asarray(features, dtype=np.int64)[finite], values[finite]
        keys, counts = np.unique(
            features * self.stride + self._signed(values) + self.half, return_counts=True
        )
        self._combine(keys, counts.astype(np.int64))

    def merge(self, other: QuantileSketch) -> None:
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError("sketches of different relative accuracies do not merge")
        self._combine(other.keys, other.counts)

    def _combine(self, keys: np.ndarray, counts: np.ndarray) -> None:
        keys, inverse = np.unique(np.concatenate([self.keys, keys]), return_inverse=True)
        self.counts = np.bincount(inverse, weights=np.concatenate([self.counts, counts]).astype(np.float64))
        self.counts = np.rint(self.counts).astype(np.int64)
        self.keys = keys

    def state(self) -> dict:
        return {"relative_accuracy": self.relative_accuracy, "keys": self.keys, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict) -> QuantileSketch:
        sketch = cls(state["relative_accuracy"])
        sketch.keys, sketch.counts = state["keys"], state["counts"]
        return sketch

    def _value(self, keys: np.ndarray) -> np.ndarray:
        """The representative value of each bucket key: within relative error a of every value it counted."""
        s = keys % self.stride - self.half
        k = np.abs(s) + self.lowest - 1
        magnitude = 2.0 * np.exp(k * self.log_gamma) / (self.gamma + 1.0)
        return np.where(s == 0, 0.0, np.sign(s) * magnitude)

    def quantiles(self, levels: np.ndarray) -> dict[int, tuple[int, np.ndarray]]:
        """feature -> (count, values [len(levels)] at ranks `level * (count - 1)`), for every feature with
        data."""
        if not len(self.keys):
            return {}
        features = self.keys // self.stride
        starts = np.flatnonzero(np.r_[True, features[1:] != features[:-1]])
        ends = np.r_[starts[1:], len(features)]
        cumulative = np.cumsum(self.counts)
        before = np.r_[0, cumulative[:-1]][starts]
        totals = cumulative[ends - 1] - before
        # The first bucket of each feature whose cumulative count exceeds the target rank.
        targets = before[:, None] + levels[None, :] * (totals[:, None] - 1)
        index = np.searchsorted(cumulative, targets, side="right")
        values = self._value(self.keys[np.minimum(index, ends[:, None] - 1)])
        return {
            int(features[start]): (int(total), values[i])
            for i, (start, total) in enumerate(zip(starts, totals, strict=True))
        }


def _plan(inputs: list[DiscretizedInput], data) -> DecodePlan:
    """The reader's plan of the discretized columns only (same truncation, masks, NaN policy, id buckets)."""
    dense = {spec.name: spec for spec in resolve_dense_specs(data)}
    sparse = {f.name: f for f in data.sparse_continuous_features}
    return DecodePlan(
        dense=tuple(dense[i.name] for i in inputs if i.keys is not None),
        labels=(),
        label_rates=None,
        weight_column=None,
        id_columns=(),
        sparse=(),
        nan_policy=data.preprocess.nan_policy,
        sparse_continuous=tuple(
            SparseContinuousSpec(f.name, f.column, f.ids_column, f.values_column, f.num_buckets)
            for f in (sparse[i.name] for i in inputs if i.keys is None)
        ),
    )


def sample_units(
    paths: list[str], row_groups: list[list[int]], max_rows: int | None
) -> list[tuple[int, int]]:
    """The sampled (file index, row group) units, in sample order (module docstring)."""
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    units = [(f, g, rows) for f, groups in enumerate(row_groups) for g, rows in enumerate(groups) if rows]
    if not units:
        return []
    names = [f"{posixpath.relpath(paths[f], root)}#{g}" for f, g, _ in units]
    order = np.argsort(stable_hash(pa.array(names)), kind="stable")
    picked, total = [], 0
    for i in order:
        if max_rows is not None and total >= max_rows:
            break
        f, g, rows = units[i]
        picked.append((f, g))
        total += rows
    return picked


def _offsets(inputs: list[DiscretizedInput]) -> list[int]:
    """First feature index of each input in the sketch's index space."""
    sizes = [len(i.keys) if i.keys is not None else i.num_buckets for i in inputs]
    return np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64).tolist()


def _sketch_unit(fs, path: str, group: int, plan: DecodePlan, inputs, offsets, accuracy: float):
    with open_input(fs, path) as handle:
        table = pq.ParquetFile(handle).read_row_group(group, columns=plan.columns())
    chunk, _ = decode_table(table, f"{path} (row group {group})", plan)
    sketch = QuantileSketch(accuracy)
    for item, offset in zip(inputs, offsets, strict=True):
        if item.keys is not None:
            values = chunk.tensors[("dense", item.name)].numpy()
            columns = np.broadcast_to(np.arange(values.shape[1], dtype=np.int64), values.shape)
            sketch.add(columns.reshape(-1) + offset, values.reshape(-1))
        else:
            feature = sparse_values(chunk, item.name)
            sketch.add(feature.ids.numpy() + offset, feature.values.numpy())
    return sketch, table.num_rows


def _boundaries(sketch: QuantileSketch, inputs, offsets, num_bins: int) -> dict:
    levels = np.arange(1, num_bins) / num_bins
    found = sketch.quantiles(levels)
    features = {}
    for item, offset in zip(inputs, offsets, strict=True):
        names = item.keys if item.keys is not None else [f"{item.name}:{i}" for i in range(item.num_buckets)]
        for index, name in enumerate(names):
            if offset + index not in found:
                continue  # a sparse id never seen (a dense column always has rows)
            count, values = found[offset + index]
            kept_levels, kept = [], []
            for level, value in zip(range(1, num_bins), values.tolist(), strict=True):
                if not kept or value > kept[-1]:
                    kept_levels.append(level)
                    kept.append(value)
            features[name] = {"levels": kept_levels, "boundaries": kept, "count": count}
    return features


def calibrate_discretizer(config, overwrite: bool) -> str:
    """`tml-recap calibrate-discretizer` on every rank of the job; rank 0 writes the file. Returns its path."""
    import torch.distributed as dist

    from tml.core import run

    settings = config.model.discretizer
    if settings is None:
        raise ConfigError(f"calibrate-discretizer: the config has no {KEY} section")
    path = settings.boundaries_path
    if _exists(path) and not overwrite:
        raise OutputExistsError(
            f"{KEY}.boundaries_path {path!r} exists: pass --overwrite to replace it (checkpoints trained with "
            "it then read other bins; calibrate into a new file to warm start a new run instead)"
        )
    data = config.train_data
    inputs = discretized_inputs(settings.features, data)
    plan = _plan(inputs, data)
    env = run.start(config.training)
    start = time.perf_counter()
    fs, paths = list_inputs(data.inputs)
    # This command decodes in a pool of its own, with no training beside it: auto means the background count.
    workers = max(BACKGROUND_WORKERS if data.num_workers is None else data.num_workers, 1)
    with concurrent.futures.ThreadPoolExecutor(max(workers, 4)) as pool:
        footers = list(pool.map(lambda p: _footer(fs, p, plan), paths))
    units = sample_units(paths, [[f.row_group(g).num_rows for g in range(f.num_row_groups)] for f in footers],
                         settings.max_rows)  # fmt: skip
    mine = units[env.rank :: env.world_size]
    offsets = _offsets(inputs)
    sketch, rows = QuantileSketch(settings.relative_accuracy), 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(_sketch_unit, fs, paths[f], g, plan, inputs, offsets, settings.relative_accuracy)
            for f, g in mine
        ]
        for job in jobs:
            part, count = job.result()
            sketch.merge(part)
            rows += count
    states = [None] * env.world_size
    dist.all_gather_object(states, (sketch.state(), rows))
    merged = QuantileSketch(settings.relative_accuracy)
    for state, _ in states:
        merged.merge(QuantileSketch.from_state(state))
    total = sum(count for _, count in states)
    if total == 0:
        raise ConfigError(
            f"calibrate-discretizer: train_data.inputs {data.inputs!r} hold no rows to calibrate on"
        )
    document = {
        "format": FORMAT,
        "version": VERSION,
        "calibration": calibration_settings(settings),
        "inputs": [item.describe() for item in inputs],
        "rows": total,
        "row_groups": len(units),
        "source": data.inputs,
        "features": _boundaries(merged, inputs, offsets, settings.num_bins),
    }
    if env.is_main:
        write_boundaries(path, document)
        logger.info(
            "discretizer: boundaries of %d features from %d rows (%d row groups, %d ranks) in %.1f s -> %s",
            len(document["features"]),
            total,
            len(units),
            env.world_size,
            time.perf_counter() - start,
            path,
        )
    dist.barrier()
    return path


def _footer(fs, path: str, plan: DecodePlan) -> pq.FileMetaData:
    with open_input(fs, path) as handle:
        parquet = pq.ParquetFile(handle)
        check_schema(parquet.schema_arrow, path, plan)
        return parquet.metadata


# -- the plan's `calibrate-discretizer` phase (projects/home/recap/plan.py), before `train` -----------
def phase_needs(config) -> str | None:
    return None if config.model.discretizer is not None else f"the config has no {KEY} section"


def phase_inputs(config) -> dict:
    from tml.projects.home.recap.plan import _HOW, _dump, _without

    dump = _dump(config)
    return {
        "discretizer": dump["model"]["discretizer"],
        "train_data": _without(dump["train_data"], _HOW["data"]),
    }


def _trained_with_it(config) -> str | None:
    from tml.core.checkpoint import complete_steps

    steps = complete_steps(os.path.join(config.training.save_dir, "checkpoints"))
    if not steps:
        return None
    return (
        f"training.save_dir {config.training.save_dir!r} holds checkpoints (step {steps[-1]}) trained with "
        f"the bins of {config.model.discretizer.boundaries_path!r}, which calibrating again would change. Write "
        f"the new bins to a new {KEY}.boundaries_path for a new training.save_dir (training."
        "initial_checkpoint_dir=<this save_dir> warm starts it: bin ids stay stable across calibrations)"
    )


def _exists(path: str) -> bool:
    """Whether the boundaries file exists, for a local path or an fsspec URL."""
    fs, inner = filesystem_for(path)
    return fs.exists(inner)


def phase_run(config) -> dict:
    """Calibrate (replacing the file) unless save_dir holds checkpoints trained with the existing file."""
    from tml.projects.home.recap.plan import PlanError, _sha256

    path = config.model.discretizer.boundaries_path
    refusal = _trained_with_it(config)
    if refusal is not None and _exists(path):
        raise PlanError(f"plan: phase 'calibrate-discretizer': {refusal}")
    calibrate_discretizer(config, overwrite=True)
    return {"file": path, "sha256": _sha256(path), "paths": [path]}


def run_mode(args: argparse.Namespace, config) -> None:
    """Run calibrate-discretizer with the loaded `config` on every rank of the job."""
    from tml.core.distributed import run_distributed

    run_distributed(lambda: calibrate_discretizer(config, args.overwrite))
