"""DataConfig validation and dense_widths (schema files and masks read from disk)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import yaml

from tml.reader.config import DataConfig, SegDenseFeature, SegDenseSchema, TaskData, dense_widths

pytestmark = pytest.mark.unit

FEATURES = [{"name": "continuous", "length": 10}, {"name": "binary", "length": 6, "dtype": "int64"},
            {"name": "user_embedding", "length": 4}]  # fmt: skip


def _config(**overrides) -> DataConfig:
    raw = {"inputs": "x/*.parquet", "global_batch_size": 8, "seg_dense_schema": {"features": FEATURES}}
    raw.update(overrides)
    return DataConfig.model_validate(raw)


def test_widths_with_truncation_masks_and_groups(tmp_path):
    np.save(tmp_path / "mask.npy", np.array([0, 2, 5]))
    (tmp_path / "bin.txt").write_text("1\n3\n")
    config = _config(
        preprocess={"truncate_and_slice": {
            "continuous_feature_truncation": 8, "continuous_feature_mask_path": str(tmp_path / "mask.npy"),
            "binary_feature_mask_path": str(tmp_path / "bin.txt")}},
        dense_columns=[{"name": "counts", "columns": ["a", "b", "c"]}],
    )  # fmt: skip
    assert dense_widths(config) == {"continuous": 3, "binary": 2, "user_embedding": 4, "counts": 3}


def test_schema_file(tmp_path):
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FEATURES))
    schema = {"schema_path": str(tmp_path / "schema.yaml"), "renamed_features": {"continuous": "cont"}}
    config = _config(
        seg_dense_schema=schema, preprocess={"truncate_and_slice": {"binary_feature_truncation": 2}}
    )
    assert dense_widths(config) == {"continuous": 10, "binary": 2, "user_embedding": 4}
    config = _config(seg_dense_schema={**schema, "renamed_features": {"nope": "x"}})
    with pytest.raises(ValueError, match=r"renamed_features names unknown features \['nope'\]"):
        dense_widths(config)
    config = _config(
        seg_dense_schema=schema, preprocess={"truncate_and_slice": {"binary_feature_truncation": 7}}
    )
    with pytest.raises(ValueError, match="binary_feature_truncation = 7 exceeds the length 6"):
        dense_widths(config)
    (tmp_path / "bad.yaml").write_text("- {name: a}\n")
    with pytest.raises(
        ValueError, match=r"schema_path '.*bad\.yaml': expected a list of \{name, length, dtype\}"
    ):
        dense_widths(_config(seg_dense_schema={"schema_path": str(tmp_path / "bad.yaml")}))


def test_bad_masks(tmp_path):
    np.save(tmp_path / "mask.npy", np.array([0, 9]))
    truncate = {
        "continuous_feature_truncation": 8,
        "continuous_feature_mask_path": str(tmp_path / "mask.npy"),
    }
    with pytest.raises(
        ValueError, match=r"continuous_feature_mask_path .*indices \[9\] are outside \[0, 8\)"
    ):
        dense_widths(_config(preprocess={"truncate_and_slice": truncate}))
    (tmp_path / "mask.txt").write_text("1 x")
    with pytest.raises(ValueError, match="cannot read int indices"):
        dense_widths(
            _config(
                preprocess={"truncate_and_slice": {"binary_feature_mask_path": str(tmp_path / "mask.txt")}}
            )
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"preprocess": {"truncate_and_slice": {"continuous_feature_truncation": 11}}},
            "exceeds the length 10",
        ),
        ({"seg_dense_schema": {"features": FEATURES, "renamed_features": {"x": "y"}}}, "unknown features"),
        ({"seg_dense_schema": {"features": FEATURES, "schema_path": "s.yaml"}}, "exactly one of"),
        ({"seg_dense_schema": {"features": FEATURES[:1] * 2}}, "duplicate feature names"),
        ({"dense_columns": [{"name": "binary", "columns": ["a"]}]}, "used twice"),
        (
            {
                "seg_dense_schema": None,
                "preprocess": {"truncate_and_slice": {"binary_feature_truncation": 1}},
            },
            "needs seg_dense_schema",
        ),
        (
            {"sparse_features": [{"name": "f", "column": "a"}, {"name": "f", "column": "b"}]},
            "duplicate names",
        ),
        ({"global_batch_size": 0}, "greater than 0"),
        ({"num_workers": -1}, "greater than or equal to 0"),
        ({"num_workers": 2, "decode_process": True}, "decode_process: true with num_workers: 2"),
        ({"unknown_key": 1}, "Extra inputs are not permitted"),
    ],
)
def test_rejected(overrides, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        _config(**overrides)


def test_sections():
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 1"):
        TaskData(neg_downsampling_rate=1.5)
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        SegDenseFeature(name="x", length=0)
    assert SegDenseSchema(features=[SegDenseFeature(name="x", length=2)]).renamed_features == {}
