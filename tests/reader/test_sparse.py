"""Sparse columns -> KeyedJaggedTensor: int, string, multi-hot lists, nulls, buckets, stable hashing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.reader.dataset import build_dataset
from tml.reader.sparse import SparseSpec, decode_sparse, stable_hash

pytestmark = pytest.mark.unit


def test_stable_hash_is_fnv1a_64():
    # Published FNV-1a 64 test vectors, top bit cleared: "" -> cbf29ce484222325, "a" -> af63dc4c8601ec8c,
    # "foobar" -> 85944171f73967e8.
    hashed = stable_hash(pa.array(["", "a", "foobar", "a", None]).drop_null()).tolist()
    assert hashed == [0x4BF29CE484222325, 0x2F63DC4C8601EC8C, 0x05944171F73967E8, 0x2F63DC4C8601EC8C]


def test_decode_multi_hot_with_nulls_and_buckets():
    column = pa.array([[3, 14], [], None, [15, None, 9]], pa.list_(pa.int64()))
    values, offsets = decode_sparse(column, SparseSpec("f", "c", num_buckets=10), "x.parquet")
    assert values.tolist() == [3, 4, 5, 9] and offsets.tolist() == [0, 2, 2, 2, 4]
    values, offsets = decode_sparse(pa.array(["a", None, "b"]), SparseSpec("f", "c"), "x.parquet")
    assert offsets.tolist() == [0, 1, 1, 2] and values.tolist() == stable_hash(pa.array(["a", "b"])).tolist()


def test_kjt_from_parquet_exact(tmp_path, rd):
    table = rd.make_table(6).append_column(
        "tags", pa.array([["x", "y"], None, ["x"], [], ["z", "z", "x"], ["y"]], pa.list_(pa.string()))
    )
    table = table.append_column("country", pa.array([7, -3, 12, 7, 0, 5], pa.int64()))
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    config = rd.base_config(
        str(tmp_path),
        global_batch_size=6,
        shuffle={"shuffle_files": False},
        sparse_features=[
            {"name": "topics", "column": "topics"},
            {"name": "tags", "column": "tags", "num_buckets": 1000},
            {"name": "country", "column": "country", "num_buckets": 10},
        ],
    )
    kjt = next(iter(build_dataset(config, ["click"]))).sparse
    assert kjt.keys() == ["topics", "tags", "country"]
    # topics: uid % 4 != 0 -> [uid % 7, uid % 11] (rows 0 and 4 empty), batches span two row groups.
    assert kjt["topics"].lengths().tolist() == [0, 2, 2, 2, 0, 2]
    assert kjt["topics"].values().tolist() == [1, 1, 2, 2, 3, 3, 5, 5]
    x, y, z = (stable_hash(pa.array([s])).item() % 1000 for s in "xyz")
    assert kjt["tags"].lengths().tolist() == [2, 0, 1, 0, 3, 1]
    assert kjt["tags"].values().tolist() == [x, y, x, z, z, x, y]
    assert kjt["country"].values().tolist() == [7, 7, 2, 7, 0, 5]
    assert kjt["country"].lengths().tolist() == [1] * 6 and kjt.values().dtype == torch.int64


def test_shuffled_windows_keep_rows_together(tmp_path, rd):
    rd.write(tmp_path / "a.parquet", 40)
    config = rd.base_config(
        str(tmp_path), global_batch_size=40, shuffle={"buffer_size": 40},
        sparse_features=[{"name": "topics", "column": "topics"}],
    )  # fmt: skip
    batch = next(iter(build_dataset(config, ["click"])))
    uid = batch.ids["uid"]
    assert sorted(uid.tolist()) == list(range(40)) and uid.tolist() != list(range(40))
    topics = batch.sparse["topics"].to_dense()
    for row, u in enumerate(uid.tolist()):
        assert topics[row].tolist() == ([u % 7, u % 11] if u % 4 else [])
        assert batch.dense["continuous"][row, 0] == u * 10


@pytest.mark.parametrize("num_buckets", [1, 7, 1000, 2**63 - 1])
def test_ids_always_within_num_buckets(num_buckets):
    extremes = [-(2**63), -1, 0, 5, 2**63 - 1, -123456789]
    columns = [
        pa.array(extremes, pa.int64()),
        pa.array([-(2**31), -7, 2**31 - 1], pa.int32()),
        pa.array([2**64 - 1, 2**63, 3], pa.uint64()),  # past int64: wrap to negatives before the modulo
        pa.array(["", "a", "foobar", None, "ünïcode"]),
        pa.array([extremes, None, [-3, None, 4]], pa.list_(pa.int64())),
        pa.array([["x", "y"], [], None], pa.list_(pa.large_string())),
    ]
    for column in columns:
        values, _ = decode_sparse(column, SparseSpec("f", "c", num_buckets=num_buckets), "x.parquet")
        assert len(values) and bool(((values >= 0) & (values < num_buckets)).all()), (column.type, values)


def test_ids_bounded_in_the_kjt_the_reader_delivers(tmp_path, rd):
    table = rd.make_table(6).append_column("neg", pa.array([[-(2**63), -5], [-1], [], [2**62], [-9], [3]]))
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    config = rd.base_config(
        str(tmp_path),
        global_batch_size=6,
        sparse_features=[{"name": "neg", "column": "neg", "num_buckets": 10}],
    )
    values = next(iter(build_dataset(config, ["click"]))).sparse["neg"].values()
    assert sorted(values.tolist()) == sorted([(-(2**63)) % 10, 5, 9, 2**62 % 10, 1, 3])
    with pytest.raises(ValueError, match="num_buckets"):
        rd.base_config(str(tmp_path), sparse_features=[{"name": "n", "column": "neg", "num_buckets": 2**63}])
