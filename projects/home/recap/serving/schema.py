"""The artifact's feature schema and the one decode path: Arrow rows -> the reader's ranking decoder ->
the program's plain tensors.

The schema is the reader's resolved `DenseSpec`s / `SparseSpec`s / `SparseContinuousSpec`s (columns, list
lengths, dtypes, truncation, mask indices, id buckets, NaN policy) written as JSON at export, so that serving needs neither
the data config's schema files nor its masks, and decodes requests exactly as training decoded files.

Example:
    plan = decode_plan(meta["inputs"], with_ids=False)
    check_schema(table.schema, "request", plan)
    chunk, _ = decode_table(table, "request", plan)
    inputs = program_inputs(chunk, plan)   # (dense, ids, offsets[, sparse continuous values])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tml.reader.chunk import TensorChunk
from tml.reader.config import DataConfig
from tml.reader.ranking import DecodePlan, check_schema, decode_table, sparse_values
from tml.reader.schema import DenseSpec, resolve_dense_specs
from tml.reader.sparse import SparseContinuousSpec, SparseSpec

__all__ = ["check_schema", "decode_plan", "decode_rows", "input_schema", "program_inputs"]


def input_schema(
    data: DataConfig, dense_names: list[str], sparse_rows: dict[str, int], continuous_names: list[str] = ()
) -> dict:
    """The inputs section of artifact.json: the dense tensors, sparse features (`sparse_rows`: feature ->
    rows of its table, in table order) and sparse continuous features (`continuous_names`) the model
    reads."""
    specs = {spec.name: spec for spec in resolve_dense_specs(data)}
    features = {feature.name: feature for feature in data.sparse_features}
    dense = []
    for name in dense_names:
        spec = specs[name]
        dense.append(
            {
                "name": spec.name,
                "columns": list(spec.columns),
                "is_list": spec.is_list,
                "length": spec.length,
                "dtype": spec.dtype,
                "width": spec.width,
                "truncation": spec.truncation,
                "keep": None if spec.keep is None else spec.keep.tolist(),
            }
        )
    sparse = [
        {"name": n, "column": features[n].column, "num_buckets": features[n].num_buckets, "rows": rows}
        for n, rows in sparse_rows.items()
    ]
    continuous = {feature.name: feature for feature in data.sparse_continuous_features}
    schema = {
        "dense": dense,
        "sparse": sparse,
        "nan_policy": data.preprocess.nan_policy,
        "id_columns": list(data.id_columns),
    }
    if continuous_names:  # left out otherwise: artifacts without them keep their three-input program
        schema["sparse_continuous"] = [
            continuous[name].model_dump(
                include={"name", "column", "ids_column", "values_column", "num_buckets"}
            )
            for name in continuous_names
        ]
    return schema


def decode_plan(inputs: dict, with_ids: bool) -> DecodePlan:
    """The reader's DecodePlan of an artifact's inputs, without labels; `with_ids`: pass the id columns
    through (offline scoring writes them, as predict does)."""
    dense = tuple(
        DenseSpec(
            d["name"],
            tuple(d["columns"]),
            d["is_list"],
            d["length"],
            d["dtype"],
            d["truncation"],
            None if d["keep"] is None else np.asarray(d["keep"], dtype=np.int64),
        )
        for d in inputs["dense"]
    )
    return DecodePlan(
        dense=dense,
        labels=(),
        label_rates=None,
        weight_column=None,
        id_columns=tuple(inputs["id_columns"]) if with_ids else (),
        sparse=tuple(SparseSpec(s["name"], s["column"], s["num_buckets"]) for s in inputs["sparse"]),
        nan_policy=inputs["nan_policy"],
        sparse_continuous=tuple(
            SparseContinuousSpec(
                c["name"], c["column"], c["ids_column"], c["values_column"], c["num_buckets"]
            )
            for c in inputs.get("sparse_continuous", [])
        ),
    )


def decode_rows(table: pa.Table, where: str, plan: DecodePlan) -> TensorChunk:
    """Check the columns of `table` and decode it with the ranking decoder (DataError naming the column)."""
    check_schema(table.schema, where, plan)
    chunk, _ = decode_table(table.select(plan.columns()), where, plan)
    return chunk


def program_inputs(chunk: TensorChunk, plan: DecodePlan) -> tuple[dict[str, torch.Tensor], ...]:
    """(dense, sparse ids, sparse offsets) of decoded rows, as the exported program takes them, and the
    sparse continuous features' values when the plan has any (their ids and offsets join the others)."""
    dense = {spec.name: chunk.tensors[("dense", spec.name)] for spec in plan.dense}
    values = {spec.name: chunk.jagged[spec.name][0] for spec in plan.sparse}
    offsets = {spec.name: chunk.jagged[spec.name][1] for spec in plan.sparse}
    if not plan.sparse_continuous:
        return dense, values, offsets
    weights = {}
    for spec in plan.sparse_continuous:
        feature = sparse_values(chunk, spec.name)
        values[spec.name], offsets[spec.name], weights[spec.name] = (
            feature.ids,
            feature.offsets,
            feature.values,
        )
    return dense, values, offsets, weights
