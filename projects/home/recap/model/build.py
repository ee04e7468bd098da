"""`build_model`: turn a validated ModelConfig plus the data's tensor widths into a RecapModel.

Checks that need widths happen here, with errors naming the config key (ConfigError, which the CLI reports as
one line): the `continuous` / appended / vector tensors exist, `discrete` indices (small tables, position,
stratifiers) lie within its width, DLRM has embedding vectors of the bottom MLP's width, every tower ends in
one output.

Example:
    model = build_model(config, dense_widths={"continuous": 2117, "binary": 59},
                        sparse_feature_names=[], task_downsampling={"t": (1.0, 0.01)})
"""

from __future__ import annotations

import torch
from torch import nn

from tml.core.config.base import which_one
from tml.core.config.loader import ConfigError
from tml.projects.home.recap.config.model import (
    FEATURE_SPEC,
    FeaturizationConfig,
    MlpConfig,
    ModelConfig,
    MultiTaskType,
    TaskModel,
)
from tml.projects.home.recap.model.dcn import Dcn
from tml.projects.home.recap.model.dlrm import Dlrm, num_interactions
from tml.projects.home.recap.model.embeddings import (
    DenseVectorNorms,
    LargeEmbeddings,
    LargeTable,
    PositionDebias,
    SmallEmbeddings,
    SmallTable,
)
from tml.projects.home.recap.model.featurization import (
    ClipLog1pAbs,
    DenseFeaturizer,
    DoubleNormLog,
    Log1pAbs,
    ZScoreLog,
)
from tml.projects.home.recap.model.heads import TaskHeads
from tml.projects.home.recap.model.mask_net import MaskBlockSpec, MaskNet
from tml.projects.home.recap.model.mlp import LayerNorm, Mlp
from tml.projects.home.recap.model.recap_model import MultiTaskLoss, RecapModel, sanitize
from tml.projects.home.recap.model.sparse_linear import SparseFeatures
from tml.projects.home.recap.model.split_towers import SplitTowers, TowerGroup
from tml.projects.home.recap.model.stats import load_stats

ARCHITECTURES = ("mlp_config", "dcn_config", "dlrm_config", "mask_net_config")


def build_mlp(config: MlpConfig, in_features: int) -> Mlp:
    bn = config.batch_norm
    return Mlp(
        in_features,
        list(config.layer_sizes),
        batch_norm_affine=bn.affine if bn else True,
        batch_norm_momentum=bn.momentum if bn else None,
        dropout_rate=config.dropout.rate if config.dropout else None,
        final_layer_activation=config.final_layer_activation,
    )


def build_architecture(
    config: TaskModel, in_features: int, key: str, vector_dims: list[int] | None = None
) -> nn.Module:
    """A [B, in_features] -> [B, D] module; `vector_dims`: widths of the trailing embedding vectors (DLRM)."""
    kind, arch = which_one(config, ARCHITECTURES)
    if kind == "mlp_config":
        return build_mlp(arch, in_features)
    if kind == "mask_net_config":
        specs = [
            MaskBlockSpec(b.output_size, b.aggregation_size, b.reduction_factor, b.input_layer_norm)
            for b in arch.mask_blocks
        ]
        blocks_out = sum(s.output_size for s in specs) if arch.use_parallel else specs[-1].output_size
        mlp = build_mlp(arch.mlp, blocks_out) if arch.mlp is not None else None
        return MaskNet(in_features, specs, arch.use_parallel, mlp)
    if kind == "dcn_config":
        parallel = build_mlp(arch.parallel_mlp, in_features) if arch.parallel_mlp else None
        cross_width = in_features + (parallel.out_features if parallel else 0)
        output = build_mlp(arch.output_mlp, cross_width) if arch.output_mlp else None
        return Dcn(in_features, arch.poly_degree, arch.projection_dim, parallel, output)
    dims = vector_dims or []
    bottom = arch.bottom_mlp.layer_sizes[-1]
    if not dims:
        raise ConfigError(f"{key}.dlrm_config needs embedding vectors: configure small or large embeddings")
    if any(d != bottom for d in dims):
        raise ConfigError(
            f"{key}.dlrm_config: bottom_mlp.layer_sizes[-1]={bottom} must equal every embedding dim, "
            f"got embedding dims {dims}"
        )
    dense_width = in_features - sum(dims)
    return Dlrm(
        dense_width,
        len(dims),
        bottom,
        build_mlp(arch.bottom_mlp, dense_width),
        build_mlp(arch.top_mlp, bottom + num_interactions(len(dims))),
    )


def _width(dense_widths: dict[str, int], name: str, key: str) -> int:
    if name not in dense_widths:
        raise ConfigError(f"{key}: dense tensor {name!r} is not in the data (have: {sorted(dense_widths)})")
    return dense_widths[name]


def build_featurizer(config: FeaturizationConfig, dense_widths: dict[str, int]) -> DenseFeaturizer:
    key = "model.featurization_config"
    width = _width(dense_widths, "continuous", key)
    concat = [
        (n, _width(dense_widths, n, f"{key}.feature_names_to_concat")) for n in config.feature_names_to_concat
    ]
    kind, option = which_one(config, FeaturizationConfig.exactly_one_of[0])
    block_norm = None
    if kind == "log1p_abs_config":
        transform = Log1pAbs()
    elif kind == "clip_log1p_abs_config":
        transform = ClipLog1pAbs(option.clip_magnitude)
    elif kind == "z_score_log_config":
        stats = load_stats(option.analysis_path)
        if stats.width != width:
            raise ConfigError(
                f"{option.analysis_path} (z_score_log_config.analysis_path): stats for {stats.width} "
                f"features, but `continuous` has {width}"
            )
        norm = "batch_norm" if option.use_batch_norm else "renorm" if option.use_renorm else "none"
        transform = ZScoreLog(
            torch.tensor(stats.mean), torch.tensor(stats.std), option.clip_magnitude, norm=norm
        )
    else:
        bn, ln = option.batch_norm_config, option.layer_norm_config
        transform = DoubleNormLog(width, bn.affine, bn.momentum, option.clip_magnitude)
        block_norm = LayerNorm(width + sum(w for _, w in concat), ln.epsilon, ln.center, ln.scale)
    return DenseFeaturizer(transform, width, concat, block_norm)


def _check_discrete(dense_widths: dict[str, int], index: int, key: str) -> None:
    width = _width(dense_widths, "discrete", key)
    if not 0 <= index < width:
        raise ConfigError(f"{key}={index} is outside the `discrete` tensor (width {width})")


def _split_groups(config: ModelConfig, layout: list[tuple[str, int]]) -> list[TowerGroup]:
    widths = dict(layout)
    owner: dict[tuple[str, int], str] = {}
    groups = []
    for group_name, group in config.split_towers.groups.items():
        pieces = []
        for spec in group.features:
            match = FEATURE_SPEC.match(spec)
            name = match["name"]
            key = f"model.split_towers.groups.{group_name}.features"
            if name not in widths:
                raise ConfigError(f"{key}: unknown feature {name!r} (known segments: {list(widths)})")
            start = int(match["start"]) if match["start"] is not None else 0
            stop = int(match["stop"]) if match["stop"] is not None else widths[name]
            if stop > widths[name]:
                raise ConfigError(f"{key}: {spec!r} goes past the width {widths[name]} of {name!r}")
            for col in range(start, stop):
                other = owner.setdefault((name, col), group_name)
                if other != group_name:
                    raise ConfigError(f"{key}: column {col} of {name!r} is also in group {other!r}")
            pieces.append((name, start, stop))
        groups.append(TowerGroup(group_name, pieces, list(group.layer_sizes)))
    return groups


def build_model(
    config: ModelConfig,
    dense_widths: dict[str, int],
    sparse_feature_names: list[str],
    task_downsampling: dict[str, tuple[float, float]],
    embedding_device: str = "cpu",
    sparse_linear: SparseFeatures | None = None,
) -> RecapModel:
    """Build the model (checks in the module docstring).

    Args:
        config: the validated `model:` section.
        dense_widths: name -> width of every dense tensor of the data (`dense_widths(data_config)`).
        sparse_feature_names: the keys of `batch.sparse`.
        task_downsampling: task -> (pos_rate, neg_rate) of the training data (tasks missing: rate 1).
        embedding_device: where the large tables are allocated ("meta": shard before allocating).
        sparse_linear: the `sparse_linear` segment, built from the data section by
            `sparse_linear.build_sparse_features` (it reads the discretizer's boundaries file); required
            exactly when `model.sparse_linear` is set.

    Example:
        model = build_model(config, {"continuous": 8, "binary": 2}, [], {"fav": (1.0, 0.1)})
    """
    tasks = list(config.tasks)
    if len({sanitize(t) for t in tasks}) != len(tasks):
        raise ConfigError(f"model.tasks: names collide once dots become '__': {tasks}")
    unknown = sorted(set(task_downsampling) - set(tasks))
    if unknown:
        raise ConfigError(f"downsampling rates given for unknown tasks {unknown}; model.tasks: {tasks}")
    odds = []
    for task in tasks:
        pos_rate, neg_rate = task_downsampling.get(task, (1.0, 1.0))
        if not (0 < pos_rate <= 1 and 0 < neg_rate <= 1):
            raise ConfigError(
                f"task {task!r}: downsampling rates must be in (0, 1], got {(pos_rate, neg_rate)}"
            )
        # Downsampling multiplied the training odds by pos_rate / neg_rate and BCE with pos_weight w
        # fits w times those odds: the probabilities undo both.
        odds.append(neg_rate / (pos_rate * config.tasks[task].pos_weight))
    for i, s in enumerate(config.stratifiers):
        _check_discrete(dense_widths, s.index, f"model.stratifiers[{i}].index")

    featurizer = build_featurizer(config.featurization_config, dense_widths)
    layout = list(featurizer.layout)
    dense_vectors = position = small = large = None
    if config.dense_embeddings is not None:
        key = "model.dense_embeddings.names"
        vec = [(n, _width(dense_widths, n, key)) for n in config.dense_embeddings.names]
        dense_vectors = DenseVectorNorms(vec, config.dense_embeddings.layer_norm)
        layout += vec
    if (pd := config.position_debias_config) is not None:
        _check_discrete(
            dense_widths, pd.position_feature_index, "model.position_debias_config.position_feature_index"
        )
        position = PositionDebias(
            pd.max_position, pd.num_dims, pd.drop_probability, pd.position_feature_index
        )
        layout.append(("position_debias", pd.num_dims))
    if (config.sparse_linear is not None) != (sparse_linear is not None):
        raise ValueError(
            "model.sparse_linear: pass build_sparse_features(...) of the data as `sparse_linear`"
        )
    if sparse_linear is not None:
        layout.append(("sparse_linear", sparse_linear.output_size))
    vector_layout: list[tuple[str, int]] = []
    if config.small_embeddings is not None:
        for i, t in enumerate(config.small_embeddings.tables):
            _check_discrete(dense_widths, t.index, f"model.small_embeddings.tables[{i}].index")
        small = SmallEmbeddings(
            [
                SmallTable(t.name, t.num_embeddings, t.embedding_dim, t.index)
                for t in config.small_embeddings.tables
            ]
        )
        vector_layout += small.layout
    if config.large_embeddings is not None:
        for t in config.large_embeddings.tables:
            missing = [f for f in t.features if f not in sparse_feature_names]
            if missing:
                raise ConfigError(
                    f"model.large_embeddings table {t.name!r}: sparse features {missing} are not in the data "
                    f"(have: {sorted(sparse_feature_names)})"
                )
        specs = [
            LargeTable(
                t.name,
                t.num_embeddings,
                t.embedding_dim,
                tuple(t.features),
                t.pooling.value,
                t.pretrained.embedding_snapshot_uri if t.pretrained else None,
                t.pretrained.emb_name if t.pretrained else None,
            )
            for t in config.large_embeddings.tables
        ]
        large = LargeEmbeddings(specs, device=embedding_device)
        vector_layout += large.layout
    layout += vector_layout
    names = [n for n, _ in layout]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model: feature names {duplicates} are used twice (tensors, tables or features)")

    split = None
    width = sum(w for _, w in layout)
    if config.split_towers is not None:
        split = SplitTowers(layout, _split_groups(config, layout))
        width = split.out_features
    vector_dims = [w for _, w in vector_layout]

    backbone = None
    tower_in = width
    if config.backbone is not None:
        backbone = build_architecture(config.backbone, width, "model.backbone", vector_dims)
        tower_in = backbone.out_features
        if config.multi_task_type == MultiTaskType.share_partial:
            tower_in += width
    towers = {}
    for task, task_config in config.tasks.items():
        key = f"model.tasks.{task}"
        tower = build_architecture(task_config, tower_in, key, vector_dims)
        if tower.out_features != 1:
            raise ConfigError(f"{key}: a tower must end in 1 output (its logit), got {tower.out_features}")
        towers[task] = tower
    maps = [config.tasks[t].affine_map for t in tasks]
    heads = TaskHeads(
        tasks,
        odds_ratios=odds,
        affine_scales=[m.scale if m else 1.0 for m in maps],
        affine_biases=[m.bias if m else 0.0 for m in maps],
    )
    return RecapModel(
        task_names=tasks,
        featurizer=featurizer,
        towers=towers,
        heads=heads,
        dense_vectors=dense_vectors,
        position=position,
        sparse_linear=sparse_linear,
        small=small,
        large=large,
        split=split,
        backbone=backbone,
        share_partial=config.multi_task_type == MultiTaskType.share_partial,
    )


def build_loss(config: ModelConfig) -> MultiTaskLoss:
    """The train module's loss: each task's `pos_weight` and `loss_weight`, in `model.tasks` order."""
    tasks = list(config.tasks)
    return MultiTaskLoss(
        tasks, [config.tasks[t].pos_weight for t in tasks], [config.tasks[t].loss_weight for t in tasks]
    )
