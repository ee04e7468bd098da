"""The TwHIN edge decoder: relation names and indices, id types, bounds, keyed errors, EdgeBatch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.projects.twhin.data.edges import EdgeBatch, EdgeDecoder, build_edge_dataset
from tml.projects.twhin.data.synthetic import generate_edges
from tml.reader.arrow_to_torch import DataError

pytestmark = pytest.mark.unit

RELATIONS = [("fav", 10, 5), ("follow", 10, 10)]


def _read(path, **kwargs) -> EdgeBatch:
    batches = list(build_edge_dataset(str(path), RELATIONS, 64, num_epochs=1, shuffle=False, **kwargs))
    return EdgeBatch(*(torch.cat([getattr(b, name) for b in batches]) for name in ("lhs", "rel", "rhs")))


def _write(tmp_path, lhs, rel, rhs, name="e.parquet"):
    pq.write_table(pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "rel",
    [pa.array(["follow", "fav", "follow"]), pa.array(["follow", "fav", "follow"], pa.large_string()),
     pa.array(["follow", "fav", "follow"]).dictionary_encode(), pa.array([1, 0, 1], pa.int32())],
)  # fmt: skip
def test_relation_names_or_indices_and_narrow_ids(tmp_path, rel):
    path = _write(tmp_path, pa.array([9, 0, 3], pa.int32()), rel, pa.array([9, 4, 0], pa.uint16()))
    batch = _read(path)
    assert (
        batch.rel.tolist() == [1, 0, 1]
        and batch.lhs.tolist() == [9, 0, 3]
        and batch.rhs.tolist() == [9, 4, 0]
    )
    assert {batch.lhs.dtype, batch.rel.dtype, batch.rhs.dtype} == {torch.int64} and batch.batch_size == 3


def test_dictionary_with_unused_unknown_names_is_fine(tmp_path):
    rel = pa.DictionaryArray.from_arrays(pa.array([1, 1], pa.int32()), pa.array(["retweet", "fav"]))
    assert _read(_write(tmp_path, [1, 2], rel, [3, 4])).rel.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("lhs", "rel", "rhs", "message"),
    [
        ([1, 2, 3], ["fav", "like", "like"], [0, 0, 0],
         r"column 'rel' row 1: unknown relation 'like' \(2 rows with unknown relations\); "
         r"the relations are \['fav', 'follow'\]"),
        ([1, 2, 3], [0, 1, 2], [0, 0, 0], r"column 'rel' row 2: relation index 2 is outside \[0, 2\)"),
        ([1, -4, 3], [0, 0, 0], [0, 0, 0], r"column 'lhs' row 1: id -4 is outside \[0, 10\)"),
        ([1, 2, 3], [1, 0, 1], [7, 7, 7],
         r"column 'rhs' row 1: id 7 is outside \[0, 5\), the rhs table of relation 'fav' \(1 rows out of range\)"),
        ([1, None, 3], [0, 0, 0], [0, 0, 0], r"column 'lhs' row 1 is null \(1 null rows\)"),
        ([1, 2, 3], ["fav", None, None], [0, 0, 0], r"column 'rel' row 1 is null \(2 null rows\)"),
        (pa.array([2**64 - 1, 1], pa.uint64()), [0, 0], [0, 0], r"column 'lhs' row 0: id 18446744073709551615"),
    ],
)  # fmt: skip
def test_bad_edges_name_file_row_group_column_and_row(tmp_path, lhs, rel, rhs, message):
    path = _write(tmp_path, lhs, rel, rhs)
    with pytest.raises(DataError, match=r"e\.parquet \(row group 0\): " + message):
        _read(path)


def test_wrong_types_and_missing_columns_are_caught_from_the_footer(tmp_path):
    _write(tmp_path, [1.5, 2.0], [0, 0], [0, 0])
    with pytest.raises(DataError, match=r"e\.parquet: column 'lhs' is double, expected integer ids"):
        build_edge_dataset(str(tmp_path), RELATIONS, 4)
    _write(tmp_path, [1, 2], [0.0, 1.0], [0, 0])
    with pytest.raises(DataError, match=r"e\.parquet: column 'rel' is double, expected relation indices"):
        build_edge_dataset(str(tmp_path), RELATIONS, 4)
    # Parquet reads integer dictionaries back as plain integers; an Arrow schema can still hold one.
    schema = pa.schema(
        [("lhs", pa.int64()), ("rel", pa.dictionary(pa.int32(), pa.int64())), ("rhs", pa.int64())]
    )
    with pytest.raises(DataError, match=r"x\.parquet: column 'rel' is dictionary<values=int64"):
        EdgeDecoder(RELATIONS).check_schema(schema, "x.parquet")
    pq.write_table(pa.table({"lhs": [1], "rhs": [2]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet: missing edge column 'rel'; the file's columns are"):
        build_edge_dataset(str(tmp_path), RELATIONS, 4)


@pytest.mark.parametrize(
    ("relations", "message"),
    [([], "relations must not be empty"), ([("fav", 10)], r"\(name, lhs_rows, rhs_rows\)"),
     ([("fav", 10, 0)], "relation 'fav': rhs_rows must be an int >= 1"),
     ([("fav", 1, 1), ("fav", 2, 2)], r"relation names repeat: \['fav'\]")],
)  # fmt: skip
def test_bad_relation_lists(tmp_path, relations, message):
    _write(tmp_path, [1], [0], [0])
    with pytest.raises(ValueError, match=message):
        build_edge_dataset(str(tmp_path), relations, 4)


def test_reads_the_synthetic_generator_output(tmp_path):
    relations = [("fav", "user", "tweet"), ("follow", "user", "user")]
    generate_edges({"user": 30, "tweet": 20}, relations, num_edges=500, output_dir=str(tmp_path), num_files=2)
    sizes = [("fav", 30, 20), ("follow", 30, 30)]
    dataset = build_edge_dataset(str(tmp_path), sizes, 64, rank=1, world_size=2, num_epochs=1)
    assert sum(batch.batch_size for batch in dataset) == dataset.plan_epoch(0).num_rows > 0


def test_edge_batch_moves_like_a_pipelineable():
    from torchrec.streamable import Pipelineable

    from tml.reader.batch import register_pipelineable

    batch = EdgeBatch(torch.tensor([0, 3]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, EdgeBatch) and moved.rhs.tolist() == [2, 2] and moved.batch_size == 2
    register_pipelineable(EdgeBatch)
    assert isinstance(batch, Pipelineable)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.lhs.is_pinned()
        on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
        on_gpu.record_stream(torch.cuda.current_stream())
        assert on_gpu.rel.device.type == "cuda"
    assert np.array_equal(batch.lhs.numpy(), [0, 3])
