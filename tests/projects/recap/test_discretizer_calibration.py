"""`tml-recap calibrate-discretizer`: the quantile sketch's stated error, exact merging (two ranks give the
boundaries of one), the world-size-free sample, and bin ids that survive a re-calibration on shifted data."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.projects.home.recap.discretizer_calibration import QuantileSketch, sample_units

ENTRY = pa.map_(pa.int64(), pa.float32())
ROWS_PER_FILE, FILES, GROUP = 600, 3, 150


def _values(rng: np.random.Generator, n: int, shifted: bool) -> np.ndarray:
    """[n, 3]: lognormal counts, a column with many zeros (more when shifted), signed normals."""
    x = np.stack(
        [np.exp(rng.normal(2.0, 1.5, n)), np.exp(rng.normal(1.0, 1.0, n)), rng.normal(0.0, 3.0, n)], 1
    )
    zeros = rng.random(n) < (0.45 if shifted else 0.30)
    x[zeros, 1] = 0.0
    if shifted:  # the same features a day later: scaled and moved a little
        x[:, 0] *= 1.1
        x[:, 2] += 0.3
    return x.astype(np.float32)


def write_data(folder: str, shifted: bool, seed: int = 0) -> np.ndarray:
    """FILES files of ROWS_PER_FILE rows (row groups of GROUP): `continuous` [3] and a `counts` map whose
    id k (of 4) holds 10**k * a lognormal value; returns every row's continuous values."""
    import os

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, int(shifted)])
    out = []
    for f in range(FILES):
        x = _values(rng, ROWS_PER_FILE, shifted)
        counts = [
            [(k, float(10**k * math.exp(rng.normal()))) for k in range(4) if rng.random() < 0.5]
            for _ in range(ROWS_PER_FILE)
        ]
        table = pa.table(
            {
                "continuous": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3),
                "counts": pa.array(counts, ENTRY),
                "t": pa.array(rng.integers(0, 2, ROWS_PER_FILE)),
            }
        )
        pq.write_table(table, f"{folder}/part-{f}.parquet", row_group_size=GROUP)
        out.append(x)
    return np.concatenate(out)


def make_config(data: str, boundaries: str, max_rows: int | None):
    from tml.projects.home.recap.config import RecapConfig

    section = {
        "global_batch_size": 8,
        "seg_dense_schema": {"features": [{"name": "continuous", "length": 3}]},
        "sparse_continuous_features": [{"name": "counts", "column": "counts", "num_buckets": 4}],
        "tasks": {"t": {}},
        "num_workers": 2,
    }
    return RecapConfig.model_validate(
        {
            "training": {"save_dir": f"{boundaries}.run", "num_train_steps": 1},
            "model": {
                "tasks": {"t": {"mlp_config": {"layer_sizes": [1]}}},
                "discretizer": {
                    "features": ["continuous", "counts"],
                    "boundaries_path": boundaries,
                    "num_bins": 8,
                    "relative_accuracy": 0.002,
                    "max_rows": max_rows,
                },  # fmt: skip
                "sparse_linear": {"output_size": 4, "features": ["discretizer", "counts"]},
            },
            "train_data": {**section, "inputs": f"{data}/*.parquet"},
            "optimizer": {"sgd": {}, "single_task_learning_rate": {"constant": 0.1}},
        }
    )


def _calibrate_all(jobs: list[tuple[str, str, int | None]]) -> None:
    """Run on each rank: calibrate every (data folder, boundaries file, max_rows) in turn (several only on
    one rank: a process joins one group of several ranks, tml.core.distributed.init_distributed)."""
    from tml.core.distributed import run_distributed
    from tml.projects.home.recap.discretizer_calibration import calibrate_discretizer

    for data, boundaries, max_rows in jobs:
        run_distributed(
            lambda d=data, b=boundaries, m=max_rows: calibrate_discretizer(make_config(d, b, m), False)
        )


@pytest.mark.unit
def test_sketch_quantiles_lie_within_the_relative_accuracy_and_merging_is_exact():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [np.exp(rng.normal(0, 4, 50_000)), -np.exp(rng.normal(0, 2, 20_000)), np.zeros(5_000)]
    )
    features = rng.integers(0, 3, len(values))
    levels = np.arange(1, 32) / 32
    whole = QuantileSketch(0.01)
    whole.add(features, values)
    parts = [QuantileSketch(0.01) for _ in range(3)]
    for i, part in enumerate(parts):
        part.add(features[i::3], values[i::3])
    merged = QuantileSketch(0.01)
    for part in parts:
        merged.merge(part)
    assert np.array_equal(merged.keys, whole.keys) and np.array_equal(merged.counts, whole.counts)
    found = whole.quantiles(levels)
    for f in range(3):
        exact = np.sort(values[features == f])
        count, got = found[f]
        assert count == len(exact)
        truth = exact[np.floor(levels * (count - 1)).astype(int)]
        assert np.all(np.abs(got - truth) <= 0.01 * np.abs(truth) + 1e-30), f
    # Non-finite values are left out; tiny magnitudes count as zero.
    sketch = QuantileSketch(0.01)
    sketch.add(np.zeros(4, dtype=np.int64), np.array([np.nan, np.inf, 1e-35, 2.0]))
    count, got = sketch.quantiles(np.array([0.0, 1.0]))[0]
    assert count == 2 and got[0] == 0.0 and abs(got[1] - 2.0) <= 0.02


@pytest.mark.unit
def test_the_sample_depends_on_the_data_only():
    groups = [[100, 100, 0, 50], [80], [100, 100]]
    paths = [f"/a/data/p{i}.parquet" for i in range(3)]
    moved = [f"/b/elsewhere/p{i}.parquet" for i in range(3)]
    every = sample_units(paths, groups, None)
    assert sorted(every) == [(0, 0), (0, 1), (0, 3), (1, 0), (2, 0), (2, 1)]  # empty groups left out
    assert sample_units(moved, groups, None) == every
    some = sample_units(paths, groups, 250)
    assert some == every[: len(some)] and sum(groups[f][g] for f, g in some) >= 250
    assert sum(groups[f][g] for f, g in some[:-1]) < 250


@pytest.mark.distributed
def test_two_ranks_match_one_and_recalibration_keeps_bin_ids(run_ranks, tmp_path):
    from tml.projects.home.recap.model.discretizer import read_boundaries

    day1 = write_data(f"{tmp_path}/day1", shifted=False)
    write_data(f"{tmp_path}/day2", shifted=True)
    b = {name: f"{tmp_path}/{name}.json" for name in ["one", "sample1", "day2", "two", "sample2"]}
    run_ranks(_calibrate_all, 1, [(f"{tmp_path}/day1", b["one"], None), (f"{tmp_path}/day1", b["sample1"], 700),
                                  (f"{tmp_path}/day2", b["day2"], None)])  # fmt: skip
    for boundaries, max_rows in [(b["two"], None), (b["sample2"], 700)]:  # a multi-rank group per process
        run_ranks(_calibrate_all, 2, [(f"{tmp_path}/day1", boundaries, max_rows)])
    docs = {name: read_boundaries(path) for name, path in b.items()}

    # Two ranks read the same rows (the whole data, or the same sample) and merge counts exactly.
    assert docs["two"]["features"] == docs["one"]["features"] and docs["two"]["rows"] == FILES * ROWS_PER_FILE
    assert docs["sample2"]["features"] == docs["sample1"]["features"]
    assert docs["sample1"]["rows"] == 750 and docs["sample1"]["row_groups"] == 5
    # The stated error: each boundary is within relative_accuracy of the data's value at its level.
    for j in range(3):
        exact = np.sort(day1[:, j])
        entry = docs["one"]["features"][f"continuous[{j}]"]
        truth = exact[np.floor(np.array(entry["levels"]) / 8 * (len(exact) - 1)).astype(int)]
        assert np.all(np.abs(np.array(entry["boundaries"]) - truth) <= 0.002 * np.abs(truth) + 1e-30)
    # counts: id k holds 10**k times a lognormal, so its boundaries sit near 10**k * exp(normal quantiles).
    assert [docs["one"]["features"][f"counts:{k}"]["count"] for k in range(4)] == pytest.approx(
        [900] * 4, rel=0.1
    )
    assert docs["one"]["features"]["counts:3"]["boundaries"][3] == pytest.approx(1000.0, rel=0.15)

    # Day 2: every boundary moved, and every (feature, starting level) present on both days kept its id.
    ids = {day: _bin_ids(make_config("x", b[day], None), docs[day]) for day in ["one", "day2"]}
    new_levels = 0
    for key in [*(f"continuous[{j}]" for j in range(3)), *(f"counts:{k}" for k in range(4))]:
        old, new = docs["one"]["features"][key], docs["day2"]["features"][key]
        if key != "continuous[1]":
            assert old["levels"] == new["levels"] and old["boundaries"] != new["boundaries"], key
        shared = set(old["levels"]) & set(new["levels"])
        for level in [0, *shared]:
            assert ids["one"][key][level] == ids["day2"][key][level], (key, level)
        new_levels += len(set(new["levels"]) - set(old["levels"])) + len(
            set(old["levels"]) - set(new["levels"])
        )
    # continuous[1]: more zeros on day 2 tie more quantiles at 0; only the bins whose start moved change.
    old, new = docs["one"]["features"]["continuous[1]"], docs["day2"]["features"]["continuous[1]"]
    assert old["levels"][0] == new["levels"][0] == 1 and old["boundaries"][0] == new["boundaries"][0] == 0.0
    assert new_levels >= 1 and set(new["levels"]) < set(old["levels"])

    # What warm-started weights care about: a day-1 value and its day-2 counterpart share a bin id.
    x1 = day1[:2000]
    x2 = x1.copy()
    x2[:, 0] *= 1.1
    x2[:, 2] += 0.3
    same = [_row_ids(make_config("x", b[day], None), x) for day, x in (("one", x1), ("day2", x2))]
    agree = (same[0] == same[1]).mean(axis=0)
    assert agree[0] > 0.95 and agree[2] > 0.9, agree


def _bin_ids(config, document) -> dict[str, dict[int, int]]:
    """feature key -> starting level -> its bin id (level 0: below the first boundary)."""
    from tml.projects.home.recap.model.discretizer import hash_ids, level_text

    out = {}
    for key, entry in document["features"].items():
        levels = [0, *entry["levels"]]
        texts = [f"{key}|{level_text(level, 8)}" for level in levels]
        out[key] = dict(zip(levels, hash_ids(texts, config.model.discretizer.out_bits).tolist(), strict=True))
    return out


def _row_ids(config, x: np.ndarray) -> np.ndarray:
    import torch

    from tml.projects.home.recap.model.sparse_linear import build_sparse_features

    segment = build_sparse_features(config.model.discretizer, config.model.sparse_linear, config.train_data)
    (ids, _), _ = segment.discretizer({"continuous": torch.from_numpy(x)}, {"counts": _empty(len(x))})
    return ids.numpy()


def _empty(rows: int):
    import torch

    from tml.reader.batch import SparseValues

    return SparseValues(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(rows + 1, dtype=torch.int64)
    )


@pytest.mark.unit
def test_calibrate_refuses_to_overwrite_and_needs_a_section(tmp_path):
    from tml.core.config.loader import ConfigError
    from tml.projects.home.recap.discretizer_calibration import OutputExistsError, calibrate_discretizer

    config = make_config(str(tmp_path), str(tmp_path / "b.json"), None)
    (tmp_path / "b.json").write_text(json.dumps({}))
    with pytest.raises(OutputExistsError, match=r"boundaries_path .*b\.json' exists: pass --overwrite"):
        calibrate_discretizer(config, overwrite=False)
    # The same for a file behind an fsspec URL.
    import fsspec

    remote = f"memory://{tmp_path.name}/b.json"
    with fsspec.open(remote, "w") as f:
        f.write("{}")
    config = make_config(str(tmp_path), remote, None)
    with pytest.raises(
        OutputExistsError, match=r"boundaries_path 'memory://.*b\.json' exists: pass --overwrite"
    ):
        calibrate_discretizer(config, overwrite=False)
    config.model.discretizer = None
    config.model.sparse_linear = None
    with pytest.raises(ConfigError, match="the config has no model.discretizer section"):
        calibrate_discretizer(config, overwrite=True)
