"""`build_*` functions that turn a RecapConfig into the pieces `main.py` wires together."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from tml.core.config.loader import ConfigError
from tml.core.distributed import DistEnv
from tml.core.metrics import RankingMetrics
from tml.core.sharding import ShardedModel, shard_model
from tml.core.tables import load_full_table
from tml.ml_logging.log import get_logger
from tml.optimizers.build import build_optimizer, embedding_optimizer
from tml.optimizers.config import LearningRate, OptimizerConfig
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.model import RecapTrainModule, build_loss, build_model, parameter_groups
from tml.projects.home.recap.model.embeddings import read_pretrained
from tml.projects.home.recap.model.sparse_linear import build_sparse_features
from tml.projects.home.recap.model.stratifiers import stratifier_segments
from tml.reader.config import DataConfig, ValidationDataConfig, dense_widths
from tml.reader.dataset import ParquetDataset, build_dataset, build_eval_dataset

logger = get_logger(__name__)


def task_names(config: RecapConfig) -> list[str]:
    return list(config.model.tasks)


def build_train_module(config: RecapConfig, embedding_device: str = "cpu") -> RecapTrainModule:
    """The unsharded train module on CPU; large tables on `embedding_device` ("meta": allocated later, one
    rank's shards at a time, by `build_sharded`)."""
    data = config.train_data
    downsampling = {
        task: (rates.pos_downsampling_rate, rates.neg_downsampling_rate) for task, rates in data.tasks.items()
    }
    model = build_model(
        config.model,
        dense_widths(data),
        [feature.name for feature in data.sparse_features],
        downsampling,
        embedding_device=embedding_device,
        sparse_linear=build_sparse_features(config.model.discretizer, config.model.sparse_linear, data),
    )
    return RecapTrainModule(model, build_loss(config.model))


def build_sharded(config: RecapConfig, env: DistEnv) -> ShardedModel:
    """Build, shard (TorchRec DMP for embedding tables, DDP otherwise) and load pretrained tables.

    Tables are created on the meta device and materialised by the sharder, each rank allocating only its
    shards; a pretrained file is read once per rank, after sharding.
    """
    module = build_train_module(config, embedding_device="meta")
    large = config.model.large_embeddings
    if large is None:
        return shard_model(module, env, None, {})
    shardings = {
        t.name: (t.sharding.sharding_type, t.sharding.compute_kernel)
        for t in large.tables
        if t.sharding is not None
    }
    optimizers = {t.name: embedding_optimizer(large.optimizer) for t in large.tables}
    batch_size = config.train_data.global_batch_size // env.world_size
    sharded = shard_model(
        module,
        env,
        shardings,
        optimizers,
        seed=config.training.seed,
        batch_size=batch_size,
        gradient_accumulation=config.training.gradient_accumulation,
    )
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


def build_for_inference(config: RecapConfig, checkpoint: str | None) -> tuple[DistEnv, ShardedModel, int]:
    """Start the process, build the sharded model and load `checkpoint`'s weights (default: save_dir's
    latest) without a Checkpointer: nothing in the run folder is touched. Returns (env, model, step)."""
    from tml.core import run

    env = run.start(config.training)
    sharded = build_sharded(config, env)
    return env, sharded, run.load_trained(sharded.module, checkpoint or config.training.save_dir, config)


def build_recap_optimizer(config: RecapConfig, sharded: ShardedModel):
    """Dense optimizer + LambdaLR: one schedule for the backbone and one per tower, or a single one.

    The backbone group (every non-tower, non-table parameter) exists only when the model has such
    parameters (a share_none model with a parameter-free featurization has none); its schedule must be
    set exactly then, so that no schedule in the config goes unused.
    """
    opt = config.optimizer
    single = opt.single_task_learning_rate
    rates = opt.multi_task_learning_rates
    schedules: dict[str, LearningRate] = {}
    if single is None:
        prefixes = parameter_groups(unwrap(sharded.module))
        key = "optimizer.multi_task_learning_rates.backbone_learning_rate"
        if "backbone" in prefixes and rates.backbone_learning_rate is None:
            raise ConfigError(
                f"{key} is unset, but the model has parameters outside the towers and tables "
                f"({', '.join(p.removeprefix('model.') for p in prefixes['backbone'])}): give them a schedule"
            )
        if "backbone" not in prefixes and rates.backbone_learning_rate is not None:
            raise ConfigError(
                f"{key} is set, but the model has no parameters outside the towers and tables "
                f"(multi_task_type {config.model.multi_task_type.value}, a parameter-free featurization, no "
                "small embeddings or position debias): remove it, it would train nothing"
            )
        if rates.backbone_learning_rate is not None:
            schedules["backbone"] = rates.backbone_learning_rate
        schedules.update(rates.tower_learning_rates)
    dense = OptimizerConfig(
        adam=opt.adam,
        sgd=opt.sgd,
        adagrad=opt.adagrad,
        # Without groups every parameter follows this schedule; with groups each follows its own.
        learning_rate=single if single is not None else next(iter(schedules.values())),
        clip_grad_norm=opt.clip_grad_norm,
    )
    if single is not None:
        return build_optimizer(sharded.dense_named_parameters(), dense)
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
    return _named(
        "train_data", lambda: build_dataset(config.train_data, task_names(config), env.rank, env.world_size)
    )


def build_validation_data(config: RecapConfig, env: DistEnv) -> dict[str, ParquetDataset]:
    """Every validation partition, built once: each evaluation is a new pass (`iter()`) over them. Building
    them reads every file's footer, so missing files and columns fail before training starts."""
    return {
        name: _named(
            f"validation_data.{name}",
            lambda data=data: build_eval_dataset(data, task_names(config), env.rank, env.world_size),
        )
        for name, data in config.validation_data.items()
    }


_SECTION_KEYS = {*DataConfig.model_fields, *ValidationDataConfig.model_fields}


def _named(section: str, build: Callable[[], ParquetDataset]) -> ParquetDataset:
    # The reader names the key within its section (`inputs '...' matches no files`); say which section.
    try:
        return build()
    except (FileNotFoundError, ConfigError) as error:
        text = str(error)
        key = re.match(r"[a-z_]+", text)
        where = f"{section}." if key and key.group() in _SECTION_KEYS else f"{section}: "
        raise type(error)(where + text) from None


def build_metrics(config: RecapConfig, device: torch.device) -> RankingMetrics:
    """Ranking metrics of every task, overall and per `model.stratifiers` segment (`<name>=<value>/...`)."""
    names, masks = stratifier_segments([(s.name, s.index, s.value) for s in config.model.stratifiers])
    return RankingMetrics(task_names(config), names, masks, device=device)
