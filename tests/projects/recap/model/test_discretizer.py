"""The discretizer layer: values -> bins -> ids (hash of feature and starting quantile level), precomputed
tables (exportable), and the build-time checks of the boundaries file against the config."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pydantic
import pytest
import torch

from tml.core.config.loader import ConfigError
from tml.projects.home.recap.config.discretizer import DiscretizerConfig, SparseLinearConfig
from tml.projects.home.recap.model.discretizer import (
    FORMAT,
    VERSION,
    build_discretizer,
    discretized_inputs,
    hash_ids,
    write_boundaries,
)
from tml.projects.home.recap.model.sparse_linear import build_sparse_features, calibration_settings
from tml.reader.batch import SparseValues
from tml.reader.config import DataConfig
from tml.reader.sparse import stable_hash

pytestmark = pytest.mark.unit

DATA = DataConfig.model_validate(
    {
        "inputs": "unused",
        "global_batch_size": 4,
        "seg_dense_schema": {"features": [{"name": "continuous", "length": 5}, {"name": "discrete", "length": 2, "dtype": "int64"}]},
        "preprocess": {"truncate_and_slice": {"continuous_feature_truncation": 4, "continuous_feature_mask_path": None}},
        "sparse_continuous_features": [{"name": "counts", "column": "c", "num_buckets": 3}],
        "tasks": {"t": {}},
    }
)  # fmt: skip
CUT = {"levels": [1, 2, 3], "boundaries": [0.0, 1.0, 2.0], "count": 10}  # of 4 bins


def _document(features: dict, discretizer: DiscretizerConfig, data=DATA) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "calibration": calibration_settings(discretizer),
        "inputs": [i.describe() for i in discretized_inputs(discretizer.features, data)],
        "features": features,
    }


def _settings(tmp_path, features=("continuous", "counts"), **extra) -> DiscretizerConfig:
    return DiscretizerConfig(
        features=list(features), boundaries_path=str(tmp_path / "b.json"), out_bits=12, num_bins=4, **extra
    )


def _hash(text: str) -> int:
    return int(stable_hash(pa.array([text]))[0] & ((1 << 12) - 1))


def test_bins_are_left_closed_and_ids_hash_feature_and_starting_level(tmp_path):
    settings = _settings(tmp_path)
    features = {"continuous[0]": CUT, "continuous[2]": {"levels": [2], "boundaries": [5.0], "count": 10},
                "counts:1": CUT}  # fmt: skip
    inputs = discretized_inputs(settings.features, DATA)
    assert [i.keys for i in inputs] == [
        ("continuous[0]", "continuous[1]", "continuous[2]", "continuous[3]"),
        None,
    ]
    discretizer = build_discretizer(inputs, _document(features, settings), out_bits=12, num_bins=4)
    x = torch.tensor([[-1.0, 0.0, 4.9, 7.0], [0.0, 3.0, 5.0, float("nan")], [1.0, 1.0, float("inf"), 1.0],
                      [2.5, -5.0, 6.0, 2.0]])  # fmt: skip
    counts = SparseValues(
        torch.tensor([1, 1, 0, 1]), torch.tensor([0.5, float("nan"), 9.0, 2.0]), torch.tensor([0, 2, 2, 3, 4])
    )
    (dense, none), (sparse, offsets) = discretizer({"continuous": x}, {"counts": counts})
    assert none is None and offsets is counts.offsets
    name = lambda key, level: _hash(f"{key}|{level}")  # noqa: E731
    expected = [
        [name("continuous[0]", "0"), name("continuous[1]", "0"), name("continuous[2]", "0"), name("continuous[3]", "0")],
        [name("continuous[0]", "1/4"), name("continuous[1]", "0"), name("continuous[2]", "1/2"), name("continuous[3]", "missing")],
        [name("continuous[0]", "1/2"), name("continuous[1]", "0"), name("continuous[2]", "1/2"), name("continuous[3]", "0")],
        [name("continuous[0]", "3/4"), name("continuous[1]", "0"), name("continuous[2]", "1/2"), name("continuous[3]", "0")],
    ]  # fmt: skip
    assert dense.tolist() == expected
    # Id 0 of `counts` was never seen in calibration: one bin.
    assert sparse.tolist() == [
        name("counts:1", "1/4"),
        name("counts:1", "missing"),
        name("counts:0", "0"),
        name("counts:1", "3/4"),
    ]
    assert int(dense.max()) < 1 << 12
    assert hash_ids(["continuous[0]|1/4"], 12).tolist() == [name("continuous[0]", "1/4")]


def test_the_segment_exports_with_a_dynamic_batch(tmp_path):
    import torch.fx.experimental._config as fx_config

    settings = _settings(tmp_path)
    write_boundaries(settings.boundaries_path, _document({"continuous[1]": CUT, "counts:2": CUT}, settings))
    segment = build_sparse_features(
        settings, SparseLinearConfig(output_size=3, features=["discretizer", "counts"]), DATA
    )
    segment.eval()

    class Face(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.segment = segment

        def forward(self, x, ids, values, offsets):
            return self.segment({"continuous": x}, {"counts": SparseValues(ids, values, offsets)})

    def sample(rows: int):
        g = torch.Generator().manual_seed(rows)
        lengths = torch.randint(0, 3, (rows,), generator=g)
        n = int(lengths.sum())
        return (torch.randn(rows, 4, generator=g) * 2, torch.randint(0, 3, (n,), generator=g),
                torch.randn(n, generator=g), torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))  # fmt: skip

    batch, n = torch.export.Dim("batch", min=1), torch.export.Dim("n", min=0)
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            Face(), sample(3), dynamic_shapes=({0: batch}, {0: n}, {0: n}, {0: batch + 1}), strict=False
        )
    for rows in (1, 5):
        torch.testing.assert_close(program.module()(*sample(rows)), Face()(*sample(rows)))


def test_build_errors_name_the_key_and_the_fix(tmp_path):
    settings = _settings(tmp_path)
    linear = SparseLinearConfig(output_size=3, features=["discretizer"])
    with pytest.raises(
        FileNotFoundError,
        match=r"model\.discretizer\.boundaries_path .*b\.json.*: no such file; write it with `tml-recap calibrate-discretizer",
    ):
        build_sparse_features(settings, linear, DATA)
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON boundaries file"):
        build_sparse_features(settings, linear, DATA)
    (tmp_path / "b.json").write_text(json.dumps({"mean": [1.0]}))
    with pytest.raises(
        ConfigError, match="not a boundaries file written by `tml-recap calibrate-discretizer`"
    ):
        build_sparse_features(settings, linear, DATA)
    # A file of other features: calibrated for `continuous` only.
    write_boundaries(settings.boundaries_path, _document({}, _settings(tmp_path, ["continuous"])))
    with pytest.raises(
        ConfigError,
        match=r"holds the bins of \['continuous'\], not of 'counts' \(model\.discretizer\.features\)",
    ):
        build_sparse_features(settings, linear, DATA)
    # Calibrated with other columns (no truncation), another num_buckets, other settings.
    wide = DATA.model_copy(
        update={"preprocess": DATA.preprocess.model_copy(update={"truncate_and_slice": None})}
    )
    write_boundaries(settings.boundaries_path, _document({}, settings, data=wide))
    with pytest.raises(ConfigError, match="'continuous' was calibrated with other columns than the data's"):
        build_sparse_features(settings, linear, DATA)
    more = DATA.model_copy(
        update={
            "sparse_continuous_features": [
                DATA.sparse_continuous_features[0].model_copy(update={"num_buckets": 7})
            ]
        }
    )
    write_boundaries(settings.boundaries_path, _document({}, settings, data=more))
    with pytest.raises(ConfigError, match="'counts' was calibrated with num_buckets 7, the data has 3"):
        build_sparse_features(settings, linear, DATA)
    write_boundaries(settings.boundaries_path, _document({}, settings.model_copy(update={"num_bins": 8})))
    with pytest.raises(
        ConfigError, match=r"was calibrated with num_bins 8, but model\.discretizer\.num_bins is 4"
    ):
        build_sparse_features(settings, linear, DATA)


def test_config_errors(tmp_path):
    for bits in (7, 25):
        with pytest.raises(pydantic.ValidationError, match="out_bits"):
            DiscretizerConfig.model_validate({**_settings(tmp_path).model_dump(), "out_bits": bits})
    with pytest.raises(pydantic.ValidationError, match="features repeat"):
        _settings(tmp_path, ["continuous", "continuous"])
    linear = SparseLinearConfig(output_size=3, features=["counts"])
    with pytest.raises(
        ConfigError, match="model.discretizer is set but nothing reads its bins: add 'discretizer'"
    ):
        build_sparse_features(_settings(tmp_path), linear, DATA)
    with pytest.raises(ConfigError, match="names 'discretizer', but model.discretizer is not set"):
        build_sparse_features(None, SparseLinearConfig(output_size=3, features=["discretizer"]), DATA)
    with pytest.raises(ConfigError, match="'nope' is not a sparse continuous feature of the data"):
        build_sparse_features(None, SparseLinearConfig(output_size=3, features=["nope"]), DATA)
    for name, match in [
        ("discrete", "'discrete' is int64; only float32"),
        ("x", "'x' is neither a float32 dense tensor"),
    ]:
        with pytest.raises(ConfigError, match=match):
            discretized_inputs([name], DATA)
    huge = DATA.model_copy(
        update={
            "sparse_continuous_features": [
                DATA.sparse_continuous_features[0].model_copy(update={"num_buckets": 1 << 21})
            ]
        }
    )
    with pytest.raises(
        ConfigError, match="has num_buckets 2097152; every id gets its own boundaries, so at most 1048576"
    ):
        discretized_inputs(["counts"], huge)


def test_a_feature_missing_from_the_file_has_one_bin():
    # continuous[3] is in the file's inputs but was never given boundaries: every value is bin 0.
    settings = DiscretizerConfig(features=["continuous"], boundaries_path="x", out_bits=12, num_bins=4)
    inputs = discretized_inputs(["continuous"], DATA)
    discretizer = build_discretizer(inputs, _document({"continuous[0]": CUT}, settings), 12, 4)
    ((ids, _),) = discretizer({"continuous": torch.tensor([[5.0, -3.0, 0.0, 9.0]])}, {})
    assert ids[0, 1:].tolist() == [_hash(f"continuous[{i}]|0") for i in (1, 2, 3)]
    assert np.unique(ids.numpy()).size == 4
