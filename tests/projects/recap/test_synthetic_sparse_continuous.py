"""Synthetic data for sparse continuous features: a map column or parallel id / value lists, in the config's
schema (the reader decodes them), distinct ids per row, zeros among the values, and labels that depend on
them (a present 0 differs from an absent id)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.projects.home.recap.data.synthetic import generate
from tml.reader.config import DataConfig
from tml.reader.dataset import build_dataset

pytestmark = pytest.mark.unit


def _config(folder: str) -> DataConfig:
    return DataConfig.model_validate(
        {
            "inputs": f"{folder}/*.parquet",
            "global_batch_size": 500,
            "seg_dense_schema": {"features": [{"name": "continuous", "length": 4}]},
            "sparse_continuous_features": [
                {"name": "counts", "column": "counts_map", "num_buckets": 64},
                {
                    "name": "scores",
                    "ids_column": "score_ids",
                    "values_column": "score_values",
                    "num_buckets": 32,
                },
            ],
            "tasks": {"click": {}},
        }
    )


def test_map_and_list_columns_in_the_config_schema_with_signal(tmp_path):
    config = _config(str(tmp_path))
    oracle = generate(config, 4000, str(tmp_path), seed=1, num_files=2, progress=False)
    table = pq.read_table(tmp_path / "part-00000.parquet")
    assert pa.types.is_map(table.schema.field("counts_map").type)
    assert table.schema.field("score_ids").type == pa.list_(pa.field("element", pa.int64(), nullable=False))
    assert table.schema.field("score_values").type == pa.list_(pa.field("element", pa.float32(), False))
    ids = table["score_ids"].to_pylist()
    assert all(len(row) == len(set(row)) for row in ids)  # distinct ids within a row
    assert all(0 <= i < 32 for row in ids for i in row)
    assert any(0.0 in row for row in table["score_values"].to_pylist())  # present with value 0

    batches = list(build_dataset(config, ["click"], num_epochs=1, shuffle=False))
    counts = np.concatenate([b.sparse_continuous["counts"].values.numpy() for b in batches])
    entries = sum(len(b.sparse_continuous["counts"].ids) for b in batches)
    assert entries > 4000 and counts.min() >= 0 and counts.max() > 100

    # The label depends on the sparse values: a model of the popular ids' log values beats chance.
    labels = np.concatenate([b.labels[:, 0].numpy() for b in batches])
    x = np.zeros((len(labels), 64), dtype=np.float32)
    start = 0
    for b in batches:
        f = b.sparse_continuous["counts"]
        rows = np.repeat(np.arange(b.batch_size), np.diff(f.offsets.numpy())) + start
        x[rows, f.ids.numpy()] = 0.5 + np.log1p(f.values.numpy())
        start += b.batch_size
    correlation = np.abs([np.corrcoef(x[:, j], labels)[0, 1] for j in range(64) if x[:, j].std() > 0])
    assert correlation.max() > 0.08 and 0.6 < oracle["click"] <= 1.0
