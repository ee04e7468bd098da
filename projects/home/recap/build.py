"""`build_*` functions that turn a RecapConfig into the pieces `main.py` wires together."""

from __future__ import annotations

import torch

from tml.core.distributed import DistEnv
from tml.core.metrics import RankingMetrics
from tml.core.sharding import ShardedModel, load_full_table, shard_model
from tml.ml_logging.log import get_logger
from tml.optimizers.build import build_optimizer
from tml.optimizers.config import LearningRate, OptimizerConfig
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.model import RecapTrainModule, build_model, parameter_groups
from tml.projects.home.recap.model.embeddings import read_pretrained
from tml.reader.config import DataConfig, dense_widths
from tml.reader.dataset import ParquetDataset, build_dataset

logger = get_logger(__name__)


def task_names(config: RecapConfig) -> list[str]:
    return list(config.model.tasks)


def build_train_module(config: RecapConfig) -> RecapTrainModule:
    """The unsharded train module on CPU (weights are placed by `build_sharded`)."""
    data = config.train_data
    downsampling = {
        task: (rates.pos_downsampling_rate, rates.neg_downsampling_rate) for task, rates in data.tasks.items()
    }
    model = build_model(
        config.model,
        dense_widths(data),
        [feature.name for feature in data.sparse_features],
        downsampling,
    )
    return RecapTrainModule(model)


def build_sharded(config: RecapConfig, env: DistEnv) -> ShardedModel:
    """Build, shard (TorchRec DMP for embedding tables, DDP otherwise) and load pretrained tables."""
    module = build_train_module(config)
    large = config.model.large_embeddings
    if large is None:
        return shard_model(module, env, None, {})
    shardings = {
        t.name: (t.sharding.sharding_type, t.sharding.compute_kernel)
        for t in large.tables
        if t.sharding is not None
    }
    sharded = shard_model(module, env, shardings, {t.name: large.optimizer for t in large.tables})
    for table in large.tables:
        if table.pretrained is not None:
            rows = read_pretrained(
                table.pretrained.embedding_snapshot_uri,
                table.pretrained.emb_name,
                (table.num_embeddings, table.embedding_dim),
            )
            load_full_table(sharded.module, table.name, rows)
            logger.info(
                "table '%s': rows loaded from %s", table.name, table.pretrained.embedding_snapshot_uri
            )
    return sharded


def build_recap_optimizer(config: RecapConfig, sharded: ShardedModel):
    """Dense optimizer + LambdaLR: one schedule for the backbone and one per tower, or a single one."""
    opt = config.optimizer
    single = opt.single_task_learning_rate
    default = single if single is not None else opt.multi_task_learning_rates.backbone_learning_rate
    dense = OptimizerConfig(
        adam=opt.adam,
        sgd=opt.sgd,
        adagrad=opt.adagrad,
        learning_rate=default,
        clip_grad_norm=opt.clip_grad_norm,
    )
    if single is not None:
        return build_optimizer(sharded.dense_named_parameters(), dense)
    inner = unwrap(sharded.module)
    prefixes = parameter_groups(inner)
    schedules: dict[str, LearningRate] = {"backbone": opt.multi_task_learning_rates.backbone_learning_rate}
    schedules.update(opt.multi_task_learning_rates.tower_learning_rates)
    groups = {
        group: ([prefix.rstrip(".") for prefix in prefixes[group]], schedule)
        for group, schedule in schedules.items()
    }
    return build_optimizer(sharded.dense_named_parameters(), dense, groups)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The RecapTrainModule inside DMP/DDP wrappers."""
    while not isinstance(module, RecapTrainModule) and hasattr(module, "module"):
        module = module.module
    return module


def build_train_data(config: RecapConfig, env: DistEnv) -> ParquetDataset:
    try:
        return build_dataset(config.train_data, task_names(config), env.rank, env.world_size)
    except FileNotFoundError as error:
        # The reader names the section's key (`inputs '...' matches no files`); say which section.
        if str(error).startswith("inputs "):
            raise FileNotFoundError(f"train_data.{error}") from None
        raise


def build_validation_data(data: DataConfig, config: RecapConfig, env: DistEnv) -> ParquetDataset:
    # Validation partitions are reweighted by the inverse downsampling rates so metrics stay calibrated.
    return build_dataset(
        data,
        task_names(config),
        env.rank,
        env.world_size,
        apply_downsampling_weights=True,
        num_epochs=1,
        shuffle=False,
    )


def build_metrics(config: RecapConfig, device: torch.device) -> RankingMetrics:
    stratifiers = [(s.name, s.index, s.value) for s in config.model.stratifiers]
    return RankingMetrics(task_names(config), stratifiers, device=device)
