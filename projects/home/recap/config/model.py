"""The `model:` section of a recap config: towers, backbone, featurization, embeddings, split towers.

Keys follow the original the-algorithm-ml YAML (see docs/recap_model.md for every option). Checks that need
the data's tensor widths (stratifier / position indices, DLRM embedding dims) happen in `build_model`.

Example:
    config = ModelConfig.model_validate({
        "tasks": {"recap.engagement.is_favorited": {"mlp_config": {"layer_sizes": [8, 1]}}},
        "featurization_config": {"log1p_abs_config": {}},
    })
"""

from __future__ import annotations

import enum
import re
from typing import ClassVar

import pydantic

from tml.core.config.base import BaseConfig
from tml.core.config.training import EmbeddingShardingConfig
from tml.optimizers.config import EmbeddingOptimizerConfig
from tml.projects.home.recap.config.discretizer import DiscretizerConfig, SparseLinearConfig

# A split-tower feature is a dense tensor name, optionally with a column range: "continuous[0:100]".
FEATURE_SPEC = re.compile(r"^(?P<name>[^\[\]]+?)(\[(?P<start>\d+):(?P<stop>\d+)\])?$")


class BatchNormConfig(BaseConfig):
    affine: bool = pydantic.Field(True, description="Learn a per-feature scale and shift after normalising.")
    momentum: float = pydantic.Field(
        0.1, gt=0.0, le=1.0, description="Weight of the current batch in the running mean/variance."
    )


class DropoutConfig(BaseConfig):
    rate: float = pydantic.Field(0.1, gt=0.0, lt=1.0, description="Probability of zeroing an activation.")


class MlpConfig(BaseConfig):
    layer_sizes: list[pydantic.PositiveInt] = pydantic.Field(
        ..., min_length=1, description="Output width of each Linear layer; the last one is the output width."
    )
    batch_norm: BatchNormConfig | None = pydantic.Field(
        None, description="BatchNorm after every hidden Linear layer (not after the last)."
    )
    dropout: DropoutConfig | None = pydantic.Field(
        None, description="Dropout after every hidden activation (not after the last layer)."
    )
    final_layer_activation: bool = pydantic.Field(False, description="Apply ReLU after the last layer too.")

    @pydantic.model_validator(mode="after")
    def _hidden_layers(self) -> MlpConfig:
        # BatchNorm and dropout sit after hidden layers; with a single layer there is none to put them after.
        unused = [key for key in ("batch_norm", "dropout") if getattr(self, key) is not None]
        if unused and len(self.layer_sizes) == 1:
            raise ValueError(
                f"{' and '.join(unused)}: applied after hidden layers, and layer_sizes {self.layer_sizes} has "
                "none (its one layer is the output): add a hidden layer or remove them"
            )
        return self


class MaskBlockConfig(BaseConfig):
    exactly_one_of: ClassVar = (("reduction_factor", "aggregation_size"),)

    output_size: pydantic.PositiveInt = pydantic.Field(..., description="Width of the block's hidden layer.")
    reduction_factor: pydantic.PositiveFloat | None = pydantic.Field(
        None, description="Aggregation width as a multiple of the mask input width."
    )
    aggregation_size: pydantic.PositiveInt | None = pydantic.Field(
        None, description="Width of the mask's aggregation (first) layer."
    )
    input_layer_norm: bool = pydantic.Field(
        False, description="LayerNorm the block's input before the instance-guided mask multiplies it."
    )


class MaskNetConfig(BaseConfig):
    mask_blocks: list[MaskBlockConfig] = pydantic.Field(..., min_length=1, description="The mask blocks.")
    mlp: MlpConfig | None = pydantic.Field(
        None, description="MLP on top of the (concatenated) block outputs."
    )
    use_parallel: bool = pydantic.Field(
        False, description="Blocks side by side on the same input (concatenated) instead of stacked."
    )


class DcnConfig(BaseConfig):
    poly_degree: pydantic.PositiveInt = pydantic.Field(..., description="Number of cross layers.")
    projection_dim: pydantic.PositiveInt | None = pydantic.Field(
        None, description="Rank of the low-rank cross weights (U V^T); full-rank when unset."
    )
    parallel_mlp: MlpConfig | None = pydantic.Field(
        None, description="Deep network beside the cross network (required with use_parallel)."
    )
    use_parallel: bool = pydantic.Field(
        True, description="Cross and deep networks side by side (concatenated) instead of stacked."
    )
    output_mlp: MlpConfig | None = pydantic.Field(
        None, description="MLP on the cross (and parallel deep) output; in stacked mode it is the deep part."
    )

    @pydantic.model_validator(mode="after")
    def _check_parallel(self) -> DcnConfig:
        if self.use_parallel and self.parallel_mlp is None:
            raise ValueError("dcn_config.use_parallel=true needs dcn_config.parallel_mlp")
        if not self.use_parallel and self.parallel_mlp is not None:
            raise ValueError(
                "dcn_config.parallel_mlp is only used with use_parallel=true; for a stacked DCN put the "
                "deep network in output_mlp"
            )
        return self


class DlrmConfig(BaseConfig):
    bottom_mlp: MlpConfig = pydantic.Field(
        ..., description="MLP on the dense features; its last size must equal the embedding dim."
    )
    top_mlp: MlpConfig = pydantic.Field(
        ..., description="MLP on [bottom output, pairwise dot products of all vectors]."
    )


class AffineMapConfig(BaseConfig):
    scale: float = pydantic.Field(1.0, description="Fixed multiplier of the tower's logit (non-zero).")
    bias: float = pydantic.Field(0.0, description="Fixed offset added to the tower's logit.")

    @pydantic.field_validator("scale")
    @classmethod
    def _non_zero(cls, value: float) -> float:
        if value == 0.0:
            raise ValueError("affine_map.scale must be non-zero (a zero scale erases the logit)")
        return value


class TaskModel(BaseConfig):
    exactly_one_of: ClassVar = (("mlp_config", "dcn_config", "dlrm_config", "mask_net_config"),)

    mlp_config: MlpConfig | None = pydantic.Field(None, description="A plain MLP.")
    dcn_config: DcnConfig | None = pydantic.Field(None, description="DCN-V2 cross network.")
    dlrm_config: DlrmConfig | None = pydantic.Field(
        None, description="DLRM (backbone, or share_none towers only: it needs the raw embedding vectors)."
    )
    mask_net_config: MaskNetConfig | None = pydantic.Field(None, description="MaskNet (arXiv 2102.07619).")
    affine_map: AffineMapConfig | None = pydantic.Field(
        None, description="Fixed affine map of the logit (towers only)."
    )
    pos_weight: float = pydantic.Field(
        1.0, gt=0.0, description="Weight of positive examples in this task's BCE loss."
    )
    loss_weight: float = pydantic.Field(
        1.0, ge=0.0, description="Weight of this task's loss in the summed multi-task loss."
    )


class Log1pAbsConfig(BaseConfig):
    pass


class ClipLog1pAbsConfig(BaseConfig):
    clip_magnitude: float = pydantic.Field(
        3e38, gt=0.0, description="Clamp raw values to [-clip, clip] before sign*log1p(|x|)."
    )


class ZScoreLogConfig(BaseConfig):
    analysis_path: str = pydantic.Field(
        ..., description="Stats JSON written by `tml-recap compute-stats` (any fsspec URL)."
    )
    clip_magnitude: float = pydantic.Field(5.0, gt=0.0, description="Clamp z-scores to [-clip, clip].")
    use_batch_norm: bool = pydantic.Field(
        False, description="BatchNorm (no affine) on the z-scores, before the clamp."
    )
    use_renorm: bool = pydantic.Field(
        False, description="Batch renormalisation (train/serve consistent) on the z-scores, before the clamp."
    )

    @pydantic.model_validator(mode="after")
    def _one_norm(self) -> ZScoreLogConfig:
        if self.use_batch_norm and self.use_renorm:
            raise ValueError("z_score_log_config: set at most one of use_batch_norm, use_renorm")
        return self


class LayerNormConfig(BaseConfig):
    epsilon: float = pydantic.Field(1e-5, ge=0.0, description="Added to the variance.")
    axis: int = pydantic.Field(-1, description="Normalised axis; only -1 (the feature axis) is supported.")
    center: bool = pydantic.Field(True, description="Learn a per-feature bias.")
    scale: bool = pydantic.Field(True, description="Learn a per-feature scale.")

    @pydantic.field_validator("axis")
    @classmethod
    def _last_axis(cls, value: int) -> int:
        if value != -1:
            raise ValueError(f"layer_norm_config.axis: only -1 (the feature axis) is supported, got {value}")
        return value


class DoubleNormLogConfig(BaseConfig):
    batch_norm_config: BatchNormConfig = pydantic.Field(
        default_factory=BatchNormConfig, description="BatchNorm of the log-transformed continuous features."
    )
    clip_magnitude: float = pydantic.Field(5.0, gt=0.0, description="Clamp after the BatchNorm.")
    layer_norm_config: LayerNormConfig = pydantic.Field(
        default_factory=LayerNormConfig, description="LayerNorm over [continuous, concatenated features]."
    )


class FeaturizationConfig(BaseConfig):
    exactly_one_of: ClassVar = (
        ("log1p_abs_config", "clip_log1p_abs_config", "z_score_log_config", "double_norm_log_config"),
    )

    log1p_abs_config: Log1pAbsConfig | None = pydantic.Field(None, description="sign(x)*log1p(|x|).")
    clip_log1p_abs_config: ClipLog1pAbsConfig | None = pydantic.Field(
        None, description="Clamp, then sign(x)*log1p(|x|)."
    )
    z_score_log_config: ZScoreLogConfig | None = pydantic.Field(
        None, description="sign(x)*log1p(|x|), then z-score with precomputed stats."
    )
    double_norm_log_config: DoubleNormLogConfig | None = pydantic.Field(
        None, description="log1p, BatchNorm, clamp, concatenate, LayerNorm (the production choice)."
    )
    feature_names_to_concat: list[str] = pydantic.Field(
        default_factory=lambda: ["binary"],
        description="Dense tensors appended unchanged after the featurized `continuous` tensor.",
    )


class DenseEmbeddingsConfig(BaseConfig):
    names: list[str] = pydantic.Field(
        ..., min_length=1, description="Dense vector inputs (e.g. the TwHIN embeddings) appended as features."
    )
    layer_norm: bool = pydantic.Field(True, description="LayerNorm each vector separately before appending.")


class PoolingType(enum.StrEnum):
    sum = "sum"
    mean = "mean"


class PretrainedConfig(BaseConfig):
    embedding_snapshot_uri: str = pydantic.Field(
        ..., description="File written by torch.save({name: tensor [rows, dim]}) (any fsspec URL)."
    )
    emb_name: str = pydantic.Field(..., description="Key of the table's tensor in that file.")


class LargeTableConfig(BaseConfig):
    name: str = pydantic.Field(..., description="Table name.")
    num_embeddings: pydantic.PositiveInt = pydantic.Field(..., description="Number of rows.")
    embedding_dim: pydantic.PositiveInt = pydantic.Field(
        ..., multiple_of=4, description="Width of each row; a multiple of 4 (FBGEMM's table kernels need it)."
    )
    feature_names: list[str] | None = pydantic.Field(
        None, description="Sparse features (keys of batch.sparse) this table embeds; default [name]."
    )
    pooling: PoolingType = pydantic.Field(PoolingType.sum, description="How a bag of ids is pooled.")
    pretrained: PretrainedConfig | None = pydantic.Field(None, description="Initial rows from a file.")
    sharding: EmbeddingShardingConfig | None = pydantic.Field(
        None, description="Placement of this table across ranks (None: the planner decides)."
    )

    @property
    def features(self) -> list[str]:
        return self.feature_names if self.feature_names is not None else [self.name]


class LargeEmbeddingsConfig(BaseConfig):
    tables: list[LargeTableConfig] = pydantic.Field(..., min_length=1, description="Embedding-bag tables.")
    optimizer: EmbeddingOptimizerConfig = pydantic.Field(
        ..., description="Optimizer of every table, fused into the backward pass where the device allows."
    )

    @pydantic.model_validator(mode="after")
    def _unique(self) -> LargeEmbeddingsConfig:
        _reject_duplicates("large_embeddings.tables[].name", [t.name for t in self.tables])
        _reject_duplicates("large_embeddings feature_names", [f for t in self.tables for f in t.features])
        return self


class SmallTableConfig(BaseConfig):
    name: str = pydantic.Field(..., description="Table name.")
    num_embeddings: pydantic.PositiveInt = pydantic.Field(
        ..., description="Valid ids are [0, num_embeddings); others use one reserved extra row."
    )
    embedding_dim: pydantic.PositiveInt = pydantic.Field(..., description="Width of each row.")
    index: pydantic.NonNegativeInt = pydantic.Field(..., description="Column of batch.dense['discrete'].")


class SmallEmbeddingsConfig(BaseConfig):
    tables: list[SmallTableConfig] = pydantic.Field(..., min_length=1, description="nn.Embedding tables.")

    @pydantic.model_validator(mode="after")
    def _unique(self) -> SmallEmbeddingsConfig:
        _reject_duplicates("small_embeddings.tables[].name", [t.name for t in self.tables])
        return self


class PositionDebiasConfig(BaseConfig):
    max_position: pydantic.PositiveInt = pydantic.Field(
        ..., description="Positions [0, max_position) are learned; others map to the unknown row."
    )
    num_dims: pydantic.PositiveInt = pydantic.Field(..., description="Width of the position embedding.")
    drop_probability: float = pydantic.Field(
        ...,
        le=1.0,
        description="Training-time probability of replacing a position by unknown (> 0: evaluation uses "
        "the unknown row, which only dropped positions train).",
    )
    position_feature_index: pydantic.NonNegativeInt = pydantic.Field(
        ..., description="Column of batch.dense['discrete'] holding the position."
    )

    @pydantic.field_validator("drop_probability")
    @classmethod
    def _trains_unknown(cls, value: float) -> float:
        if value <= 0.0:
            raise ValueError(
                f"drop_probability must be > 0, got {value}: evaluation and prediction look up the unknown "
                "position row, and only positions dropped in training teach it anything (with 0 it keeps "
                "its random initial values)"
            )
        return value


class StratifierConfig(BaseConfig):
    name: str = pydantic.Field(
        ..., description="Segment name: metric keys read `<name>=<value>/<task>/<metric>` (no '/' or '=')."
    )
    index: pydantic.NonNegativeInt = pydantic.Field(..., description="Column of batch.dense['discrete'].")
    value: int = pydantic.Field(..., description="Rows whose column equals this value form the segment.")

    @pydantic.field_validator("name")
    @classmethod
    def _key_safe(cls, value: str) -> str:
        if not value or "/" in value or "=" in value:
            raise ValueError(f"stratifier name must be non-empty without '/' or '=', got {value!r}")
        return value


class TowerGroupConfig(BaseConfig):
    features: list[str] = pydantic.Field(
        ...,
        min_length=1,
        description="Feature names (a dense tensor, embedding table, `position_debias` or `sparse_linear`), optionally "
        "with a column range, e.g. `continuous[0:100]`.",
    )
    layer_sizes: list[pydantic.PositiveInt] = pydantic.Field(
        ..., min_length=1, description="MLP sizes; the last one is the group embedding width."
    )

    @pydantic.field_validator("features")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        for spec in value:
            match = FEATURE_SPEC.match(spec)
            if match is None:
                raise ValueError(f"bad feature spec {spec!r}: expected `name` or `name[start:stop]`")
            if match["start"] is not None and int(match["start"]) >= int(match["stop"]):
                raise ValueError(f"bad feature spec {spec!r}: empty column range")
        return value


class SplitTowersConfig(BaseConfig):
    groups: dict[str, TowerGroupConfig] = pydantic.Field(
        ..., min_length=1, description="Group name -> its features and MLP."
    )


class MultiTaskType(enum.StrEnum):
    share_none = "share_none"
    share_all = "share_all"
    share_partial = "share_partial"


class ModelConfig(BaseConfig):
    tasks: dict[str, TaskModel] = pydantic.Field(
        ..., min_length=1, description="Task name -> its tower; outputs follow this order."
    )
    multi_task_type: MultiTaskType = pydantic.Field(
        MultiTaskType.share_none, description="share_none | share_all | share_partial."
    )
    backbone: TaskModel | None = pydantic.Field(
        None, description="Shared network (required for share_all / share_partial)."
    )
    featurization_config: FeaturizationConfig = pydantic.Field(
        default_factory=lambda: FeaturizationConfig(log1p_abs_config=Log1pAbsConfig()),
        description="How `continuous` is transformed and which tensors are appended to it.",
    )
    dense_embeddings: DenseEmbeddingsConfig | None = pydantic.Field(
        None, description="Dense vector inputs (TwHIN embeddings) appended to the features."
    )
    large_embeddings: LargeEmbeddingsConfig | None = pydantic.Field(
        None, description="TorchRec embedding-bag tables over batch.sparse."
    )
    small_embeddings: SmallEmbeddingsConfig | None = pydantic.Field(
        None, description="Small tables over columns of batch.dense['discrete']."
    )
    position_debias_config: PositionDebiasConfig | None = pydantic.Field(
        None, description="Learned position embedding, dropped at evaluation."
    )
    split_towers: SplitTowersConfig | None = pydantic.Field(
        None, description="Per-group MLPs producing compact embeddings before the backbone."
    )
    stratifiers: list[StratifierConfig] = pydantic.Field(
        default_factory=list, description="Segments for per-segment evaluation metrics."
    )
    discretizer: DiscretizerConfig | None = pydantic.Field(
        None, description="Percentile bins of continuous inputs, read by sparse_linear (docs/platform.md)."
    )
    sparse_linear: SparseLinearConfig | None = pydantic.Field(
        None,
        description="Sparse linear layer over bin ids and sparse continuous features (docs/platform.md).",
    )

    @pydantic.model_validator(mode="after")
    def _check_model(self) -> ModelConfig:
        shared = self.multi_task_type != MultiTaskType.share_none
        if shared and self.backbone is None:
            raise ValueError(f"multi_task_type={self.multi_task_type.value} needs a `backbone`")
        if not shared and self.backbone is not None:
            raise ValueError("multi_task_type=share_none forbids `backbone` (use share_all or share_partial)")
        if self.backbone is not None and self.backbone.affine_map is not None:
            raise ValueError("backbone.affine_map: an affine map applies to a task's logit, not the backbone")
        for key in ("pos_weight", "loss_weight"):
            if self.backbone is not None and getattr(self.backbone, key) != 1.0:
                raise ValueError(
                    f"backbone.{key}: weighs a task's loss, and the backbone has none; set it on the tasks "
                    f"(tasks.<name>.{key})"
                )
        for name, task in self.tasks.items():
            if shared and task.dlrm_config is not None:
                raise ValueError(
                    f"tasks.{name}.dlrm_config: with a backbone a tower sees the backbone output, not the "
                    "embedding vectors DLRM needs; put DLRM in the backbone or use share_none"
                )
        uses_dlrm = any(t.dlrm_config is not None for t in [*self.tasks.values(), self.backbone] if t)
        if uses_dlrm and self.split_towers is not None:
            raise ValueError("split_towers cannot be combined with dlrm_config (DLRM needs raw embeddings)")
        _reject_duplicates("stratifiers[].name", [s.name for s in self.stratifiers])
        return self


def _reject_duplicates(key: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{key}: duplicate name {name!r}")
        seen.add(name)
