"""Sparse continuous features (id -> value): a map column or parallel id / value lists per row, delivered
as `batch.sparse_continuous[name]`; bad data and bad configs are keyed errors."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from tml.reader.config import DataConfig
from tml.reader.dataset import build_dataset
from tml.reader.decoder import DataError
from tml.reader.sparse import stable_hash

pytestmark = pytest.mark.unit

ENTRY = pa.map_(pa.int64(), pa.float32())


def _rows(n: int) -> list[list[tuple[int, float]]]:
    """Row u holds ids u, u+1, ... (u % 4 of them) with value id * 0.5 (row 3 holds (3, 1.5), (4, 2.0), ...)."""
    return [[(u + k, (u + k) * 0.5) for k in range(u % 4)] for u in range(n)]


def _table(n: int, **columns) -> pa.Table:
    rows = _rows(n)
    base = {
        "uid": pa.array(np.arange(n, dtype=np.int64)),
        "click": pa.array(np.arange(n) % 2),
        "m": pa.array(rows, ENTRY),
        "ids": pa.array([[i for i, _ in row] for row in rows], pa.list_(pa.int64())),
        "vals": pa.array([[v for _, v in row] for row in rows], pa.list_(pa.float64())),
    }
    return pa.table({**base, **columns})


def _config(path, features, **extra) -> DataConfig:
    return DataConfig.model_validate(
        {
            "inputs": str(path),
            "global_batch_size": 4,
            "dense_columns": [{"name": "u", "columns": ["uid"]}],
            "tasks": {"click": {}},
            "id_columns": ["uid"],
            "sparse_continuous_features": features,
            **extra,
        }
    )


MAP = {"name": "m", "column": "m", "num_buckets": 1000}
LISTS = {"name": "p", "ids_column": "ids", "values_column": "vals", "num_buckets": 5}


def test_map_and_lists_deliver_every_pair_with_its_row(tmp_path):
    pq.write_table(_table(24), tmp_path / "a.parquet", row_group_size=5)
    # Shuffled units and rows: pairs must stay with their row and with each other.
    config = _config(tmp_path / "a.parquet", [MAP, LISTS], shuffle={"seed": 3, "buffer_size": 10})
    seen = 0
    for batch in build_dataset(config, ["click"], num_epochs=1):
        for name, buckets in (("m", 1000), ("p", 5)):
            feature = batch.sparse_continuous[name]
            assert feature.ids.dtype == torch.int64 and feature.values.dtype == torch.float32
            assert len(feature.offsets) == batch.batch_size + 1
            for row, uid in enumerate(batch.ids["uid"].tolist()):
                lo, hi = int(feature.offsets[row]), int(feature.offsets[row + 1])
                expected = [(i % buckets, i * 0.5) for i, _ in _rows(uid + 1)[uid]]
                got = list(zip(feature.ids[lo:hi].tolist(), feature.values[lo:hi].tolist(), strict=True))
                assert got == expected, (name, uid)
        seen += batch.batch_size
    assert seen == 24


def test_string_ids_hash_like_sparse_features_and_null_rows_are_empty(tmp_path):
    column = pa.array([[("a", 1.0), ("b", 2.0)], None, [], [("a", 3.0)]], pa.map_(pa.string(), pa.float64()))
    pq.write_table(_table(4, m=column), tmp_path / "a.parquet")
    batch = next(iter(build_dataset(_config(tmp_path / "a.parquet", [MAP]), ["click"], shuffle=False)))
    feature = batch.sparse_continuous["m"]
    hashed = stable_hash(pa.array(["a", "b"])) % 1000
    assert feature.ids.tolist() == [hashed[0], hashed[1], hashed[0]]
    assert feature.values.tolist() == [1.0, 2.0, 3.0]
    assert feature.offsets.tolist() == [0, 2, 2, 2, 3]


def test_non_finite_values_follow_the_nan_policy(tmp_path):
    column = pa.array([[(1, math.nan)], [(2, 1.0), (3, math.inf)], [], []], ENTRY)
    pq.write_table(_table(4, m=column), tmp_path / "a.parquet")
    dataset = build_dataset(_config(tmp_path / "a.parquet", [MAP]), ["click"], num_epochs=1, shuffle=False)
    (batch,) = list(dataset)
    assert batch.sparse_continuous["m"].values.tolist() == [0.0, 1.0, 0.0]
    assert dataset.stats["nonfinite/m"] == 2
    strict = _config(tmp_path / "a.parquet", [MAP], preprocess={"nan_policy": "error"})
    with pytest.raises(
        DataError, match=r"a\.parquet \(row group 0\): column for sparse continuous 'm' has 2"
    ):
        next(iter(build_dataset(strict, ["click"], shuffle=False)))


def _decode_error(tmp_path, table, features, match):
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    dataset = build_dataset(_config(tmp_path / "a.parquet", features), ["click"], shuffle=False)
    with pytest.raises(DataError, match=match):
        list(dataset)


def test_bad_values_name_file_row_group_column_and_row(tmp_path):
    # Row 6 of the file is row 2 of row group 1.
    values = [[v for _, v in row] for row in _rows(8)]
    values[6] = values[6][:-1]
    _decode_error(
        tmp_path,
        _table(8, vals=pa.array(values, pa.list_(pa.float64()))),
        [LISTS],
        r"a\.parquet \(row group 1\): row 2 holds 2 ids in column 'ids' and 1 values in column 'vals'",
    )
    rows = _rows(8)
    rows[5] = [(5, None)]
    _decode_error(
        tmp_path,
        _table(8, m=pa.array(rows, ENTRY)),
        [MAP],
        r"a\.parquet \(row group 1\): column 'm' row 1 holds a null value",
    )
    ids = [[i for i, _ in row] for row in _rows(8)]
    ids[3] = [3, None, 5]
    _decode_error(
        tmp_path,
        _table(8, ids=pa.array(ids, pa.list_(pa.int64()))),
        [LISTS],
        r"a\.parquet \(row group 0\): column 'ids' row 3 holds a null id",
    )


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("m", pa.array([[("a", "x")]] * 4, pa.map_(pa.string(), pa.string())),
         r"feature 'm': column 'm' is map<string, string.*>, expected map<int or string, number>"),
        ("m", pa.array([[1.0]] * 4), r"feature 'm': column 'm' is list<.*double>, expected map"),
        ("ids", pa.array([[1.5]] * 4), r"feature 'p': ids column 'ids' is list<.*double>, expected a list of int"),
        ("vals", pa.array([["x"]] * 4), r"feature 'p': values column 'vals' is list<.*string>, expected a list of numbers"),
    ],
)  # fmt: skip
def test_wrong_types_fail_at_construction(tmp_path, column, value, match):
    pq.write_table(_table(4, **{column: value}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: sparse continuous " + match):
        build_dataset(_config(tmp_path / "a.parquet", [MAP, LISTS]), ["click"])
    pq.write_table(_table(4).drop_columns(["vals"]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"missing sparse continuous feature 'p' column 'vals'"):
        build_dataset(_config(tmp_path / "a.parquet", [LISTS]), ["click"])


@pytest.mark.parametrize(
    ("feature", "match"),
    [
        ({"name": "x", "num_buckets": 4}, r"exactly one of \[column, ids_column\] must be set, got: none"),
        ({"name": "x", "column": "m", "ids_column": "i", "values_column": "v", "num_buckets": 4}, "exactly one"),
        ({"name": "x", "ids_column": "i", "num_buckets": 4}, "ids_column and values_column go together"),
        ({"name": "x", "column": "m", "values_column": "v", "num_buckets": 4}, "values_column belongs to ids_column"),
        ({"name": "x", "column": "m"}, "num_buckets"),
        ({"name": "x", "column": "m", "num_buckets": 0}, "num_buckets"),
    ],
)  # fmt: skip
def test_config_errors(feature, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        _config("x", [feature])


def test_names_are_shared_with_sparse_features():
    with pytest.raises(pydantic.ValidationError, match=r"names \['m'\] are used twice"):
        _config("x", [MAP], sparse_features=[{"name": "m", "column": "uid"}])
