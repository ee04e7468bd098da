"""String keys -> table rows: per-table vocabularies, built from the edges and saved beside the data.

A vocabulary folder holds one `<table>.parquet` per entity table with columns `key` (string), `id` (int64,
equal to the row index: row i is the key of table row i) and `count` (edges naming the key when it was
built). `build_vocabularies` scans edge files whose `lhs` / `rhs` are string keys (the relation of each edge
decides the table of each end) and numbers the keys of each table by descending count, ties by key, so the
same edges always give the same ids. Lookups hash keys with the reader's stable 64-bit FNV-1a
(`tml.reader.sparse.stable_hash`) into a sorted array and confirm every hit against the key itself, so
a vocabulary of hundreds of millions of keys costs one binary search per edge and no per-batch rebuild.

Example:
    build_vocabularies(["data/train/*.parquet"], [("fav", "user", "tweet")], {"user": 1000, "tweet": 500},
                       "data/vocab")
    vocab = load_vocabulary("data/vocab", "user", num_embeddings=1000)
    ids, known = vocab.lookup(pa.array(["alice", "nobody"]))   # [0, -1], [True, False]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.reader.decoder import DataError, location
from tml.reader.fs import filesystem_for, list_inputs, open_input
from tml.reader.sparse import stable_hash

logger = get_logger(__name__)
SCHEMA = pa.schema([("key", pa.large_string()), ("id", pa.int64()), ("count", pa.int64())])


def is_string(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def vocabulary_path(folder: str, table: str) -> str:
    return f"{folder.rstrip('/')}/{table}.parquet"


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
    """The keys of one table: `keys[i]` is the key of row i.

    Args:
        table: the entity table.
        path: the file it was read from (named by errors).
        keys: large_string array, one key per row (no nulls, no repeats).
    """

    table: str
    path: str
    keys: pa.Array

    def __post_init__(self) -> None:
        hashes = stable_hash(self.keys) if len(self.keys) else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        object.__setattr__(self, "_hashes", hashes[order])
        object.__setattr__(self, "_ids", order.astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int64, -1 where unknown; known [n] bool) of string `keys` (no nulls)."""
        keys = keys.cast(pa.large_string())
        hashed = stable_hash(keys) if len(keys) else np.zeros(0, np.int64)
        pos = np.searchsorted(self._hashes, hashed)
        pos = np.minimum(pos, max(len(self._hashes) - 1, 0))
        known = (self._hashes[pos] == hashed) if len(self._hashes) else np.zeros(len(keys), bool)
        ids = np.where(known, self._ids[pos] if len(self._ids) else 0, -1)
        if known.any():
            # A hash hit is a match only when the key itself is the same (no collision with an unknown key).
            rows = np.flatnonzero(known)
            same = pc.equal(self.keys.take(pa.array(ids[rows])), keys.take(pa.array(rows)))
            same = same.to_numpy(zero_copy_only=False)
            known[rows[~same]] = False
            ids[rows[~same]] = -1
        return ids.astype(np.int64), known


def load_vocabulary(folder: str, table: str, num_embeddings: int) -> Vocabulary:
    """Read `<folder>/<table>.parquet`, checking ids 0..n-1 in order and n <= num_embeddings."""
    path = vocabulary_path(folder, table)
    fs, inner = filesystem_for(path)
    if not fs.exists(inner):
        raise FileNotFoundError(
            f"vocabulary {path!r} (train_data.vocabulary) does not exist: build it with "
            "`tml-twhin build-vocab --config <config>`"
        )
    with open_input(fs, inner) as source:
        data = pq.read_table(source, columns=["key", "id"])
    keys, ids = data.column("key").combine_chunks(), data.column("id").to_numpy()
    if not is_string(keys.type) or keys.null_count:
        raise DataError(f"{path}: column 'key' must be non-null strings, got {keys.type}")
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError(f"{path}: column 'id' must be 0, 1, ..., n-1 in row order (as build-vocab writes it)")
    if len(keys) > num_embeddings:
        raise UserError(
            f"{path}: {len(keys)} keys, but table {table!r} has num_embeddings {num_embeddings}: raise "
            "num_embeddings to at least the vocabulary size"
        )
    vocab = Vocabulary(table, path, keys.cast(pa.large_string()))
    if len(np.unique(vocab._hashes)) != len(vocab):
        raise DataError(f"{path}: keys repeat (or two keys share a 64-bit hash); rebuild the vocabulary")
    return vocab


def _relation_index(values: pa.Array, names: Sequence[str], where: str) -> np.ndarray:
    from tml.projects.twhin.data.edges import relation_indices

    return relation_indices(values, names, where)


def build_vocabularies(
    inputs: Sequence[str],
    relations: Sequence[tuple[str, str, str]],
    num_embeddings: dict[str, int],
    output: str,
) -> dict[str, int]:
    """Number the string keys of every table found in the edges of `inputs`; write `<output>/<table>.parquet`.

    Args:
        inputs: globs / folders / URLs of edge files with string `lhs` and `rhs` columns.
        relations: (name, lhs table, rhs table) per relation, in `rel` index order.
        num_embeddings: table -> rows; a table with more keys is an error naming both numbers.
        output: the vocabulary folder (created).

    Returns:
        table -> number of keys.
    """
    names = [name for name, _, _ in relations]
    counts: dict[str, list[pa.Table]] = {table: [] for table in num_embeddings}
    for pattern in inputs:
        fs, paths = list_inputs(pattern)
        for path in paths:
            with open_input(fs, path) as source:
                parquet = pq.ParquetFile(source)
                for column in ("lhs", "rhs"):
                    field = (
                        parquet.schema_arrow.field(column) if column in parquet.schema_arrow.names else None
                    )
                    if field is None or not is_string(field.type):
                        got = "missing" if field is None else str(field.type)
                        raise DataError(
                            f"{path}: column {column!r} is {got}; build-vocab numbers string keys"
                        )
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group, columns=["lhs", "rel", "rhs"])
                    where = location(path, group)
                    rel = _relation_index(table.column("rel").combine_chunks(), names, where)
                    for column, side in (("lhs", 1), ("rhs", 2)):
                        values = table.column(column).combine_chunks()
                        if values.null_count:
                            raise DataError(f"{where}: column {column!r} holds nulls; every edge needs keys")
                        for index, relation in enumerate(relations):
                            mask = rel == index
                            if mask.any():
                                keys = values.filter(pa.array(mask)).cast(pa.large_string())
                                counted = (
                                    pa.table({"key": keys}).group_by("key").aggregate([("key", "count")])
                                )
                                counts[relation[side]].append(counted)
    out_fs, out_path = filesystem_for(output)
    out_fs.makedirs(out_path, exist_ok=True)
    sizes = {}
    for table, parts in counts.items():
        if parts:
            merged = pa.concat_tables(parts).group_by("key").aggregate([("key_count", "sum")])
            merged = pa.table({"key": merged.column("key"), "count": merged.column("key_count_sum")})
        else:
            merged = pa.table({"key": pa.array([], pa.large_string()), "count": pa.array([], pa.int64())})
        order = pc.sort_indices(merged, sort_keys=[("count", "descending"), ("key", "ascending")])
        merged = merged.take(order)
        if merged.num_rows > num_embeddings[table]:
            raise UserError(
                f"table {table!r}: the edges hold {merged.num_rows} distinct keys, more than its "
                f"num_embeddings {num_embeddings[table]}: raise num_embeddings"
            )
        result = pa.table(
            {
                "key": merged.column("key").cast(pa.large_string()),
                "id": pa.array(np.arange(merged.num_rows, dtype=np.int64)),
                "count": merged.column("count").cast(pa.int64()),
            },
            schema=SCHEMA,
        )
        path = vocabulary_path(output, table)
        fs, inner = filesystem_for(path)
        with fs.open(inner, "wb") as sink:
            pq.write_table(result, sink)
        sizes[table] = merged.num_rows
        logger.info("vocabulary of %s: %d keys -> %s", table, merged.num_rows, path)
    return sizes
