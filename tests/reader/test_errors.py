"""Bad data: every error names the file, the column and what was expected; NaN policy and counters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.reader.arrow_to_torch import DataError
from tml.reader.dataset import build_dataset

pytestmark = pytest.mark.unit


def _replace(table: pa.Table, name: str, column) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def test_missing_label_column_lists_available(tmp_path, rd):
    rd.write(tmp_path / "a.parquet", 10)
    with pytest.raises(
        DataError, match=r"a\.parquet: missing label column 'nope'; the file's columns are \["
    ):
        build_dataset(rd.base_config(str(tmp_path)), ["nope"])


def test_missing_and_mistyped_dense_columns(tmp_path, rd):
    table = rd.make_table(10)
    pq.write_table(table.drop_columns(["binary_col"]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: missing dense 'binary' column 'binary_col'"):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    pq.write_table(_replace(table, "binary_col", pa.array(["x"] * 10)), tmp_path / "a.parquet")
    with pytest.raises(
        DataError, match=r"a\.parquet: column 'binary_col' is string, expected a list of numeric"
    ):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    pq.write_table(_replace(table, "click", pa.array(["y"] * 10)), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"label column 'click' is string, expected a scalar numeric"):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])


def test_fixed_list_of_wrong_size_is_caught_from_the_footer(tmp_path, rd):
    rd.write(tmp_path / "a.parquet", 10)
    config = rd.base_config(str(tmp_path))
    config.seg_dense_schema.features[0].length = 5
    with pytest.raises(
        DataError, match=r"a\.parquet: column 'continuous' holds lists of 6 values, expected 5"
    ):
        build_dataset(config, ["click"])


def test_variable_list_of_wrong_length_raised_from_worker(tmp_path, rd):
    rd.write(tmp_path / "a.parquet", 40)
    bad = rd.make_table(10, 40)
    bad = _replace(bad, "binary_col", pa.array([[1, 0, 1, 1]] * 6 + [[1, 0]] + [[0, 0, 0, 0]] * 3))
    pq.write_table(bad, tmp_path / "b.parquet", row_group_size=4)
    dataset = build_dataset(rd.base_config(str(tmp_path), shuffle={"shuffle_files": False}), ["click"])
    # Row 6 of the file is row 2 of its second row group.
    with pytest.raises(
        DataError, match=r"b\.parquet \(row group 1\): column 'binary_col' row 2 holds 2 values, expected 4"
    ):
        list(dataset)


def test_unreadable_files_raise_or_are_skipped(tmp_path, rd):
    rd.write(tmp_path / "good.parquet", 10)
    (tmp_path / "text.parquet").write_text("this is not parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"text\.parquet: not a readable Parquet file"):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    (tmp_path / "text.parquet").unlink()
    with pytest.raises(DataError, match=r"truncated\.parquet: not a readable Parquet file"):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    (tmp_path / "text.parquet").write_text("this is not parquet")
    dataset = build_dataset(rd.base_config(str(tmp_path), skip_unreadable_files=True), ["click"])
    assert sum(batch.batch_size for batch in dataset) == 10
    assert dataset.stats["unreadable_files"] == 2 and dataset.stats["files"] == 1


def test_empty_files_and_empty_row_groups(tmp_path, rd):
    table = rd.make_table(5)
    with pq.ParquetWriter(tmp_path / "a.parquet", table.schema) as writer:
        writer.write_table(table.slice(0, 0))
        writer.write_table(table)
        writer.write_table(table.slice(0, 0))
    rd.write(tmp_path / "b.parquet", 0)
    dataset = build_dataset(rd.base_config(str(tmp_path)), ["click"])
    assert [batch.batch_size for batch in dataset] == [5]
    assert dataset.stats["empty_row_groups"] >= 2


def _with_nan(tmp_path, rd):
    table = rd.make_table(10)
    values = np.arange(60, dtype=np.float32)
    values[[3, 17]] = [np.nan, np.inf]
    values = pa.array(values, mask=np.arange(60) == 30)  # a null inside a list counts too
    table = _replace(table, "continuous", pa.FixedSizeListArray.from_arrays(values, 6))
    pq.write_table(table, tmp_path / "a.parquet")


def test_nan_policy(tmp_path, rd):
    _with_nan(tmp_path, rd)
    dataset = build_dataset(rd.base_config(str(tmp_path), global_batch_size=10), ["click"])
    continuous = next(iter(dataset)).dense["continuous"].flatten()
    assert torch.isfinite(continuous).all() and continuous[[3, 17, 30]].tolist() == [0, 0, 0]
    assert (
        continuous[4] == 4 and dataset.stats["nonfinite/continuous"] == 3 and dataset.stats["nonfinite"] == 3
    )
    config = rd.base_config(str(tmp_path), global_batch_size=10, preprocess={"nan_policy": "keep"})
    dataset = build_dataset(config, ["click"])
    kept = next(iter(dataset)).dense["continuous"].flatten()
    assert kept[3].isnan() and kept[17].isinf() and dataset.stats["nonfinite"] == 3
    config = rd.base_config(str(tmp_path), global_batch_size=10, preprocess={"nan_policy": "error"})
    with pytest.raises(DataError, match=r"a\.parquet \(row group 0\): column for dense 'continuous' has 3"):
        list(build_dataset(config, ["click"]))


def test_batch_size_and_rank_checks(tmp_path, rd):
    rd.write(tmp_path / "a.parquet", 10)
    with pytest.raises(ValueError, match="global_batch_size 8 is not divisible by the world size 3"):
        build_dataset(rd.base_config(str(tmp_path)), ["click"], rank=0, world_size=3)
    with pytest.raises(ValueError, match="label names repeat"):
        build_dataset(rd.base_config(str(tmp_path)), ["click", "click"])
