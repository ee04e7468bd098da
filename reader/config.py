"""Config sections of the Parquet reader (`train_data:` / `validation_data:` in a project YAML).

The keys follow the original's `train_data` section (`inputs`, `global_batch_size`, `seg_dense_schema`,
`tasks`, `evaluation_tasks`, `preprocess.truncate_and_slice`), with additions for Parquet: named scalar
column groups, sparse id features, id passthrough, shuffling, epochs and background decoding.
`DataSource` holds what every section shares; `DataConfig` (training data) adds shuffling, epochs and id
columns, `ValidationDataConfig` (a validation partition, read once in file order) adds `evaluation_tasks`;
each rejects the other's keys with the reason. Every option is documented in docs/reader.md.

Example:
    config = DataConfig(
        inputs="data/train/*.parquet",
        global_batch_size=512,
        seg_dense_schema=SegDenseSchema(features=[SegDenseFeature(name="continuous", length=8)]),
        tasks={"recap.engagement.is_favorited": TaskData(neg_downsampling_rate=0.1)},
    )
    dense_widths(config)  # {"continuous": 8}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pydantic

from tml.core.config.base import BaseConfig
from tml.core.config.loader import ConfigError


class TaskData(BaseConfig):
    """Downsampling rates of one task's label (used to reweight validation data)."""

    pos_downsampling_rate: float = pydantic.Field(
        1.0, gt=0.0, le=1.0, description="Fraction of positive examples kept when the data was sampled."
    )
    neg_downsampling_rate: float = pydantic.Field(
        1.0, gt=0.0, le=1.0, description="Fraction of negative examples kept when the data was sampled."
    )


class SegDenseFeature(BaseConfig):
    """One fixed-length vector column of the segdense layout."""

    name: str = pydantic.Field(description="Logical name: the key of this tensor in `batch.dense`.")
    length: int = pydantic.Field(gt=0, description="Number of values per row (the list length in the files).")
    dtype: Literal["float32", "int64"] = pydantic.Field(
        "float32",
        description="dtype of the batch tensor. float32 accepts numeric columns (cast); int64 accepts "
        "integer or boolean columns only.",
    )


class SegDenseSchema(BaseConfig):
    """The original's "segdense" layout: a few fixed-size list columns instead of thousands of features."""

    exactly_one_of: ClassVar = (("features", "schema_path"),)

    features: list[SegDenseFeature] | None = pydantic.Field(
        None, description="The features inline (exclusive with schema_path)."
    )
    schema_path: str | None = pydantic.Field(
        None,
        description="YAML or JSON file (local path or fsspec URL) holding the same list of "
        "{name, length, dtype} entries (exclusive with features).",
    )
    renamed_features: dict[str, str] = pydantic.Field(
        default_factory=dict,
        description="Logical feature name (what the model sees) -> column name in the files.",
    )

    @pydantic.model_validator(mode="after")
    def _check_inline(self) -> SegDenseSchema:
        if self.features is not None:
            check_segdense_features(self.features, self.renamed_features, source="seg_dense_schema.features")
        return self


def check_segdense_features(
    features: list[SegDenseFeature], renamed_features: dict[str, str], source: str
) -> None:
    """Reject duplicate names and renames of unknown features; `source` names where the list came from."""
    names = [feature.name for feature in features]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{source}: duplicate feature names {duplicates}")
    unknown = sorted(set(renamed_features) - set(names))
    if unknown:
        raise ConfigError(
            f"seg_dense_schema.renamed_features names unknown features {unknown}; the features of "
            f"{source} are {names}"
        )
    columns = [renamed_features.get(name, name) for name in names]
    clashing = sorted({column for column in columns if columns.count(column) > 1})
    if clashing:
        raise ConfigError(f"seg_dense_schema.renamed_features maps several features onto columns {clashing}")


class DenseColumnGroup(BaseConfig):
    """Named scalar columns gathered into one [B, len(columns)] tensor of `batch.dense`."""

    name: str = pydantic.Field(description="Key of the gathered tensor in `batch.dense`.")
    columns: list[str] = pydantic.Field(min_length=1, description="Scalar numeric columns, in this order.")
    dtype: Literal["float32", "int64"] = pydantic.Field(
        "float32", description="dtype of the gathered tensor (int64 accepts integer/boolean columns only)."
    )


class SparseFeature(BaseConfig):
    """A sparse id feature, delivered as one key of the KeyedJaggedTensor `batch.sparse`.

    The column is int64 or string (one id per row) or a list of those (multi-hot, any number per row).
    Strings are hashed with a stable 64-bit FNV-1a hash (same on every run and machine).
    """

    name: str = pydantic.Field(description="Key of this feature in the KeyedJaggedTensor.")
    column: str = pydantic.Field(
        description="Column in the files: int64, string, list<int64> or list<string>."
    )
    num_buckets: int | None = pydantic.Field(
        None,
        gt=0,
        le=2**63 - 1,
        description="When set, ids (hashed or not, negative ones included) are taken modulo this, so every "
        "id delivered lies in [0, num_buckets).",
    )


class SparseContinuousFeature(BaseConfig):
    """A sparse continuous feature (DataRecord's id -> value map): `batch.sparse_continuous[name]`.

    A row holds any number of (id, value) pairs, read from a map column or from two parallel list columns
    (the i-th id of a row goes with its i-th value). Ids are int or string (hashed as for sparse_features)
    and are taken modulo `num_buckets`; values are numbers, delivered as float32.
    """

    exactly_one_of: ClassVar = (("column", "ids_column"),)

    name: str = pydantic.Field(description="Key of this feature in batch.sparse_continuous.")
    column: str | None = pydantic.Field(
        None, description="A map<int|string, number> column (exclusive with ids_column / values_column)."
    )
    ids_column: str | None = pydantic.Field(
        None, description="A list<int|string> column of ids; needs values_column (exclusive with column)."
    )
    values_column: str | None = pydantic.Field(
        None,
        description="A list<number> column holding, per row, one value for each id of ids_column.",
    )
    num_buckets: int = pydantic.Field(
        gt=0,
        le=2**63 - 1,
        description="Ids (hashed or not, negative ones included) are taken modulo this: every id delivered "
        "lies in [0, num_buckets), the input size of the layers that read it.",
    )

    @pydantic.model_validator(mode="after")
    def _check_columns(self) -> SparseContinuousFeature:
        if self.column is not None and self.values_column is not None:
            raise ValueError("values_column belongs to ids_column; a map column holds its own values")
        if (self.ids_column is None) != (self.values_column is None):
            raise ValueError("ids_column and values_column go together (the ids and their values)")
        if self.ids_column is not None and self.ids_column == self.values_column:
            raise ValueError(f"ids_column and values_column are both {self.ids_column!r}")
        return self

    def columns(self) -> list[str]:
        return [self.column] if self.column is not None else [self.ids_column, self.values_column]


class TruncateAndSlice(BaseConfig):
    """The original's truncate-then-slice of the `continuous` and `binary` segdense features."""

    continuous_feature_truncation: int | None = pydantic.Field(
        None, gt=0, description="Keep only the first N values of the `continuous` feature."
    )
    binary_feature_truncation: int | None = pydantic.Field(
        None, gt=0, description="Keep only the first N values of the `binary` feature."
    )
    continuous_feature_mask_path: str | None = pydantic.Field(
        None,
        description=".npy or .txt file (local or fsspec URL) of int indices of `continuous` kept after "
        "truncation, in the order given.",
    )
    binary_feature_mask_path: str | None = pydantic.Field(
        None, description="Like continuous_feature_mask_path, for the `binary` feature."
    )


class Preprocess(BaseConfig):
    """Preprocessing applied by the reader before batches reach the model."""

    truncate_and_slice: TruncateAndSlice | None = pydantic.Field(
        None, description="Truncation and index masks of the `continuous` / `binary` features."
    )
    nan_policy: Literal["zero", "error", "keep"] = pydantic.Field(
        "zero",
        description="Non-finite dense float values and sparse continuous values (NaN, +-inf, null): 'zero' "
        "replaces them with 0 and counts them in dataset.stats, 'error' raises naming the file and column, "
        "'keep' passes them on.",
    )


class Shuffle(BaseConfig):
    """Deterministic shuffling, reproducible from (seed, epoch)."""

    seed: int = pydantic.Field(0, description="Seed of every shuffle; combined with the epoch number.")
    shuffle_files: bool = pydantic.Field(
        True, description="Shuffle the order of (file, row group) units every epoch."
    )
    buffer_size: int = pydantic.Field(
        0,
        ge=0,
        description="Shuffle rows within windows of consecutive units holding at least this many rows "
        "(0 = off). Bounds the extra memory to about one window.",
    )


class DataSource(BaseConfig):
    """What every data section holds: the Parquet files, the batch size and how columns become a RecapBatch."""

    inputs: str = pydantic.Field(
        description="Glob ('data/train/*.parquet'), directory (all *.parquet below it), single file, or an "
        "fsspec URL of those ('s3://bucket/train/*.parquet', 'memory://...')."
    )
    global_batch_size: int = pydantic.Field(
        gt=0, description="Examples per step over all ranks; split evenly (must divide by the world size)."
    )
    seg_dense_schema: SegDenseSchema | None = pydantic.Field(
        None, description="Fixed-size list columns delivered as dense tensors (the segdense layout)."
    )
    dense_columns: list[DenseColumnGroup] = pydantic.Field(
        default_factory=list, description="Groups of scalar columns, each delivered as one dense tensor."
    )
    sparse_features: list[SparseFeature] = pydantic.Field(
        default_factory=list, description="Sparse id features, delivered as one KeyedJaggedTensor."
    )
    sparse_continuous_features: list[SparseContinuousFeature] = pydantic.Field(
        default_factory=list,
        description="Sparse continuous (id -> value) features, delivered as batch.sparse_continuous.",
    )
    tasks: dict[str, TaskData] = pydantic.Field(
        default_factory=dict,
        description="Label column name (== task name) -> downsampling rates. Tasks left out have rate 1.",
    )
    weight_column: str | None = pydantic.Field(
        None, description="Numeric column of per-example weights (multiplies every task's weight)."
    )
    preprocess: Preprocess = pydantic.Field(default_factory=Preprocess, description="Preprocessing.")
    num_workers: int | None = pydantic.Field(
        None,
        ge=0,
        description="Background threads decoding row groups; 0: the consuming (training) thread decodes "
        "between steps; null: 0 in a process with at most 2 cores and no CUDA device, else 2.",
    )
    prefetch_batches: int = pydantic.Field(
        4, ge=1, description="Capacity of the decoding threads' queue of ready batches (bounds memory)."
    )
    decode_process: bool | None = pydantic.Field(
        None,
        description="true: a separate process, at idle priority, decodes and shuffles each window and hands "
        "it over in shared memory; the training thread only cuts batches. Start the command with "
        "GOMP_SPINCOUNT=10000 (torch's idle OpenMP threads then leave it their core). Excludes num_workers "
        ">= 1. null: false (not automatic: with that short spin it was not faster end to end).",
    )
    skip_unreadable_files: bool = pydantic.Field(
        False,
        description="Files that are not Parquet or are truncated are skipped, counted "
        "(dataset.stats['unreadable_files']) and logged instead of failing.",
    )

    # Keys a subclass does not accept -> why (a targeted message instead of the generic unknown-key one).
    _elsewhere: ClassVar[dict[str, str]] = {}

    @pydantic.model_validator(mode="before")
    @classmethod
    def _reject_keys_of_the_other_kind(cls, data: Any) -> Any:
        if isinstance(data, dict):
            reasons: dict[str, list[str]] = {}
            for key, why in cls._elsewhere.items():
                if key in data:
                    reasons.setdefault(why, []).append(key)
            if reasons:
                raise ValueError(
                    "; ".join(
                        f"{' and '.join(keys)}: not accepted here: {why}" for why, keys in reasons.items()
                    )
                )
        return data

    @pydantic.model_validator(mode="after")
    def _check_consistency(self) -> DataSource:
        if self.decode_process and self.num_workers:
            raise ValueError(
                f"decode_process: true with num_workers: {self.num_workers}: the decoding process decodes in "
                "one thread of its own (leave num_workers unset or 0, or set decode_process: false)"
            )
        dense_names = [group.name for group in self.dense_columns]
        if self.seg_dense_schema is not None and self.seg_dense_schema.features is not None:
            dense_names += [feature.name for feature in self.seg_dense_schema.features]
        clashing = sorted({name for name in dense_names if dense_names.count(name) > 1})
        if clashing:
            raise ValueError(
                f"dense tensor names {clashing} are used twice (seg_dense_schema / dense_columns)"
            )
        sparse_names = [feature.name for feature in self.sparse_features]
        clashing = sorted({name for name in sparse_names if sparse_names.count(name) > 1})
        if clashing:
            raise ValueError(f"sparse_features: duplicate names {clashing}")
        # One namespace: the serving program takes both kinds' ids in one dict keyed by name.
        sparse_names += [feature.name for feature in self.sparse_continuous_features]
        clashing = sorted({name for name in sparse_names if sparse_names.count(name) > 1})
        if clashing:
            raise ValueError(
                f"sparse_continuous_features: names {clashing} are used twice (sparse_features / "
                "sparse_continuous_features)"
            )
        truncation = self.preprocess.truncate_and_slice
        if truncation is not None:
            if self.seg_dense_schema is None:
                raise ValueError(
                    "preprocess.truncate_and_slice needs seg_dense_schema (it cuts its features)"
                )
            if self.seg_dense_schema.features is not None:
                lengths = {feature.name: feature.length for feature in self.seg_dense_schema.features}
                check_truncation(truncation, lengths, source="seg_dense_schema.features")
        return self


class DataConfig(DataSource):
    """Training data (`train_data`): shuffled each epoch, repeated `num_epochs` times; `predict` reads its
    id columns."""

    id_columns: list[str] = pydantic.Field(
        default_factory=list,
        description="Integer columns passed through as int64 [B] tensors in batch.ids (e.g. meta.user_id); "
        "`predict` writes them next to the scores.",
    )
    shuffle: Shuffle = pydantic.Field(default_factory=Shuffle, description="Shuffling of units and rows.")
    num_epochs: int | None = pydantic.Field(
        None, gt=0, description="Passes over the data; None repeats forever."
    )

    _elsewhere: ClassVar[dict[str, str]] = {
        "evaluation_tasks": "only validation_data partitions report metrics (set it there)",
    }


_READ_ONCE = (
    "evaluation reads each partition once per evaluation, in file order (training.num_eval_steps "
    "evaluates fewer batches)"
)


class ValidationDataConfig(DataSource):
    """One validation partition (`validation_data.<name>`): each evaluation reads it once, in file order,
    with examples reweighted by the inverse downsampling rates of its `tasks`."""

    evaluation_tasks: list[str] = pydantic.Field(
        default_factory=list,
        description="Tasks whose metrics this partition reports (empty: all the model's tasks).",
    )

    _elsewhere: ClassVar[dict[str, str]] = {
        "shuffle": _READ_ONCE,
        "num_epochs": _READ_ONCE,
        "id_columns": "evaluation reads no ids (predict writes train_data.id_columns)",
    }


def check_truncation(truncation: TruncateAndSlice, lengths: dict[str, int], source: str) -> None:
    """Each truncation / mask must target an existing feature, no longer than that feature."""
    for feature in ("continuous", "binary"):
        cut = getattr(truncation, f"{feature}_feature_truncation")
        mask = getattr(truncation, f"{feature}_feature_mask_path")
        if cut is None and mask is None:
            continue
        key = f"preprocess.truncate_and_slice.{feature}_feature_" + ("truncation" if cut else "mask_path")
        if feature not in lengths:
            raise ConfigError(
                f"{key} is set but {source} has no feature named '{feature}' ({sorted(lengths)})"
            )
        if cut is not None and cut > lengths[feature]:
            raise ConfigError(f"{key} = {cut} exceeds the length {lengths[feature]} of feature '{feature}'")


def dense_widths(config: DataSource) -> dict[str, int]:
    """Width of every `batch.dense` tensor, from the config alone (schema files and masks are read)."""
    from tml.reader.schema import resolve_dense_specs

    return {spec.name: spec.width for spec in resolve_dense_specs(config)}
