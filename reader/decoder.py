"""The decoder protocol: what the reader engine asks of a data layout (ranking examples, graph edges, ...).

The engine (`tml.reader.dataset`, `tml.reader.pipeline`) plans row groups, deals them to ranks, shuffles,
batches, resumes and decodes in background threads, but never looks inside a row: a `Decoder` says which
columns to read, checks each file's Arrow schema, turns one row group into a `Chunk`, and turns a chunk of
B rows into the batch object the model consumes. A chunk only needs the row operations batching uses
(`num_rows`, `slice`, `take`, `concat`); `tml.reader.chunk.TensorChunk` implements them once for named
tensors and jagged columns, so most decoders only write `decode` and `to_batch`.

Decoders in this repository: `tml.reader.ranking.RankingDecoder` (RecapBatch) and
`tml.projects.twhin.data.edges.EdgeDecoder` (EdgeBatch).

Example:
    class Decoder:                                       # n = rows of one row group, B = rows of a batch
        stat_names = ()                                  # counters dataset.stats starts at 0
        def columns(self): return ["x"]                  # read only these
        def check_schema(self, schema, path): ...        # DataError naming path and column
        def decode(self, table, path, row_group):        # DataError naming path, row group and column
            return TensorChunk(table.num_rows, {"x": torch.from_numpy(table["x"].to_numpy())}), {}
        def to_batch(self, chunk): return chunk.tensors["x"]  # [B]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, Self, TypeVar

import pyarrow as pa
import torch

from tml.core.errors import UserError

BatchT = TypeVar("BatchT", covariant=True)


class DataError(UserError, ValueError):
    """Bad data in a file: the message names the file (and row group), the column and what was expected."""


def location(path: str, row_group: int) -> str:
    """How decode errors name where they happened: `path (row group N)`."""
    return f"{path} (row group {row_group})"


class Chunk(Protocol):
    """Decoded rows. Every operation returns a new chunk; slicing may share memory with the original."""

    @property
    def num_rows(self) -> int: ...

    def slice(self, start: int, stop: int) -> Self:
        """Rows [start, stop)."""
        ...

    def take(self, rows: torch.Tensor) -> Self:
        """Rows in the order of the int64 index tensor `rows` [k]."""
        ...

    @classmethod
    def concat(cls, chunks: Sequence[Self]) -> Self:
        """The rows of every chunk, in order (at least one chunk)."""
        ...


class Decoder(Protocol[BatchT]):
    """Turns Parquet row groups of one layout into batches.

    `decode` runs in the engine's decoding threads, several at a time: it must not mutate the decoder.
    `to_batch` runs in the engine's driver thread, once per batch.
    """

    stat_names: tuple[str, ...]
    """Counters `dataset.stats` holds from the start (at 0); `decode` may also report others."""

    def columns(self) -> list[str]:
        """The columns to read from every row group."""
        ...

    def check_schema(self, schema: pa.Schema, path: str) -> None:
        """Raise DataError naming `path` and the column when a column is missing or of the wrong type."""
        ...

    def decode(self, table: pa.Table, path: str, row_group: int) -> tuple[Chunk, dict[str, int]]:
        """One row group (read with `columns()`) -> (its chunk, counters to add to `dataset.stats`).

        Bad values raise DataError naming `location(path, row_group)` and the column.
        """
        ...

    def to_batch(self, chunk: Any) -> BatchT:
        """The batch object of a chunk of B rows (B = the rank's batch size, smaller at an epoch's end)."""
        ...
