"""What each `batch.dense` tensor is made of, resolved from a data section (schema files and masks read).

A `DenseSpec` says which column(s) feed one dense tensor and how they are cut: a segdense list feature
([B, length] -> truncated to [B, truncation] -> gathered by mask indices to [B, width]) or a group of
scalar columns ([B, len(columns)]).

Example:
    specs = resolve_dense_specs(config)
    {spec.name: spec.width for spec in specs}  # what dense_widths() returns
"""

from __future__ import annotations

import dataclasses
import io
from typing import Literal

import numpy as np
import pydantic
import yaml

from tml.core.config.loader import ConfigError
from tml.reader.config import (
    DataSource,
    SegDenseFeature,
    check_segdense_features,
    check_truncation,
)
from tml.reader.fs import read_bytes


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """One dense tensor of the batch.

    Args:
        name: key in `batch.dense`.
        columns: source columns (one list column, or several scalar columns).
        is_list: True for a fixed-length list column, False for a group of scalar columns.
        length: list length in the files (for a scalar group: the number of columns).
        dtype: "float32" or "int64", the dtype of the batch tensor.
        truncation: keep the first N list values (None: all).
        keep: indices kept after truncation, in order (None: all).
    """

    name: str
    columns: tuple[str, ...]
    is_list: bool
    length: int
    dtype: Literal["float32", "int64"]
    truncation: int | None = None
    keep: np.ndarray | None = dataclasses.field(default=None, compare=False)

    @property
    def width(self) -> int:
        if self.keep is not None:
            return len(self.keep)
        return self.truncation if self.truncation is not None else self.length


def load_segdense_features(schema_path: str) -> list[SegDenseFeature]:
    """Read a YAML/JSON list of {name, length, dtype}; errors name the file."""
    try:
        raw = yaml.safe_load(read_bytes(schema_path))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"seg_dense_schema.schema_path {schema_path!r}: cannot read: {error}") from error
    try:
        return pydantic.TypeAdapter(list[SegDenseFeature]).validate_python(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(
            f"seg_dense_schema.schema_path {schema_path!r}: expected a list of {{name, length, dtype}}: {error}"
        ) from error


def load_mask(path: str, key: str, limit: int) -> np.ndarray:
    """Int indices from a .npy or .txt file, each in [0, limit), without repeats."""
    try:
        data = read_bytes(path)
        if path.endswith(".npy"):
            indices = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            indices = np.loadtxt(io.StringIO(data.decode().replace(",", " ")), dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key} {path!r}: cannot read int indices (.npy or .txt): {error}") from error
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ConfigError(
            f"{key} {path!r}: expected a 1-D array of ints, got {indices.dtype} {indices.shape}"
        )
    if len(indices) == 0:
        raise ConfigError(f"{key} {path!r}: the mask is empty")
    bad = indices[(indices < 0) | (indices >= limit)]
    if len(bad):
        raise ConfigError(f"{key} {path!r}: indices {bad[:5].tolist()} are outside [0, {limit})")
    if len(np.unique(indices)) != len(indices):
        raise ConfigError(f"{key} {path!r}: indices repeat")
    return indices.astype(np.int64)


def resolve_dense_specs(config: DataSource) -> list[DenseSpec]:
    """Dense tensors in batch order: segdense features (schema order), then dense column groups."""
    specs = []
    schema = config.seg_dense_schema
    if schema is not None:
        features = schema.features
        if features is None:
            assert schema.schema_path is not None
            features = load_segdense_features(schema.schema_path)
            source = f"seg_dense_schema.schema_path {schema.schema_path!r}"
            check_segdense_features(features, schema.renamed_features, source=source)
            group_names = {group.name for group in config.dense_columns}
            clashing = sorted(group_names & {feature.name for feature in features})
            if clashing:
                raise ConfigError(
                    f"dense_columns names {clashing} clash with features of {schema.schema_path}"
                )
        truncation = config.preprocess.truncate_and_slice
        if truncation is not None:
            check_truncation(
                truncation,
                {feature.name: feature.length for feature in features},
                source=f"seg_dense_schema.schema_path {schema.schema_path!r}"
                if schema.schema_path
                else "seg_dense_schema.features",
            )
        for feature in features:
            cut = keep = None
            if truncation is not None and feature.name in ("continuous", "binary"):
                cut = getattr(truncation, f"{feature.name}_feature_truncation")
                mask_path = getattr(truncation, f"{feature.name}_feature_mask_path")
                if mask_path is not None:
                    key = f"preprocess.truncate_and_slice.{feature.name}_feature_mask_path"
                    keep = load_mask(mask_path, key, cut if cut is not None else feature.length)
            column = schema.renamed_features.get(feature.name, feature.name)
            specs.append(DenseSpec(feature.name, (column,), True, feature.length, feature.dtype, cut, keep))
    for group in config.dense_columns:
        specs.append(DenseSpec(group.name, tuple(group.columns), False, len(group.columns), group.dtype))
    return specs
