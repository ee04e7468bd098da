"""The decoder protocol from the outside: a decoder with its own chunk type and counters runs on the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.reader.chunk import TensorChunk
from tml.reader.dataset import ParquetDataset
from tml.reader.decoder import DataError, location

pytestmark = pytest.mark.unit


@dataclasses.dataclass
class ArrayChunk:
    """A chunk that is not a TensorChunk: one numpy array of values."""

    values: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.values)

    def slice(self, start: int, stop: int) -> ArrayChunk:
        return ArrayChunk(self.values[start:stop])

    def take(self, rows: torch.Tensor) -> ArrayChunk:
        return ArrayChunk(self.values[rows.numpy()])

    @classmethod
    def concat(cls, chunks) -> ArrayChunk:
        return cls(np.concatenate([chunk.values for chunk in chunks]))


class OddCounter:
    """Decodes column `v` as a numpy array; counts odd values; refuses 13."""

    stat_names = ("odd",)

    def columns(self) -> list[str]:
        return ["v"]

    def check_schema(self, schema: pa.Schema, path: str) -> None:
        if "v" not in schema.names:
            raise DataError(f"{path}: missing column 'v'")

    def decode(self, table: pa.Table, path: str, row_group: int):
        values = table.column("v").to_numpy()
        if (values == 13).any():
            raise DataError(f"{location(path, row_group)}: column 'v' holds 13")
        counts = {"odd": int((values % 2).sum())}
        if row_group == 1:
            counts["second_row_group_rows"] = len(values)
        return ArrayChunk(values), counts

    def to_batch(self, chunk: ArrayChunk) -> list[int]:
        return chunk.values.tolist()


def _dataset(inputs, world_size=1, rank=0, buffer_size=0):
    return ParquetDataset(str(inputs), OddCounter(), 4 * world_size, rank, world_size, 1, 0, True, buffer_size,
                          2, 2, False)  # fmt: skip


def test_a_custom_decoder_and_chunk_type(tmp_path):
    pq.write_table(pa.table({"v": np.arange(10)}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"v": np.arange(20, 27)}), tmp_path / "b.parquet", row_group_size=4)
    dataset = _dataset(tmp_path, buffer_size=6)
    batches = list(dataset)
    assert sorted(v for batch in batches for v in batch) == [*range(10), *range(20, 27)]
    assert [len(batch) for batch in batches] == [4, 4, 4, 4, 1]
    assert dataset.stats["odd"] == 5 + 3 and dataset.stats["second_row_group_rows"] == 4 + 3
    pq.write_table(pa.table({"w": [1]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: missing column 'v'"):
        _dataset(tmp_path)
    pq.write_table(pa.table({"v": [1, 2, 13]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet \(row group 0\): column 'v' holds 13"):
        list(_dataset(tmp_path))


def test_engine_errors_name_the_arguments(tmp_path):
    pq.write_table(pa.table({"v": np.arange(4)}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, world_size=2\)"):
        _dataset(tmp_path, world_size=2, rank=2)
    with pytest.raises(ValueError, match="global_batch_size 4 is not divisible by the world size 3"):
        ParquetDataset(str(tmp_path), OddCounter(), 4, 0, 3, 1, 0, True, 0, 2, 2, False)


def test_tensor_chunk_row_operations_keep_jagged_rows_together():
    chunk = TensorChunk(
        3,
        {"x": torch.tensor([[0, 0], [1, 1], [2, 2]])},
        {"j": (torch.tensor([7, 8, 9]), torch.tensor([0, 2, 2, 3]))},
    )
    both = TensorChunk.concat([chunk, chunk.slice(1, 3)])
    assert both.num_rows == 5 and both.jagged["j"][1].tolist() == [0, 2, 2, 3, 3, 4]
    picked = both.take(torch.tensor([4, 0, 3]))
    assert picked.tensors["x"][:, 0].tolist() == [2, 0, 1]
    assert picked.jagged["j"][0].tolist() == [9, 7, 8] and picked.jagged["j"][1].tolist() == [0, 1, 3, 3]


@pytest.mark.parametrize("lengths", [[1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0], [1, 0, 2, 1], [0, 0, 0, 4]])
def test_tensor_chunk_take_of_jagged_rows_matches_a_row_by_row_gather(lengths):
    # Equal lengths take the row-gather shortcut, others the general gather: both give each row's values.
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    values = torch.arange(100, 100 + int(offsets[-1]))
    chunk = TensorChunk(4, {"x": torch.arange(4)}, {"j": (values, offsets)})
    rows = torch.tensor([3, 0, 3, 2])
    picked_values, picked_offsets = chunk.take(rows).jagged["j"]
    expected = [values[offsets[r] : offsets[r + 1]].tolist() for r in rows.tolist()]
    got = [picked_values[picked_offsets[i] : picked_offsets[i + 1]].tolist() for i in range(4)]
    assert (
        got == expected and picked_offsets.dtype == torch.int64 and picked_offsets[-1] == len(picked_values)
    )
