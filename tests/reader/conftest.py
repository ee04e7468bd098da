"""Fixtures of the reader tests: tiny Parquet files whose every value encodes its row id."""

from __future__ import annotations

import logging
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.reader.config import DataConfig

CONTINUOUS = 6
BINARY = 4


def make_table(num_rows: int, first_id: int = 0) -> pa.Table:
    """Row i has uid first_id + i; continuous[j] = uid * 10 + j; labels alternate; weight = 1 + uid % 3."""
    uid = np.arange(first_id, first_id + num_rows, dtype=np.int64)
    continuous = (uid[:, None] * 10 + np.arange(CONTINUOUS)).astype(np.float32)
    binary = ((uid[:, None] >> np.arange(BINARY)) & 1).astype(np.int64)
    return pa.table(
        {
            "continuous": pa.FixedSizeListArray.from_arrays(pa.array(continuous.ravel()), CONTINUOUS),
            "binary_col": pa.array(list(binary), type=pa.list_(pa.int64())),
            "a": uid.astype(np.float64) * 0.5,
            "b": (uid % 5).astype(np.int32),
            "click": (uid % 2).astype(np.int64),
            "fav": (uid % 3 == 0),
            "w": (1 + uid % 3).astype(np.float32),
            "uid": uid,
            "topics": pa.array(
                [[int(u % 7), int(u % 11)] if u % 4 else [] for u in uid], pa.list_(pa.int64())
            ),
        }
    )


def write(path, num_rows: int, first_id: int = 0, row_group_size: int = 16) -> None:
    pq.write_table(make_table(num_rows, first_id), str(path), row_group_size=row_group_size)


def base_config(inputs: str, **overrides) -> DataConfig:
    raw = {
        "inputs": inputs,
        "global_batch_size": 8,
        "seg_dense_schema": {
            "features": [
                {"name": "continuous", "length": CONTINUOUS},
                {"name": "binary", "length": BINARY, "dtype": "float32"},
            ],
            "renamed_features": {"binary": "binary_col"},
        },
        "id_columns": ["uid"],
        "num_epochs": 1,
        "num_workers": 2,
    }
    raw.update(overrides)
    return DataConfig.model_validate(raw)


def all_ids(batches) -> np.ndarray:
    return np.concatenate([batch.ids["uid"].numpy() for batch in batches]) if batches else np.zeros(0)


@pytest.fixture
def files(tmp_path):
    """Three files of different sizes (40, 7, 25 rows; uids 0..71) plus an empty one."""
    write(tmp_path / "a.parquet", 40, 0)
    write(tmp_path / "b.parquet", 7, 40)
    write(tmp_path / "c.parquet", 25, 47, row_group_size=10)
    write(tmp_path / "d.parquet", 0, 0)
    return tmp_path


@pytest.fixture
def rd():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return types.SimpleNamespace(
        make_table=make_table, write=write, base_config=base_config, all_ids=all_ids,
        CONTINUOUS=CONTINUOUS, BINARY=BINARY,
    )  # fmt: skip


@pytest.fixture
def reader_log(caplog):
    """caplog of the `tml.reader` loggers at INFO, also after `setup_logging` stopped `tml` propagating."""
    logger = logging.getLogger("tml.reader")
    saved = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's root handler would record everything twice
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.level, logger.propagate = saved
