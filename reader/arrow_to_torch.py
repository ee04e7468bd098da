"""Arrow -> torch: checks a file's schema against what the config asks for and decodes one row group.

A decoded row group is a `Chunk` (see tml.reader.chunk) of n rows: dense tensors [n, width], labels and
weights [n, T], ids [n], and per sparse feature flat int64 values with offsets [n + 1].
Fixed-size float lists go Arrow buffer -> torch without a copy (DLPack); other types take one numpy cast.
No per-row python anywhere.

Example:
    plan = DecodePlan(dense=resolve_dense_specs(config), labels=["is_clicked"], ...)
    check_schema(parquet_file.schema_arrow, "a.parquet", plan)
    chunk = decode_table(parquet_file.read_row_group(0, columns=plan.columns()), "a.parquet", plan)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tml.reader.chunk import Chunk
from tml.reader.schema import DenseSpec
from tml.reader.sparse import SparseSpec, decode_sparse, sparse_type_ok


class DataError(ValueError):
    """Bad data in a file: the message names the file, the column and what was expected."""


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything decoding needs, as flat data.

    Args:
        dense: the dense tensors to build.
        labels: label column names, in batch order.
        label_rates: per label (pos_rate, neg_rate) to reweight by, or None for no reweighting.
        weight_column: per-example weight column or None.
        id_columns: int passthrough columns.
        sparse: sparse id features in KJT key order.
        nan_policy: "zero", "error" or "keep" for non-finite dense floats.
    """

    dense: tuple[DenseSpec, ...]
    labels: tuple[str, ...]
    label_rates: tuple[tuple[float, float], ...] | None
    weight_column: str | None
    id_columns: tuple[str, ...]
    sparse: tuple[SparseSpec, ...]
    nan_policy: str

    def columns(self) -> list[str]:
        names = [column for spec in self.dense for column in spec.columns]
        names += [*self.labels, *self.id_columns, *(spec.column for spec in self.sparse)]
        if self.weight_column is not None:
            names.append(self.weight_column)
        return list(dict.fromkeys(names))


def _numeric(dtype: pa.DataType, target: str) -> bool:
    if pa.types.is_integer(dtype) or pa.types.is_boolean(dtype):
        return True
    return target == "float32" and pa.types.is_floating(dtype)


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)


def check_schema(schema: pa.Schema, path: str, plan: DecodePlan) -> None:
    """Raise DataError for a missing column or a column of the wrong type (before decoding anything)."""
    fields = {field.name: field.type for field in schema}

    def get(column: str, role: str) -> pa.DataType:
        if column not in fields:
            raise DataError(
                f"{path}: missing {role} column {column!r}; the file's columns are {sorted(fields)}"
            )
        return fields[column]

    for spec in plan.dense:
        for column in spec.columns:
            dtype = get(column, f"dense '{spec.name}'")
            what = "integer/boolean" if spec.dtype == "int64" else "numeric"
            if spec.is_list:
                fixed = pa.types.is_fixed_size_list(dtype)
                if not _is_list(dtype) or not _numeric(dtype.value_type, spec.dtype):
                    raise DataError(f"{path}: column {column!r} is {dtype}, expected a list of {what} values")
                if fixed and dtype.list_size != spec.length:
                    raise DataError(
                        f"{path}: column {column!r} holds lists of {dtype.list_size} values, expected "
                        f"{spec.length} (seg_dense_schema feature '{spec.name}')"
                    )
            elif not _numeric(dtype, spec.dtype):
                raise DataError(f"{path}: column {column!r} is {dtype}, expected a scalar {what} column")
    scalars = [(name, "label", "float32") for name in plan.labels]
    scalars += [(name, "id", "int64") for name in plan.id_columns]
    if plan.weight_column is not None:
        scalars.append((plan.weight_column, "weight", "float32"))
    for column, role, target in scalars:
        dtype = get(column, role)
        if not _numeric(dtype, target):
            what = "integer" if target == "int64" else "numeric"
            raise DataError(f"{path}: {role} column {column!r} is {dtype}, expected a scalar {what} column")
    for spec in plan.sparse:
        dtype = get(spec.column, f"sparse feature '{spec.name}'")
        if not sparse_type_ok(dtype):
            raise DataError(
                f"{path}: sparse column {spec.column!r} is {dtype}, expected int, string or a list of those"
            )


def _single(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], type=column.type)
    return column.combine_chunks()


def _to_tensor(values: pa.Array, target: str, path: str, column: str) -> tuple[torch.Tensor, bool]:
    """Flat values -> 1-D tensor of `target` dtype; second item: whether non-finite values are possible."""
    np_dtype = np.float32 if target == "float32" else np.int64
    floating = pa.types.is_floating(values.type)
    if values.null_count:
        if target == "int64":
            raise DataError(f"{path}: column {column!r} has {values.null_count} null values, expected none")
        values = pc.fill_null(pc.cast(values, pa.float32(), safe=False), float("nan"))
        floating = True
    if values.type == pa.from_numpy_dtype(np_dtype):
        return torch.from_dlpack(values), floating
    array = values.to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array), floating


def _check_finite(
    tensor: torch.Tensor, policy: str, path: str, name: str, counts: dict[str, int]
) -> torch.Tensor:
    # NaN and inf propagate through a sum, so a finite sum proves every value finite at the cost of one
    # reduction; an overflowing sum of finite values only falls through to the exact check below.
    if bool(torch.isfinite(tensor.sum())):
        return tensor
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    bad = int(finite.numel() - finite.sum())
    if policy == "error":
        raise DataError(
            f"{path}: column for dense '{name}' has {bad} non-finite values (NaN/inf/null), "
            "expected finite floats (preprocess.nan_policy = error)"
        )
    counts[name] = counts.get(name, 0) + bad
    if policy == "zero":
        return torch.where(finite, tensor, torch.zeros((), dtype=tensor.dtype))
    return tensor


def _list_values(array: pa.Array, spec: DenseSpec, path: str) -> pa.Array:
    column = spec.columns[0]
    if array.null_count:
        raise DataError(f"{path}: column {column!r} has {array.null_count} null lists, expected none")
    if not pa.types.is_fixed_size_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != spec.length)
        if len(wrong):
            row = int(wrong[0])
            raise DataError(
                f"{path}: column {column!r} row {row} holds {int(lengths[row])} values, expected "
                f"{spec.length} ({len(wrong)} rows have the wrong length)"
            )
    return array.flatten()


def _dense(table: pa.Table, spec: DenseSpec, path: str, policy: str, counts: dict[str, int]) -> torch.Tensor:
    n = table.num_rows
    if spec.is_list:
        values = _list_values(_single(table.column(spec.columns[0])), spec, path)
        flat, floating = _to_tensor(values, spec.dtype, path, spec.columns[0])
        tensor = flat.view(n, spec.length)
        if spec.truncation is not None:
            tensor = tensor[:, : spec.truncation]
        if spec.keep is not None:
            tensor = tensor.index_select(1, torch.from_numpy(spec.keep))
        tensor = tensor.contiguous()
    else:
        parts = [_to_tensor(_single(table.column(c)), spec.dtype, path, c) for c in spec.columns]
        tensor = torch.stack([part for part, _ in parts], dim=1) if n else torch.empty(0, spec.width)
        floating = any(flag for _, flag in parts)
        tensor = tensor.to(torch.float32 if spec.dtype == "float32" else torch.int64)
    if floating:
        tensor = _check_finite(tensor, policy, path, spec.name, counts)
    return tensor


def _scalar(table: pa.Table, column: str, target: str, path: str, role: str) -> np.ndarray:
    values = _single(table.column(column))
    if values.null_count:
        raise DataError(f"{path}: {role} column {column!r} has {values.null_count} nulls, expected none")
    array = values.to_numpy(zero_copy_only=False).astype(np.float32 if target == "float32" else np.int64)
    if target == "float32" and not np.isfinite(array).all():
        raise DataError(f"{path}: {role} column {column!r} has non-finite values, expected finite numbers")
    return array


def decode_table(table: pa.Table, path: str, plan: DecodePlan) -> Chunk:
    """Decode one row group (already read with `plan.columns()`) into a Chunk."""
    n = table.num_rows
    counts: dict[str, int] = {}
    dense = {spec.name: _dense(table, spec, path, plan.nan_policy, counts) for spec in plan.dense}
    labels = np.empty((n, len(plan.labels)), dtype=np.float32)
    for index, name in enumerate(plan.labels):
        labels[:, index] = _scalar(table, name, "float32", path, "label")
    weights = np.ones_like(labels)
    if plan.label_rates is not None:
        pos = np.array([rate[0] for rate in plan.label_rates], dtype=np.float32)
        neg = np.array([rate[1] for rate in plan.label_rates], dtype=np.float32)
        weights = labels / pos + (1.0 - labels) / neg
    if plan.weight_column is not None:
        weights = weights * _scalar(table, plan.weight_column, "float32", path, "weight")[:, None]
    ids = {name: torch.from_numpy(_scalar(table, name, "int64", path, "id")) for name in plan.id_columns}
    sparse = [decode_sparse(_single(table.column(spec.column)), spec, path) for spec in plan.sparse]
    return Chunk(
        dense=dense,
        labels=torch.from_numpy(labels),
        weights=torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
        ids=ids,
        sparse_values=[values for values, _ in sparse],
        sparse_offsets=[offsets for _, offsets in sparse],
        nonfinite=counts,
    )
