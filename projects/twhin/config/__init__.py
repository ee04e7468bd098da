"""`TwhinConfig`: the one config tree of TwHIN graph embeddings, in the original's YAML shape.

Sections: `training` (core), `model` (tables, relations, comparator, loss, the relations' own optimizer),
`train_data` (edges, batch size, negatives, shuffling, an optional string-key vocabulary),
`validation_data` (named partitions of held-out edges) and `evaluation` (filtered ranking). Every key is
described in docs/twhin.md and docs/config_reference.md.

Example:
    config = load_config(TwhinConfig, "projects/twhin/config/local.yaml")
    config.model.relations[0].operator   # "translation"
"""

from __future__ import annotations

from typing import Literal

import pydantic

from tml.core.config.base import BaseConfig
from tml.core.config.training import EmbeddingShardingConfig, TrainingConfig
from tml.optimizers.config import EmbeddingOptimizerConfig, OptimizerConfig
from tml.reader.config import Shuffle

_F = pydantic.Field

Operator = Literal["translation", "diagonal", "complex_diagonal", "none"]
# A scope name of the evaluation's metrics (all relations together); no relation may take it.
ALL_RELATIONS = "all"


class TableConfig(BaseConfig):
    """One entity type: its TorchRec table, the table's fused optimizer and its placement."""

    name: str = _F(min_length=1, description="Entity type, e.g. `user`; relations name it as lhs / rhs.")
    num_embeddings: pydantic.PositiveInt = _F(description="Rows: every id of this type lies in [0, rows).")
    embedding_dim: pydantic.PositiveInt = _F(
        multiple_of=4,
        description="Vector width; the same for every table, a multiple of 4 (FBGEMM's fused kernels).",
    )
    optimizer: EmbeddingOptimizerConfig = _F(
        description="The table's optimizer, fused into the backward pass where the device has the kernel."
    )
    data_type: Literal["fp32", "fp16"] = _F(
        "fp32", description="Storage type of the table's weights (fp16 halves the memory; vectors are fp32)."
    )
    sharding: EmbeddingShardingConfig | None = _F(
        None, description="Placement across ranks (row_wise, table_wise, ...); None: the planner decides."
    )


class EmbeddingsConfig(BaseConfig):
    tables: list[TableConfig] = _F(min_length=1, description="One table per entity type.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> EmbeddingsConfig:
        names = [t.name for t in self.tables]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"table names repeat: {repeated}")
        dims = {t.name: t.embedding_dim for t in self.tables}
        if len(set(dims.values())) > 1:
            raise ValueError(
                "every table needs the same embedding_dim (relation operators and the comparator combine the "
                f"vectors of both ends), got {', '.join(f'{n} {d}' for n, d in dims.items())}"
            )
        return self


class RelationConfig(BaseConfig):
    """One edge type: which tables its two ends live in, and how it transforms the rhs vector."""

    name: str = _F(min_length=1, description="Relation name, as in the edges' `rel` column (or its index).")
    lhs: str = _F(description="Table of the edges' `lhs` ids.")
    rhs: str = _F(description="Table of the edges' `rhs` ids.")
    operator: Operator = _F(
        "translation",
        description="translation: rhs + r; diagonal (DistMult): r * rhs; complex_diagonal (ComplEx): "
        "conj(r) * rhs over (real, imaginary) halves of the vector; none: rhs. The score is "
        "comparator(lhs, operator(rhs)).",
    )


class TwhinModelConfig(BaseConfig):
    embeddings: EmbeddingsConfig = _F(description="The entity tables.")
    relations: list[RelationConfig] = _F(min_length=1, description="Edge types, in `rel` index order.")
    comparator: Literal["dot", "cos"] = _F(
        "dot", description="dot: lhs . op(rhs); cos: the cosine of lhs and op(rhs) (scores in [-1, 1])."
    )
    loss: Literal["logistic", "softmax"] = _F(
        "logistic",
        description="logistic: binary cross-entropy, positive label 1, negatives 0, the negatives of one "
        "positive weighing as much as it (docs/twhin.md); softmax: cross-entropy of the positive against "
        "itself and its negatives.",
    )
    translation_optimizer: OptimizerConfig | None = _F(
        None,
        description="Dense optimizer and schedule of the relation parameters. Required when a relation has "
        "an operator other than none; rejected when none has (it would train nothing).",
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> TwhinModelConfig:
        tables = [t.name for t in self.embeddings.tables]
        names = [r.name for r in self.relations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"relation names repeat: {repeated}")
        if ALL_RELATIONS in names:
            raise ValueError(
                f"relation name '{ALL_RELATIONS}' is reserved for the metrics over all relations"
            )
        for i, relation in enumerate(self.relations):
            for side in ("lhs", "rhs"):
                table = getattr(relation, side)
                if table not in tables:
                    raise ValueError(
                        f"relations[{i}] ({relation.name!r}): {side} table {table!r} is not in "
                        f"embeddings.tables {tables}"
                    )
        learned = [r.name for r in self.relations if r.operator != "none"]
        if learned and self.translation_optimizer is None:
            raise ValueError(
                f"translation_optimizer is unset, but relations {learned} have parameters: give them an "
                "optimizer and learning rate"
            )
        if not learned and self.translation_optimizer is not None:
            raise ValueError(
                "translation_optimizer is set, but every relation has operator 'none' (no parameters): "
                "remove it, it would train nothing"
            )
        return self


class EdgeInputConfig(BaseConfig):
    """Edges read from Parquet (`lhs`, `rel`, `rhs`), as a validation partition reads them."""

    inputs: str = _F(
        description="Glob, directory, file or fsspec URL of Parquet files with columns lhs, rel, rhs (the "
        "original's `data_root`)."
    )
    global_batch_size: pydantic.PositiveInt = _F(
        description="Edges per step over all ranks, divisible by the world size (the original's "
        "per_replica_batch_size x ranks)."
    )
    offset: int = _F(
        0,
        ge=0,
        description="Skip the first N edges of the inputs, counted in file order (sorted paths, rows in "
        "order) before any shuffling.",
    )
    limit: int | None = _F(
        None,
        ge=1,
        description="Read at most N edges, from `offset` on in file order; None: all. offset/limit carve "
        "disjoint slices out of the same files (rows outside are read and dropped).",
    )
    num_workers: int = _F(
        2,
        ge=0,
        description="Background threads decoding row groups; 0: the training thread decodes between steps.",
    )
    prefetch_batches: int = _F(4, ge=1, description="Ready batches queued ahead.")
    skip_unreadable_files: bool = _F(
        False, description="Skip (count, log) files that are not Parquet instead of failing."
    )


class TrainEdgeDataConfig(EdgeInputConfig):
    """The training edges, how they are shuffled, and the negatives drawn for each positive."""

    in_batch_negatives: int = _F(
        10,
        ge=0,
        description="Per positive and corrupted side: ends of other edges of the same relation in the batch "
        "(distinct edges, fewer when the batch holds fewer).",
    )
    global_negatives: int = _F(
        0,
        ge=0,
        description="Per relation, corrupted side and batch: rows drawn uniformly from the target table, "
        "shared by every edge of that relation in the batch.",
    )
    negative_sides: Literal["rhs", "lhs", "both"] = _F(
        "both",
        description="Which end negatives replace: rhs (score lhs against other rhs), lhs, or both.",
    )
    shuffle: Shuffle = _F(default_factory=Shuffle, description="Shuffling of row groups and rows.")
    num_epochs: int | None = _F(None, gt=0, description="Passes over the edges; None repeats forever.")
    vocabulary: str | None = _F(
        None,
        description="Folder of per-table key -> id vocabularies (`<table>.parquet`, built by `tml-twhin "
        "build-vocab`): lhs / rhs are then string keys. Used for every partition and the export.",
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> TrainEdgeDataConfig:
        if self.in_batch_negatives + self.global_negatives == 0:
            raise ValueError(
                "in_batch_negatives + global_negatives is 0: every loss needs negatives to contrast the "
                "positive with"
            )
        return self


class EvaluationConfig(BaseConfig):
    """Filtered ranking of held-out edges against every row of the target table."""

    candidate_chunk_size: pydantic.PositiveInt = _F(
        65536,
        description="Candidate rows scored at a time; at most (validation batch / ranks) x this many scores "
        "are held at once.",
    )
    filter_inputs: list[str] | None = _F(
        None,
        description="Edges known to be true, removed from the candidates of every query (globs / URLs); "
        "None: train_data.inputs and every validation partition's inputs, whole (offset/limit ignored).",
    )


class TwhinConfig(BaseConfig):
    training: TrainingConfig = _F(description="Run length, output folder, cadence, devices.")
    model: TwhinModelConfig = _F(description="Tables, relations, comparator, loss.")
    train_data: TrainEdgeDataConfig = _F(description="Training edges and negative sampling.")
    validation_data: dict[str, EdgeInputConfig] = _F(
        default_factory=dict,
        description="Named partitions of held-out edges, ranked during and after training and by evaluate.",
    )
    evaluation: EvaluationConfig = _F(
        default_factory=EvaluationConfig, description="How held-out edges are ranked."
    )

    def table_names(self) -> list[str]:
        return [t.name for t in self.model.embeddings.tables]

    @property
    def embedding_dim(self) -> int:
        return self.model.embeddings.tables[0].embedding_dim
