"""`build_*` functions that turn a TwhinConfig into the pieces `main.py` wires together."""

from __future__ import annotations

import torch

from tml.core.distributed import DistEnv
from tml.core.sharding import ShardedModel, shard_model
from tml.optimizers.build import build_optimizer, embedding_optimizer
from tml.projects.twhin.config import EdgeInputConfig, TwhinConfig
from tml.projects.twhin.data.batch import TwhinBatchBuilder, TwhinBatches
from tml.projects.twhin.data.edges import build_edge_dataset
from tml.projects.twhin.data.vocab import Vocabulary, load_vocabulary
from tml.projects.twhin.model import TableSpec, TwhinModel, TwhinTrainModule
from tml.reader.dataset import ParquetDataset

# The name of the relation parameters' optimizer group: `train/lr/relations`.
RELATIONS_GROUP = "relations"


def sides(config: TwhinConfig) -> tuple[str, ...]:
    chosen = config.train_data.negative_sides
    return ("rhs", "lhs") if chosen == "both" else (chosen,)


def relation_tables(config: TwhinConfig) -> list[tuple[int, int]]:
    """(lhs table index, rhs table index) per relation."""
    names = config.table_names()
    return [(names.index(r.lhs), names.index(r.rhs)) for r in config.model.relations]


def decoder_relations(config: TwhinConfig) -> list[tuple[str, int, int]]:
    """(name, lhs rows, rhs rows) per relation, as the edge decoder checks ids."""
    rows = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    return [(r.name, rows[r.lhs], rows[r.rhs]) for r in config.model.relations]


def build_vocabularies(config: TwhinConfig) -> dict[str, Vocabulary] | None:
    """table -> Vocabulary from `train_data.vocabulary` (None when edges carry integer ids)."""
    folder = config.train_data.vocabulary
    if folder is None:
        return None
    return {t.name: load_vocabulary(folder, t.name, t.num_embeddings) for t in config.model.embeddings.tables}


def relation_vocabularies(config: TwhinConfig, vocabularies: dict[str, Vocabulary] | None):
    if vocabularies is None:
        return None
    return [(vocabularies[r.lhs], vocabularies[r.rhs]) for r in config.model.relations]


def build_model(config: TwhinConfig, device: str = "cpu") -> TwhinTrainModule:
    """The unsharded train module; tables on `device` ("meta": allocated later by `build_sharded`)."""
    model = TwhinModel(
        [
            TableSpec(t.name, t.num_embeddings, t.embedding_dim, t.data_type == "fp16")
            for t in config.model.embeddings.tables
        ],
        relation_tables(config),
        [r.operator for r in config.model.relations],
        config.model.comparator,
        sides(config),
        device=device,
    )
    return TwhinTrainModule(model, config.model.loss)


def build_sharded(config: TwhinConfig, env: DistEnv) -> ShardedModel:
    """Build on the meta device and shard: each rank allocates only its shards of each table."""
    tables = config.model.embeddings.tables
    shardings = {t.name: (t.sharding.sharding_type, t.sharding.compute_kernel) for t in tables if t.sharding}
    return shard_model(
        build_model(config, device="meta"),
        env,
        shardings,
        {t.name: embedding_optimizer(t.optimizer) for t in tables},
        seed=config.training.seed,
        batch_size=config.train_data.global_batch_size // env.world_size,
        gradient_accumulation=config.training.gradient_accumulation,
    )


def build_twhin_optimizer(config: TwhinConfig, sharded: ShardedModel):
    """The relation parameters' optimizer and schedule (`model.translation_optimizer`), one group named
    `relations`; without relation parameters, an optimizer over nothing that the loop can step."""
    optimizer_config = config.model.translation_optimizer
    params = list(sharded.dense_named_parameters())
    if optimizer_config is None:
        assert not params, [name for name, _ in params]
        optimizer = torch.optim.SGD([{"params": [], "name": RELATIONS_GROUP}], lr=0.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    groups = {RELATIONS_GROUP: ([""], optimizer_config.learning_rate)}
    return build_optimizer(params, optimizer_config, groups)


def unwrap(module: torch.nn.Module) -> TwhinTrainModule:
    """The TwhinTrainModule inside DMP/DDP wrappers."""
    while not isinstance(module, TwhinTrainModule) and hasattr(module, "module"):
        module = module.module
    return module


def build_edges(
    section: EdgeInputConfig,
    config: TwhinConfig,
    env: DistEnv | None,
    vocabularies: dict[str, Vocabulary] | None,
    train: bool = False,
    key: str = "train_data",
) -> ParquetDataset:
    """The reader of one data section (this rank's share); evaluation reads one pass in file order."""
    data = config.train_data
    try:
        return build_edge_dataset(
            section.inputs,
            decoder_relations(config),
            section.global_batch_size,
            rank=env.rank if env is not None else 0,
            world_size=env.world_size if env is not None else 1,
            num_epochs=data.num_epochs if train else 1,
            seed=data.shuffle.seed,
            shuffle=train and data.shuffle.shuffle_files,
            buffer_size=data.shuffle.buffer_size if train else 0,
            num_workers=section.num_workers,
            prefetch_batches=section.prefetch_batches,
            skip_unreadable_files=section.skip_unreadable_files,
            vocabularies=relation_vocabularies(config, vocabularies),
            offset=section.offset,
            limit=section.limit,
        )
    except FileNotFoundError as error:
        # The reader names the key (`inputs '...' matches no files`); say which section.
        if str(error).startswith("inputs "):
            raise FileNotFoundError(f"{key}.{error}") from None
        raise


def build_batch_builder(config: TwhinConfig, env: DistEnv) -> TwhinBatchBuilder:
    data = config.train_data
    return TwhinBatchBuilder(
        config.table_names(),
        relation_tables(config),
        [t.num_embeddings for t in config.model.embeddings.tables],
        in_batch=data.in_batch_negatives,
        global_=data.global_negatives,
        sides=sides(config),
        seed=config.training.seed,
        rank=env.rank,
        batch_size=data.global_batch_size // env.world_size,
    )


def build_train_data(config: TwhinConfig, env: DistEnv, vocabularies=None) -> TwhinBatches:
    """Training batches with their negatives, resumable (tml.projects.twhin.data.batch)."""
    data = config.train_data
    edges = build_edges(data, config, env, vocabularies, train=True)
    return TwhinBatches(edges, build_batch_builder(config, env), {"offset": data.offset, "limit": data.limit})
