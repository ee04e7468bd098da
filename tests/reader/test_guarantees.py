"""The engine's guarantees, checked through both decoders (ranking RecapBatch-es and TwHIN EdgeBatch-es)
and every way of decoding (background threads, num_workers = 2; the consuming thread, num_workers = 0; a
separate process, decode_process).

Every row exactly once per epoch on 1 and several ranks (one dataset per rank in one process), short last
batches kept, the stream after a resume equal to the tail of the uninterrupted one, and decode errors
naming the file, the row group and the column.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.projects.twhin.data.edges import build_edge_dataset
from tml.reader.arrow_to_torch import DataError
from tml.reader.dataset import build_dataset

pytestmark = pytest.mark.unit

KINDS = ["ranking", "edges"]
RELATIONS = [("fav", 1000, 50), ("follow", 1000, 1000)]


def _edges(num_rows: int, first_id: int) -> pa.Table:
    """Edge i has lhs = first_id + i (its row id), rel alternating, rhs = lhs % 50."""
    lhs = np.arange(first_id, first_id + num_rows, dtype=np.int64)
    return pa.table({"lhs": lhs, "rel": lhs % 2, "rhs": lhs % 50})


def _write(kind, rd, path, num_rows, first_id, row_group_size=16):
    if kind == "ranking":
        rd.write(path, num_rows, first_id, row_group_size)
    else:
        pq.write_table(_edges(num_rows, first_id), path, row_group_size=row_group_size)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(params=[(2, False), (0, False), (0, True)], ids=["threads", "inline", "process"])
def workers(request):
    """(num_workers, decode_process)."""
    return request.param


@pytest.fixture
def data(kind, rd, tmp_path):
    """Files of 40, 7 and 25 rows (row ids 0..71, row groups of 16, 16, 10) and an empty one."""
    for name, rows, first, group in (("a", 40, 0, 16), ("b", 7, 40, 16), ("c", 25, 47, 10), ("d", 0, 0, 16)):
        _write(kind, rd, tmp_path / f"{name}.parquet", rows, first, group)
    return tmp_path


def _dataset(kind, rd, inputs, global_batch_size, workers, rank=0, world_size=1, num_epochs=2, buffer_size=8):
    if kind == "ranking":
        config = rd.base_config(
            str(inputs), global_batch_size=global_batch_size, num_epochs=num_epochs,
            shuffle={"seed": 3, "buffer_size": buffer_size}, num_workers=workers[0], decode_process=workers[1],
        )  # fmt: skip
        return build_dataset(config, ["click"], rank=rank, world_size=world_size)
    return build_edge_dataset(
        str(inputs), RELATIONS, global_batch_size, rank=rank, world_size=world_size, num_epochs=num_epochs,
        seed=3, buffer_size=buffer_size, num_workers=workers[0], decode_process=workers[1],
    )  # fmt: skip


def _row_ids(batch) -> np.ndarray:
    return (batch.ids["uid"] if hasattr(batch, "ids") else batch.lhs).numpy().copy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_epoch_and_short_last_batches_kept(kind, data, rd, world_size, workers):
    per_rank = 5
    seen = [[] for _ in range(2)]
    for rank in range(world_size):
        dataset = _dataset(kind, rd, data, per_rank * world_size, workers, rank, world_size)
        batches = list(dataset)  # ends on its own: nothing waits for the other ranks
        assert len(batches) == dataset.num_batches()
        start = 0
        for epoch in range(2):
            count = dataset.plan_epoch(epoch).num_batches(per_rank)
            sizes = [batch.batch_size for batch in batches[start : start + count]]
            assert sum(sizes) == dataset.plan_epoch(epoch).num_rows
            assert sizes[:-1] == [per_rank] * (count - 1) and 0 < sizes[-1] <= per_rank  # only the last short
            seen[epoch].append(np.concatenate([_row_ids(b) for b in batches[start : start + count]]))
            start += count
    for epoch in range(2):
        assert sorted(np.concatenate(seen[epoch])) == list(range(72))  # each row exactly once, none dropped
    if world_size == 1:
        assert not np.array_equal(seen[0][0], seen[1][0])  # epochs are shuffled differently


@pytest.mark.parametrize("world_size", [1, 2])
def test_stream_after_resume_equals_the_tail(kind, data, rd, world_size, workers):
    for rank in range(world_size):
        reference = _dataset(kind, rd, data, 6, workers, rank, world_size, num_epochs=3)
        full = [_row_ids(batch) for batch in reference]
        for n in (1, len(full) // 2, len(full) - 1, len(full)):
            dataset = _dataset(kind, rd, data, 6, workers, rank, world_size, num_epochs=3)
            dataset.load_state_dict(json.loads(json.dumps(reference.state_dict(n))))
            tail = [_row_ids(batch) for batch in dataset]
            assert len(tail) == len(full) - n
            assert all(np.array_equal(a, b) for a, b in zip(tail, full[n:], strict=True))


def test_decode_errors_name_file_row_group_and_column(kind, data, rd, workers):
    if kind == "ranking":
        bad = rd.make_table(10, 40)
        lists = [[1, 0, 1, 1]] * 6 + [[1, 0]] + [[0, 0, 0, 0]] * 3
        bad = bad.set_column(bad.schema.get_field_index("binary_col"), "binary_col", pa.array(lists))
        message = r"b\.parquet \(row group 1\): column 'binary_col' row 2 holds 2 values, expected 4"
    else:
        bad = _edges(10, 40)
        bad = bad.set_column(0, "lhs", pa.array([40, 41, 42, 43, 44, 45, 1000, 47, 48, 49], pa.int64()))
        message = r"b\.parquet \(row group 1\): column 'lhs' row 2: id 1000 is outside \[0, 1000\)"
    pq.write_table(bad, data / "b.parquet", row_group_size=4)  # row 6 is row 2 of row group 1
    with pytest.raises(DataError, match=message):
        list(_dataset(kind, rd, data, 6, workers))
