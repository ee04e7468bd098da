"""The `model.discretizer` and `model.sparse_linear` sections (docs/platform.md).

`discretizer`: continuous values -> percentile bins calibrated on the training data (`tml-recap
calibrate-discretizer` writes `boundaries_path`), each (feature, bin) hashed into `out_bits` bits.
`sparse_linear`: a linear layer over sparse inputs - the discretizer's bin ids and sparse continuous
(id -> value) features - with online max-abs normalisation and a per-id presence bias.

Example:
    model:
      discretizer: {features: [continuous], boundaries_path: runs/x/discretizer.json, out_bits: 16}
      sparse_linear: {output_size: 32, features: [discretizer, engagement_counts]}
"""

from __future__ import annotations

import pydantic

from tml.core.config.base import BaseConfig

# The bin-id table of every discretized input has one row per column (dense) or per id (sparse).
MAX_DISCRETIZED_IDS = 1 << 20
DISCRETIZER = "discretizer"


def _distinct_features(features: list[str]) -> list[str]:
    if len(set(features)) != len(features):
        raise ValueError(f"features repeat: {features}")
    return features


class DiscretizerConfig(BaseConfig):
    """Percentile bins of continuous inputs, with bin ids that survive re-calibration."""

    features: list[str] = pydantic.Field(
        min_length=1,
        description="What is discretized: dense tensors of the data (every column of each, e.g. "
        "`continuous`) and sparse continuous features (`train_data.sparse_continuous_features` names; each "
        f"id gets its own bins, so num_buckets <= {MAX_DISCRETIZED_IDS}).",
    )
    boundaries_path: str = pydantic.Field(
        description="The calibration file (JSON), written by `tml-recap calibrate-discretizer` and read when "
        "the model is built. The checkpoints do not hold the boundaries: keep the file with the run (e.g. "
        "inside training.save_dir).",
    )
    out_bits: int = pydantic.Field(
        18,
        ge=8,
        le=24,
        description="Bin ids are hashes of (feature, bin) in [0, 2**out_bits): the rows of the table "
        "the bins look up in model.sparse_linear.",
    )
    num_bins: int = pydantic.Field(
        16,
        ge=2,
        le=1024,
        description="Calibration: bins per feature, cut at the quantiles i / num_bins (ties merge bins).",
    )
    relative_accuracy: float = pydantic.Field(
        0.005,
        gt=0.0,
        le=0.1,
        description="Calibration: every boundary lies within this relative error of a value of the data at "
        "its quantile (the quantile sketch's guarantee; the sketch keeps one count per value range of this "
        "relative width).",
    )
    max_rows: int | None = pydantic.Field(
        1_000_000,
        ge=1,
        description="Calibration: sample whole row groups of train_data (in an order fixed by their file "
        "names and indices) until at least this many rows; None reads all of train_data.",
    )

    _distinct = pydantic.field_validator("features")(_distinct_features)


class SparseLinearConfig(BaseConfig):
    """out = sum over a row's inputs of W[id] * value / max_abs[id] + b[id], a [B, output_size] segment."""

    output_size: pydantic.PositiveInt = pydantic.Field(
        description="Width of the segment (`sparse_linear` among the model's features)."
    )
    features: list[str] = pydantic.Field(
        min_length=1,
        description=f"Inputs: `{DISCRETIZER}` (every bin id of model.discretizer, value 1) and sparse continuous "
        "features (train_data.sparse_continuous_features names), whose values are divided by a running "
        "max |value| per id.",
    )

    _distinct = pydantic.field_validator("features")(_distinct_features)
