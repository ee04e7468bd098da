"""Whole tables read rank-parallel through the sharded lookups (evaluation's candidates, the export).

A table of R rows is cut into one contiguous slice per rank, `ceil(R / world size)` rows each (the last
ones shorter or empty); each rank reads its slice in chunks of `chunk_size` rows through the model's
embedding lookups, whatever the sharding (row-wise, table-wise, ...). Every rank runs the same number of
lookups (a rank whose slice is shorter looks up empty chunks), because each lookup is a collective of
the sharded tables. Nothing ever holds more than one chunk of a table.

Example:
    for first, vectors in table_chunks(model, table=1, rows=72543, env=env, chunk_size=65536):
        ...   # this rank's rows first .. first + len(vectors) - 1, vectors [m, D] float32
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tml.core.distributed import DistEnv
from tml.projects.twhin.data.batch import lookup_kjt


def rank_slice(rows: int, env: DistEnv) -> tuple[int, int]:
    """[start, stop) of the rows of a `rows`-row table this rank reads."""
    share = -(-rows // env.world_size)
    start = min(rows, env.rank * share)
    return start, min(rows, start + share)


def num_chunks(rows: int, env: DistEnv, chunk_size: int) -> int:
    """Chunks per rank: the same on every rank."""
    share = -(-rows // env.world_size)
    return max(1, -(-share // chunk_size))


@torch.no_grad()
def lookup(model, tables: torch.Tensor, ids: torch.Tensor, env: DistEnv, stride: int) -> torch.Tensor:
    """Vectors [n, D] float32 of rows `ids` of table indices `tables` (a collective of sharded tables:
    every rank passes the same `stride`, see `lookup_kjt`)."""
    kjt = lookup_kjt(model.table_names, tables.cpu(), ids.cpu(), stride).to(env.device)
    return model.embed(kjt)[: len(ids)]


def table_chunks(
    model, table: int, rows: int, env: DistEnv, chunk_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, vectors [m, D]) of each chunk of this rank's slice of `table` (see module docstring).

    Args:
        model: the TwhinModel (inside the sharded module: `unwrap(module).model`).
        table: index of the table in the model's tables.
        rows: the table's num_embeddings.
        env: ranks.
        chunk_size: rows per lookup.
    """
    start, stop = rank_slice(rows, env)
    for chunk in range(num_chunks(rows, env, chunk_size)):
        first = min(stop, start + chunk * chunk_size)
        last = min(stop, first + chunk_size)
        ids = torch.arange(first, last)
        yield first, lookup(model, torch.full_like(ids, table), ids, env, chunk_size)
