"""The ranking decoder: segdense / named dense columns, labels, weights, ids, sparse ids and sparse
continuous (id -> value) features -> RecapBatch.

Per row group of n rows (T = number of labels): dense tensors [n, width], labels and weights [n, T]
float32, ids [n] int64, per sparse feature flat int64 ids with offsets [n + 1], and per sparse continuous
feature flat ids and float32 values sharing offsets [n + 1], held in a `TensorChunk`; `to_batch` builds the
RecapBatch (and the KeyedJaggedTensor when there are sparse features). Non-finite dense floats and sparse
continuous values are counted in `dataset.stats["nonfinite"]` and `["nonfinite/<name>"]`.

Example:
    decoder = ranking_decoder(config.train_data, label_names=["is_clicked"])
    decoder.check_schema(parquet_file.schema_arrow, "a.parquet")
    chunk, counts = decoder.decode(parquet_file.read_row_group(0, columns=decoder.columns()), "a.parquet", 0)
    batch = decoder.to_batch(chunk)   # RecapBatch of the row group's rows
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tml.reader.arrow_to_torch import numeric, single, to_tensor
from tml.reader.arrow_types import is_list
from tml.reader.batch import RecapBatch, SparseValues
from tml.reader.chunk import TensorChunk
from tml.reader.config import DataSource
from tml.reader.decoder import DataError, location
from tml.reader.schema import DenseSpec, resolve_dense_specs
from tml.reader.sparse import (
    SparseContinuousSpec,
    SparseSpec,
    build_kjt,
    decode_sparse,
    decode_sparse_continuous,
    sparse_continuous_type_problem,
    sparse_type_ok,
)
from tml.reader.vectors import VECTOR_KEY, logical_schema, unpack_table


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything ranking decoding needs, as flat data.

    Args:
        dense: the dense tensors to build.
        labels: label column names, in batch order.
        label_rates: per label (pos_rate, neg_rate) to reweight by, or None for no reweighting.
        weight_column: per-example weight column or None.
        id_columns: int passthrough columns.
        sparse: sparse id features in KJT key order.
        nan_policy: "zero", "error" or "keep" for non-finite dense floats and sparse continuous values.
        sparse_continuous: sparse continuous (id -> value) features.
    """

    dense: tuple[DenseSpec, ...]
    labels: tuple[str, ...]
    label_rates: tuple[tuple[float, float], ...] | None
    weight_column: str | None
    id_columns: tuple[str, ...]
    sparse: tuple[SparseSpec, ...]
    nan_policy: str
    sparse_continuous: tuple[SparseContinuousSpec, ...] = ()

    def columns(self) -> list[str]:
        names = [column for spec in self.dense for column in spec.columns]
        names += [*self.labels, *self.id_columns, *(spec.column for spec in self.sparse)]
        names += [column for spec in self.sparse_continuous for column in spec.columns]
        if self.weight_column is not None:
            names.append(self.weight_column)
        return list(dict.fromkeys(names))


def check_schema(schema: pa.Schema, path: str, plan: DecodePlan) -> None:
    """Raise DataError for a missing column or a column of the wrong type (before decoding anything).

    Packed vectors (tml.reader.vectors) are checked as the fixed-size lists they hold.
    """
    try:
        schema = logical_schema(schema)
    except ValueError as error:
        raise DataError(f"{path}: {error}") from None
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
                if pa.types.is_fixed_size_binary(dtype):
                    raise DataError(
                        f"{path}: column {column!r} is {dtype} without the field metadata "
                        f"{VECTOR_KEY.decode()!r} that names a packed vector's element type, expected a list "
                        f"of {what} values or a vector packed by tml (tml.reader.vectors, tml-pq rewrite)"
                    )
                if not is_list(dtype) or not numeric(dtype.value_type, spec.dtype):
                    raise DataError(f"{path}: column {column!r} is {dtype}, expected a list of {what} values")
                if fixed and dtype.list_size != spec.length:
                    raise DataError(
                        f"{path}: column {column!r} holds lists of {dtype.list_size} values, expected "
                        f"{spec.length} (seg_dense_schema feature '{spec.name}')"
                    )
            elif not numeric(dtype, spec.dtype):
                raise DataError(f"{path}: column {column!r} is {dtype}, expected a scalar {what} column")
    scalars = [(name, "label", "float32") for name in plan.labels]
    scalars += [(name, "id", "int64") for name in plan.id_columns]
    if plan.weight_column is not None:
        scalars.append((plan.weight_column, "weight", "float32"))
    for column, role, target in scalars:
        dtype = get(column, role)
        if not numeric(dtype, target):
            what = "integer" if target == "int64" else "numeric"
            raise DataError(f"{path}: {role} column {column!r} is {dtype}, expected a scalar {what} column")
    for spec in plan.sparse:
        dtype = get(spec.column, f"sparse feature '{spec.name}'")
        if not sparse_type_ok(dtype):
            raise DataError(
                f"{path}: sparse column {spec.column!r} is {dtype}, expected int, string or a list of those"
            )
    for spec in plan.sparse_continuous:
        types = {column: get(column, f"sparse continuous feature '{spec.name}'") for column in spec.columns}
        problem = sparse_continuous_type_problem(spec, types)
        if problem is not None:
            raise DataError(f"{path}: sparse continuous feature '{spec.name}': {problem}")


def _check_finite(
    tensor: torch.Tensor, policy: str, where: str, name: str, counts: dict[str, int], role: str = "dense"
) -> torch.Tensor:
    # NaN and inf propagate through a sum, so a finite sum proves every value finite at the cost of one
    # reduction; an overflowing sum of finite values only falls through to the exact check below.
    if bool(torch.isfinite(tensor.sum())):
        return tensor
    # numpy's isfinite and count_nonzero are vectorised; torch's boolean kernels are 10-30x slower on CPU
    # (benchmarks/RESULTS.md, "Reader decode cost").
    finite = np.isfinite(tensor.numpy())
    bad = finite.size - int(np.count_nonzero(finite))
    if not bad:
        return tensor
    if policy == "error":
        raise DataError(
            f"{where}: column for {role} '{name}' has {bad} non-finite values (NaN/inf/null), "
            "expected finite floats (preprocess.nan_policy = error)"
        )
    counts[name] = counts.get(name, 0) + bad
    if policy == "zero":
        return torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)
    return tensor


def _list_values(array: pa.Array, spec: DenseSpec, where: str) -> pa.Array:
    column = spec.columns[0]
    if array.null_count:
        raise DataError(f"{where}: column {column!r} has {array.null_count} null lists, expected none")
    if not pa.types.is_fixed_size_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != spec.length)
        if len(wrong):
            row = int(wrong[0])
            raise DataError(
                f"{where}: column {column!r} row {row} holds {int(lengths[row])} values, expected "
                f"{spec.length} ({len(wrong)} rows have the wrong length)"
            )
    return array.flatten()


def _dense(table: pa.Table, spec: DenseSpec, where: str, policy: str, counts: dict[str, int]) -> torch.Tensor:
    n = table.num_rows
    if spec.is_list:
        values = _list_values(single(table.column(spec.columns[0])), spec, where)
        flat, floating = to_tensor(values, spec.dtype, where, spec.columns[0])
        tensor = flat.view(n, spec.length)
        if spec.truncation is not None:
            tensor = tensor[:, : spec.truncation]
        if spec.keep is not None:
            tensor = tensor.index_select(1, torch.from_numpy(spec.keep))
        tensor = tensor.contiguous()
    else:
        parts = [to_tensor(single(table.column(c)), spec.dtype, where, c) for c in spec.columns]
        tensor = torch.stack([part for part, _ in parts], dim=1) if n else torch.empty(0, spec.width)
        floating = any(flag for _, flag in parts)
        tensor = tensor.to(torch.float32 if spec.dtype == "float32" else torch.int64)
    if floating:
        tensor = _check_finite(tensor, policy, where, spec.name, counts)
    return tensor


def _scalar(table: pa.Table, column: str, target: str, where: str, role: str) -> np.ndarray:
    values = single(table.column(column))
    if values.null_count:
        raise DataError(f"{where}: {role} column {column!r} has {values.null_count} nulls, expected none")
    array = values.to_numpy(zero_copy_only=False).astype(np.float32 if target == "float32" else np.int64)
    if target == "float32" and not np.isfinite(array).all():
        raise DataError(f"{where}: {role} column {column!r} has non-finite values, expected finite numbers")
    return array


def decode_table(table: pa.Table, where: str, plan: DecodePlan) -> tuple[TensorChunk, dict[str, int]]:
    """Decode one row group (read with `plan.columns()`); counts: non-finite dense values per dense name."""
    try:
        table = unpack_table(table)
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    n = table.num_rows
    counts: dict[str, int] = {}
    tensors: dict = {
        ("dense", spec.name): _dense(table, spec, where, plan.nan_policy, counts) for spec in plan.dense
    }
    labels = np.empty((n, len(plan.labels)), dtype=np.float32)
    for index, name in enumerate(plan.labels):
        labels[:, index] = _scalar(table, name, "float32", where, "label")
    weights = np.ones_like(labels)
    if plan.label_rates is not None:
        pos = np.array([rate[0] for rate in plan.label_rates], dtype=np.float32)
        neg = np.array([rate[1] for rate in plan.label_rates], dtype=np.float32)
        weights = labels / pos + (1.0 - labels) / neg
    if plan.weight_column is not None:
        weights = weights * _scalar(table, plan.weight_column, "float32", where, "weight")[:, None]
    tensors["labels"] = torch.from_numpy(labels)
    tensors["weights"] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    for name in plan.id_columns:
        tensors[("ids", name)] = torch.from_numpy(_scalar(table, name, "int64", where, "id"))
    jagged = {
        spec.name: decode_sparse(single(table.column(spec.column)), spec, where) for spec in plan.sparse
    }
    for spec in plan.sparse_continuous:
        arrays = [single(table.column(column)) for column in spec.columns]
        ids, values, offsets = decode_sparse_continuous(arrays, spec, where)
        values = _check_finite(values, plan.nan_policy, where, spec.name, counts, "sparse continuous")
        jagged[("sparse_continuous/ids", spec.name)] = (ids, offsets)
        jagged[("sparse_continuous/values", spec.name)] = (values, offsets)
    return TensorChunk(n, tensors, jagged), counts


class RankingDecoder:
    """The Decoder (tml.reader.decoder) of ranking examples: RecapBatch-es as described in docs/design.md.

    Args:
        plan: what to decode.
        sparse_stride: rows of every batch's KeyedJaggedTensor (the rank's batch size): a shorter batch
            (the last of an epoch) gets empty bags after its rows. Row-wise sharded tables exchange pooled
            rows between ranks in fixed-size pieces, so every rank must present the same number of rows
            in every step, whatever its own batch holds; the model keeps the first B pooled rows.
    """

    stat_names = ("nonfinite",)

    def __init__(self, plan: DecodePlan, sparse_stride: int | None = None) -> None:
        self.plan = plan
        self.sparse_stride = sparse_stride
        self._sparse_keys = [spec.name for spec in plan.sparse]

    def columns(self) -> list[str]:
        return self.plan.columns()

    def check_schema(self, schema: pa.Schema, path: str) -> None:
        check_schema(schema, path, self.plan)

    def decode(self, table: pa.Table, path: str, row_group: int) -> tuple[TensorChunk, dict[str, int]]:
        chunk, nonfinite = decode_table(table, location(path, row_group), self.plan)
        counts = {f"nonfinite/{name}": count for name, count in nonfinite.items()}
        if nonfinite:
            counts["nonfinite"] = sum(nonfinite.values())
        return chunk, counts

    def to_batch(self, chunk: TensorChunk) -> RecapBatch:
        sparse = None
        if self._sparse_keys:
            values = [chunk.jagged[key][0] for key in self._sparse_keys]
            lengths = [chunk.jagged[key][1][1:] - chunk.jagged[key][1][:-1] for key in self._sparse_keys]
            missing = (self.sparse_stride or chunk.num_rows) - chunk.num_rows
            if missing > 0:
                lengths = [torch.cat([length, length.new_zeros(missing)]) for length in lengths]
            sparse = build_kjt(self._sparse_keys, values, lengths)
        return RecapBatch(
            dense={spec.name: chunk.tensors[("dense", spec.name)] for spec in self.plan.dense},
            labels=chunk.tensors["labels"],
            weights=chunk.tensors["weights"],
            sparse=sparse,
            ids={name: chunk.tensors[("ids", name)] for name in self.plan.id_columns},
            sparse_continuous={
                spec.name: sparse_values(chunk, spec.name) for spec in self.plan.sparse_continuous
            },
        )


def sparse_values(chunk: TensorChunk, name: str) -> SparseValues:
    """The sparse continuous feature `name` of decoded rows."""
    ids, offsets = chunk.jagged[("sparse_continuous/ids", name)]
    return SparseValues(ids, chunk.jagged[("sparse_continuous/values", name)][0], offsets)


def ranking_decoder(
    config: DataSource,
    label_names: list[str],
    apply_downsampling_weights: bool = False,
    id_columns: Sequence[str] = (),
    sparse_stride: int | None = None,
) -> RankingDecoder:
    """The RankingDecoder of a data section (schema files and masks are read here).

    Args:
        config: the data section.
        label_names: label columns in batch order (matched by name).
        apply_downsampling_weights: multiply weights by `label/pos_rate + (1-label)/neg_rate` per task.
        id_columns: integer columns passed through to `batch.ids`.
        sparse_stride: pad every batch's KeyedJaggedTensor to this many rows (see RankingDecoder).
    """
    duplicates = sorted({name for name in label_names if label_names.count(name) > 1})
    if duplicates:
        raise ValueError(f"label names repeat: {duplicates}")
    rates = None
    if apply_downsampling_weights:
        rates = []
        for name in label_names:
            task = config.tasks.get(name)
            rates.append((task.pos_downsampling_rate, task.neg_downsampling_rate) if task else (1.0, 1.0))
    return RankingDecoder(
        DecodePlan(
            dense=tuple(resolve_dense_specs(config)),
            labels=tuple(label_names),
            label_rates=tuple(rates) if rates is not None else None,
            weight_column=config.weight_column,
            id_columns=tuple(id_columns),
            sparse=tuple(SparseSpec(f.name, f.column, f.num_buckets) for f in config.sparse_features),
            nan_policy=config.preprocess.nan_policy,
            sparse_continuous=tuple(
                SparseContinuousSpec(f.name, f.column, f.ids_column, f.values_column, f.num_buckets)
                for f in config.sparse_continuous_features
            ),
        ),
        sparse_stride,
    )
