"""Sparse id columns -> flat int64 ids + row offsets, and the KeyedJaggedTensor built from them; sparse
continuous (id -> value) columns -> ids, float32 values and offsets (`decode_sparse_continuous`).

A column is int, string, or a list of either (multi-hot). For n rows the result is `values` [N] int64 and
`offsets` [n + 1] (row i owns values[offsets[i]:offsets[i + 1]]). Null rows and null ids are dropped.
Strings are hashed with 64-bit FNV-1a, vectorized over the distinct strings: the same id on every run
and machine (python's hash() is salted per process). Ids are taken modulo `num_buckets` when set,
which puts every id, negative ones included, in [0, num_buckets).

Example:
    values, offsets = decode_sparse(pa.array([["a", "b"], [], ["a"]]), SparseSpec("f", "col", 100), "x.parquet")
    kjt = build_kjt(["f"], [values], [lengths])
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tml.reader.arrow_types import is_list
from tml.reader.decoder import DataError

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_POSITIVE = np.uint64(0x7FFFFFFFFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """One KJT key: `name`, read from `column`, ids modulo `num_buckets` (None: as they are)."""

    name: str
    column: str
    num_buckets: int | None = None


def _is_string(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _id_type_ok(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or _is_string(dtype)


def sparse_type_ok(dtype: pa.DataType) -> bool:
    if is_list(dtype):
        return _id_type_ok(dtype.value_type)
    return _id_type_ok(dtype)


def stable_hash(strings: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each (non-null) string's UTF-8 bytes, as a non-negative int64 array."""
    encoded = pc.dictionary_encode(strings.cast(pa.large_string()))
    unique = encoded.dictionary
    buffers = unique.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[unique.offset : unique.offset + len(unique) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(unique), _FNV_OFFSET, dtype=np.uint64)
    # One vectorized step per byte position over the strings that are at least that long.
    for position in range(int(lengths.max(initial=0))):
        active = np.flatnonzero(lengths > position)
        byte = data[starts[active] + position].astype(np.uint64)
        hashes[active] = (hashes[active] ^ byte) * _FNV_PRIME
    hashed = (hashes & _POSITIVE).astype(np.int64)
    return hashed[encoded.indices.to_numpy(zero_copy_only=False)]


def _ids(values: pa.Array) -> np.ndarray:
    if _is_string(values.type):
        return stable_hash(values)
    return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def decode_sparse(array: pa.Array, spec: SparseSpec, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N] int64, offsets [n + 1] int64) of one sparse column of n rows."""
    n = len(array)
    if (
        pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
    ):
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = array.flatten()
    else:
        lengths = np.ones(n, dtype=np.int64)
        values = array
    if values.null_count:
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(n), lengths)
        lengths = np.bincount(rows[valid], minlength=n).astype(np.int64)
        values = values.filter(pa.array(valid))
    ids = _ids(values) if len(values) else np.zeros(0, dtype=np.int64)
    if spec.num_buckets is not None:
        # Floor modulo: negative ids (and uint64 ids that wrapped past int64) land in [0, num_buckets) too;
        # an id outside its table would be clamped silently by FBGEMM on GPU.
        ids = np.mod(ids, spec.num_buckets)
    if not ids.flags.writeable:  # a zero-copy view of Arrow memory; torch wants writable arrays
        ids = ids.copy()
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] == len(ids), f"{path}: {spec.column}: offsets disagree with values"
    return torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(offsets)


@dataclasses.dataclass(frozen=True)
class SparseContinuousSpec:
    """One sparse continuous feature: `name`, read from the map `column` or from the parallel lists
    `ids_column` / `values_column`, ids modulo `num_buckets`."""

    name: str
    column: str | None
    ids_column: str | None
    values_column: str | None
    num_buckets: int

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,) if self.column is not None else (self.ids_column, self.values_column)


def _value_type_ok(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def sparse_continuous_type_problem(spec: SparseContinuousSpec, types: dict[str, pa.DataType]) -> str | None:
    """Why the columns of `spec` (name -> Arrow type) cannot be decoded, or None."""
    if spec.column is not None:
        dtype = types[spec.column]
        if (
            not pa.types.is_map(dtype)
            or not _id_type_ok(dtype.key_type)
            or not _value_type_ok(dtype.item_type)
        ):
            return f"column {spec.column!r} is {dtype}, expected map<int or string, number>"
        return None
    ids, values = types[spec.ids_column], types[spec.values_column]

    # list<null>: lists that are all empty (e.g. a JSON request whose rows hold none), decoded as such.
    def ok(dtype: pa.DataType, check) -> bool:
        return is_list(dtype) and (check(dtype.value_type) or pa.types.is_null(dtype.value_type))

    if not ok(ids, _id_type_ok):
        return f"ids column {spec.ids_column!r} is {ids}, expected a list of int or string"
    if not ok(values, _value_type_ok):
        return f"values column {spec.values_column!r} is {values}, expected a list of numbers"
    return None


def _lengths(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_null(array: pa.Array, column: str, what: str, lengths: np.ndarray, where: str) -> DataError:
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    position = int(np.flatnonzero(~valid)[0])
    row = int(np.searchsorted(np.cumsum(lengths), position, side="right"))
    return DataError(
        f"{where}: column {column!r} row {row} holds a null {what} ({int((~valid).sum())} null {what}s "
        "in all); every entry needs an id and a value"
    )


def decode_sparse_continuous(
    arrays: list[pa.Array], spec: SparseContinuousSpec, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N] int64 in [0, num_buckets), values [N] float32, offsets [n + 1] int64) of one sparse
    continuous feature of n rows; `arrays` are its columns (`spec.columns`), checked by
    `sparse_continuous_type_problem`. A null row (map or both lists) holds no entries; a null id or value,
    or lists of different lengths in one row, raise DataError naming `where`, the column and the row."""
    if spec.column is not None:
        (array,) = arrays
        # The list kernels have no map version: as a list of its entries, flatten() skips the slots of
        # null rows.
        entries = array.cast(pa.list_(pa.struct([array.type.key_field, array.type.item_field])))
        lengths = _lengths(entries)
        ids, values = entries.flatten().flatten()
        ids_column = values_column = spec.column
    else:
        id_lists, value_lists = arrays
        lengths, value_lengths = _lengths(id_lists), _lengths(value_lists)
        wrong = np.flatnonzero(lengths != value_lengths)
        if len(wrong):
            row = int(wrong[0])
            raise DataError(
                f"{where}: row {row} holds {int(lengths[row])} ids in column {spec.ids_column!r} and "
                f"{int(value_lengths[row])} values in column {spec.values_column!r}, expected one value per "
                f"id ({len(wrong)} rows differ)"
            )
        ids, values = id_lists.flatten(), value_lists.flatten()
        ids_column, values_column = spec.ids_column, spec.values_column
    if ids.null_count:
        raise _first_null(ids, ids_column, "id", lengths, where)
    if values.null_count:
        raise _first_null(values, values_column, "value", lengths, where)
    flat = np.mod(_ids(ids), spec.num_buckets) if len(ids) else np.zeros(0, dtype=np.int64)
    numbers = (
        values.to_numpy(zero_copy_only=False).astype(np.float32) if len(values) else np.zeros(0, np.float32)
    )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (
        torch.from_numpy(np.ascontiguousarray(flat)),
        torch.from_numpy(np.ascontiguousarray(numbers)),
        torch.from_numpy(offsets),
    )


def build_kjt(keys: list[str], values: list[torch.Tensor], lengths: list[torch.Tensor]):
    """KeyedJaggedTensor with `keys` in order; lengths[k] is [B] per key. Imports torchrec here only."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths).to(torch.int32) if lengths else torch.zeros(0, dtype=torch.int32),
    )
