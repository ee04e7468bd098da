"""TwHIN edges from Parquet: the edge decoder of the reader engine and the EdgeBatch it yields.

A file holds one edge per row: `lhs` and `rhs` integer ids (int64, or any narrower integer type) and `rel`,
either the relation's index (integer) or its name (string or dictionary-encoded string), mapped through
the given relation list. Relation r joins row ids of one entity table (lhs, `lhs_rows` rows) to another
(rhs, `rhs_rows` rows); every id must lie in [0, rows) of its side's table. A null, an unknown relation, a
negative id or one past its table raises `DataError` naming the file, the row group, the column and the
row; a column of the wrong type is caught from the footer at construction (file and column named).
With vocabularies (tml.projects.twhin.data.vocab), `lhs` / `rhs` are string keys instead, mapped to rows of
the table the relation names for that end; an unknown key is a DataError naming the key and the table.
`offset` / `limit` select edges by their position in the inputs' file order (sorted paths, rows in order):
the engine still reads and plans whole row groups, so positions, shuffling and resume are unchanged, and
the rows outside are dropped from each batch, which can then be smaller than B (or empty).
Batches (B = global_batch_size // world_size rows, the last of an epoch smaller): `EdgeBatch` of int64 [B]
`lhs`, `rel` (relation index), `rhs`.

Example:
    dataset = build_edge_dataset("data/twhin/*.parquet", [("fav", 1000, 500), ("follow", 1000, 1000)],
                                 global_batch_size=1024, rank=0, world_size=2, num_epochs=1)
    for batch in dataset:
        batch.lhs, batch.rel, batch.rhs        # int64 [512]
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tml.reader.arrow_to_torch import single, writable
from tml.reader.chunk import TensorChunk
from tml.reader.dataset import ParquetDataset
from tml.reader.decoder import DataError, location

if TYPE_CHECKING:
    from tml.projects.twhin.data.vocab import Vocabulary
    from tml.reader.state import InputFiles

COLUMNS = ("lhs", "rel", "rhs")


@dataclasses.dataclass
class EdgeBatch:
    """One batch of edges (B = batch size).

    Follows TorchRec's `Pipelineable` protocol (`to`, `pin_memory`, `record_stream`) without importing
    torchrec; `tml.reader.batch.register_pipelineable(EdgeBatch)` declares it where a pipeline checks.

    Args:
        lhs: [B] int64 row ids in each edge's lhs table.
        rel: [B] int64 relation indices (into the relation list the reader was given).
        rhs: [B] int64 row ids in each edge's rhs table.

    Example:
        batch = EdgeBatch(lhs=torch.tensor([0, 3]), rel=torch.tensor([1, 0]), rhs=torch.tensor([2, 2]))
        batch = batch.to(torch.device("cpu"), non_blocking=True)
    """

    lhs: torch.Tensor
    rel: torch.Tensor
    rhs: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.lhs.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> EdgeBatch:
        return EdgeBatch(
            *(t.to(device=device, non_blocking=non_blocking) for t in (self.lhs, self.rel, self.rhs))
        )

    def pin_memory(self) -> EdgeBatch:
        return EdgeBatch(self.lhs.pin_memory(), self.rel.pin_memory(), self.rhs.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for tensor in (self.lhs, self.rel, self.rhs):
            tensor.record_stream(stream)


def _is_string(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _first(mask: np.ndarray) -> tuple[int, int]:
    """(first row where `mask` holds, how many rows it holds for)."""
    bad = np.flatnonzero(mask)
    return int(bad[0]), len(bad)


def relation_indices(
    values: pa.Array, names: Sequence[str], where: str, value_set: pa.Array | None = None
) -> np.ndarray:
    """Relation index [n] int64 of every edge of a `rel` column (indices, names or dictionary of names)."""
    names = list(names)
    if pa.types.is_dictionary(values.type) or _is_string(values.type):
        # Dictionary columns look up each distinct name once; index_in has no string_view kernel.
        dictionary = pa.types.is_dictionary(values.type)
        strings = (values.dictionary if dictionary else values).cast(pa.large_string())
        value_set = value_set if value_set is not None else pa.array(names, pa.large_string())
        codes = pc.index_in(strings, value_set=value_set)
        if dictionary:
            codes = codes.take(values.indices)
        if codes.null_count:
            row, count = _first(~codes.is_valid().to_numpy(zero_copy_only=False))
            raise DataError(
                f"{where}: column 'rel' row {row}: unknown relation {values[row].as_py()!r} ({count} rows "
                f"with unknown relations); the relations are {names}"
            )
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)
    rel = values.to_numpy(zero_copy_only=False)
    bad = (rel < 0) | (rel >= len(names))
    if bad.any():
        row, count = _first(bad)
        raise DataError(
            f"{where}: column 'rel' row {row}: relation index {int(rel[row])} is outside "
            f"[0, {len(names)}) ({count} rows); the relations are {names}"
        )
    return rel.astype(np.int64, copy=False)


class EdgeDecoder:
    """The Decoder (tml.reader.decoder) of edges `lhs`, `rel`, `rhs` into EdgeBatch-es.

    Args:
        relations: (name, lhs_rows, rhs_rows) per relation; index i is relation i of the `rel` column.
        vocabularies: per relation, the (lhs, rhs) tables' Vocabulary: `lhs` / `rhs` are then string keys;
            None: integer ids.
        row_range: (first edge, end edge or None) by position in the inputs' file order; None: every edge.
            Needs `bind(inputs)` before decoding (build_edge_dataset does it).
    """

    stat_names = ()

    def __init__(
        self,
        relations: Sequence[tuple[str, int, int]],
        vocabularies: Sequence[tuple[Vocabulary, Vocabulary]] | None = None,
        row_range: tuple[int, int | None] | None = None,
    ) -> None:
        if not relations:
            raise ValueError("relations must not be empty")
        for relation in relations:
            if len(relation) != 3:
                raise ValueError(f"each relation must be (name, lhs_rows, rhs_rows), got {relation!r}")
            name, lhs_rows, rhs_rows = relation
            if not isinstance(name, str) or not name:
                raise ValueError(f"relation names must be non-empty strings, got {name!r}")
            for side, rows in (("lhs_rows", lhs_rows), ("rhs_rows", rhs_rows)):
                if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 1:
                    raise ValueError(f"relation {name!r}: {side} must be an int >= 1, got {rows!r}")
        names = [relation[0] for relation in relations]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"relation names repeat: {repeated}")
        if vocabularies is not None and len(vocabularies) != len(relations):
            raise ValueError(f"vocabularies: one (lhs, rhs) pair per relation, got {len(vocabularies)}")
        self.names = names
        self._names = pa.array(names, pa.large_string())
        self._rows = {
            "lhs": np.array([int(relation[1]) for relation in relations], dtype=np.int64),
            "rhs": np.array([int(relation[2]) for relation in relations], dtype=np.int64),
        }
        self.vocabularies = None if vocabularies is None else [tuple(pair) for pair in vocabularies]
        self.row_range = row_range
        self._first_rows: dict[str, list[int]] | None = None

    def bind(self, inputs: InputFiles) -> None:
        """Learn where every row group starts in the inputs' file order (for `row_range`)."""
        first_rows, total = {}, 0
        for name, rows in inputs.files:
            path = posixpath.join(inputs.root, name) if inputs.root else name
            first_rows[path] = []
            for count in rows:
                first_rows[path].append(total)
                total += count
        self._first_rows = first_rows

    def columns(self) -> list[str]:
        return list(COLUMNS)

    def check_schema(self, schema: pa.Schema, path: str) -> None:
        fields = {field.name: field.type for field in schema}
        for column in COLUMNS:
            if column not in fields:
                raise DataError(
                    f"{path}: missing edge column {column!r}; the file's columns are {sorted(fields)}"
                )
        for column in ("lhs", "rhs"):
            if self.vocabularies is None and _is_string(fields[column]):
                raise DataError(
                    f"{path}: column {column!r} holds string keys; they need a vocabulary "
                    "(train_data.vocabulary, built by `tml-twhin build-vocab`)"
                )
            if self.vocabularies is not None and not _is_string(fields[column]):
                raise DataError(
                    f"{path}: column {column!r} is {fields[column]}, but a vocabulary is set: expected string "
                    "keys (remove train_data.vocabulary to read integer ids)"
                )
            if self.vocabularies is None and not pa.types.is_integer(fields[column]):
                raise DataError(
                    f"{path}: column {column!r} is {fields[column]}, expected integer ids (int64)"
                )
        rel = fields["rel"]
        names = _is_string(rel.value_type) if pa.types.is_dictionary(rel) else _is_string(rel)
        if not (pa.types.is_integer(rel) or names):
            raise DataError(
                f"{path}: column 'rel' is {fields['rel']}, expected relation indices (integer) or relation "
                "names (string or dictionary of strings)"
            )

    def _nonnull(self, table: pa.Table, column: str, where: str) -> pa.Array:
        values = single(table.column(column))
        if values.null_count:
            row, count = _first(~values.is_valid().to_numpy(zero_copy_only=False))
            raise DataError(
                f"{where}: column {column!r} row {row} is null ({count} null rows), expected none"
            )
        return values

    def _relations(self, values: pa.Array, where: str) -> np.ndarray:
        """Relation index [n] int64 of every edge."""
        return relation_indices(values, self.names, where, self._names)

    def _keys(self, values: pa.Array, column: str, rel: np.ndarray, where: str) -> np.ndarray:
        """Ids [n] int64 of one side's string keys, through the vocabulary of each edge's table."""
        side = 0 if column == "lhs" else 1
        ids = np.empty(len(values), dtype=np.int64)
        by_vocab: dict[int, tuple[Vocabulary, list[int]]] = {}
        for index, pair in enumerate(self.vocabularies):
            by_vocab.setdefault(id(pair[side]), (pair[side], []))[1].append(index)
        for vocab, relations in by_vocab.values():
            rows = np.flatnonzero(np.isin(rel, relations))
            if not len(rows):
                continue
            found, known = vocab.lookup(values.take(pa.array(rows)))
            if not known.all():
                bad = rows[~known]
                raise DataError(
                    f"{where}: column {column!r} row {int(bad[0])}: key {values[int(bad[0])].as_py()!r} is not "
                    f"in the vocabulary of table {vocab.table!r} ({vocab.path}; {len(bad)} unknown keys): "
                    "rebuild it with `tml-twhin build-vocab` over every split"
                )
            ids[rows] = found
        return ids

    def _ids(self, values: pa.Array, column: str, rel: np.ndarray, where: str) -> np.ndarray:
        """Ids [n] int64 of one side, each checked against its relation's table size."""
        if self.vocabularies is not None:
            return self._keys(values, column, rel, where)
        ids = values.to_numpy(zero_copy_only=False)
        rows = self._rows[column][rel]
        # Compared before any cast, so a uint64 id past int64's range cannot wrap into the table.
        bad = (ids < 0) | (ids >= rows)
        if bad.any():
            row, count = _first(bad)
            name = self.names[int(rel[row])]
            raise DataError(
                f"{where}: column {column!r} row {row}: id {int(ids[row])} is outside [0, {int(rows[row])}), "
                f"the {column} table of relation {name!r} ({count} rows out of range)"
            )
        return ids.astype(np.int64, copy=False)

    def _keep(self, path: str, row_group: int, num_rows: int) -> torch.Tensor | None:
        """[n] bool: the rows of this row group inside `row_range` (None without a range)."""
        if self.row_range is None:
            return None
        if self._first_rows is None or path not in self._first_rows:
            raise RuntimeError(f"EdgeDecoder.bind() was not given the inputs holding {path}")
        start, stop = self.row_range
        first = self._first_rows[path][row_group]
        positions = torch.arange(first, first + num_rows)
        keep = positions >= start
        return keep & (positions < stop) if stop is not None else keep

    def decode(self, table: pa.Table, path: str, row_group: int) -> tuple[TensorChunk, dict[str, int]]:
        where = location(path, row_group)
        keep = self._keep(path, row_group, table.num_rows)
        if keep is not None and not bool(keep.any()):
            # Nothing of this row group is read: skip the decoding, keep the engine's row count.
            zeros = torch.zeros(table.num_rows, dtype=torch.int64)
            return TensorChunk(table.num_rows, {"lhs": zeros, "rel": zeros, "rhs": zeros, "keep": keep}), {}
        values = {column: self._nonnull(table, column, where) for column in COLUMNS}
        rel = self._relations(values["rel"], where)
        tensors = {"rel": torch.from_numpy(writable(rel))}
        for column in ("lhs", "rhs"):
            tensors[column] = torch.from_numpy(writable(self._ids(values[column], column, rel, where)))
        if keep is not None:
            tensors["keep"] = keep
        return TensorChunk(table.num_rows, tensors), {}

    def to_batch(self, chunk: TensorChunk) -> EdgeBatch:
        t = chunk.tensors
        if "keep" in t:
            rows = torch.nonzero(t["keep"]).squeeze(1)
            return EdgeBatch(lhs=t["lhs"][rows], rel=t["rel"][rows], rhs=t["rhs"][rows])
        return EdgeBatch(lhs=t["lhs"], rel=t["rel"], rhs=t["rhs"])


def build_edge_dataset(
    inputs: str,
    relations: Sequence[tuple[str, int, int]],
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_epochs: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    buffer_size: int = 0,
    num_workers: int = 2,
    prefetch_batches: int = 4,
    skip_unreadable_files: bool = False,
    decode_process: bool = False,
    vocabularies: Sequence[tuple[Vocabulary, Vocabulary]] | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> ParquetDataset[EdgeBatch]:
    """A ParquetDataset of EdgeBatch-es for this rank (batch size global_batch_size // world_size).

    Everything but the decoding is the reader engine's (docs/reader.md): exactly-once rank shares per
    epoch, shuffling, exact resume with a checked data plan, background decoding, fsspec inputs.

    Args:
        inputs: glob, directory, file or fsspec URL of Parquet files with columns lhs, rel, rhs.
        relations: (name, lhs_rows, rhs_rows) per relation, in relation-index order.
        global_batch_size: edges per step over all ranks (divisible by world_size).
        rank / world_size: this reader's share.
        num_epochs: passes over the data; None repeats forever.
        seed: seed of all shuffling, combined with the epoch.
        shuffle: shuffle the (file, row group) units each epoch (False: file order, and no row shuffle).
        buffer_size: rows per row-shuffle window (0: rows keep their order within row groups).
        num_workers / prefetch_batches: decoding threads and ready batches queued ahead.
        skip_unreadable_files: skip (count, log) files that are not Parquet instead of raising.
        decode_process: a separate process decodes and shuffles instead (num_workers must be 0;
            tml.reader.decode_process).
        vocabularies: per relation the (lhs, rhs) Vocabulary of string keys; None: integer ids.
        offset / limit: only edges [offset, offset + limit) of the inputs in file order (limit None: to
            the end); batches then hold at most B edges (rows outside are dropped, see the module doc).
    """
    row_range = None
    if offset or limit is not None:
        row_range = (offset, None if limit is None else offset + limit)
    decoder = EdgeDecoder(relations, vocabularies, row_range)
    dataset = ParquetDataset(
        inputs=inputs,
        decoder=decoder,
        global_batch_size=global_batch_size,
        rank=rank,
        world_size=world_size,
        num_epochs=num_epochs,
        seed=seed,
        shuffle_units=shuffle,
        buffer_size=buffer_size if shuffle else 0,
        num_workers=num_workers,
        prefetch_batches=prefetch_batches,
        skip_unreadable_files=skip_unreadable_files,
        decode_process=decode_process,
    )
    if row_range is not None:
        decoder.bind(dataset.plan.inputs)
    return dataset
