"""A tiny recap-shaped train module for core tests: an EmbeddingBagCollection of 2-3 tables and an MLP.

Shapes: B = batch, T = 2 tasks, D = 4. `loss, outputs = model(batch)` as in docs/design.md.
Not a test file (no test_ prefix): test files load it by path.
"""

from __future__ import annotations

import torch
from torch import nn

from tml.reader.batch import RecapBatch

DENSE_WIDTH, DIM, TASKS = 5, 4, 2
TABLES = {"a": 40, "b": 24, "c": 16}


def make_model(
    tables=("a", "b"), hidden: int = 8, seed: int = 0, rows: dict | None = None, dropout: float = 0.0
) -> nn.Module:
    """Build the tiny model on CPU with seeded weights (same on every rank); `dropout` after the hidden layer
    (0: none, so the model is deterministic)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    torch.manual_seed(seed)
    rows = {**TABLES, **(rows or {})}
    configs = [
        EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=rows[t], feature_names=[f"f_{t}"])
        for t in tables
    ]
    return TinyModel(EmbeddingBagCollection(tables=configs), len(tables), hidden, dropout)


class TinyModel(nn.Module):
    def __init__(self, ebc: nn.Module, num_tables: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ebc = ebc
        hidden_layers = [nn.Linear(DENSE_WIDTH + DIM * num_tables, hidden), nn.ReLU()]
        if dropout:
            hidden_layers.append(nn.Dropout(dropout))
        self.mlp = nn.Sequential(*hidden_layers, nn.Linear(hidden, TASKS))

    def forward(self, batch: RecapBatch):
        pooled = self.ebc(batch.sparse).values()
        logits = self.mlp(torch.cat([batch.dense["continuous"], pooled], dim=1)).float()
        per_example = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        weights = batch.weights
        loss = (per_example * weights).sum() / weights.sum().clamp_min(1.0)
        probabilities = torch.sigmoid(logits)
        return loss, {
            "logits": logits,
            "probabilities": probabilities,
            "labels": batch.labels,
            "weights": weights,
        }


def make_batch(index: int, batch_size: int, tables=("a", "b", "c"), seed: int = 1) -> RecapBatch:
    """Deterministic batch number `index`; every key of TABLES present so any table subset can read it."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(seed * 100003 + index)
    keys, values, lengths = [], [], []
    for t in tables:
        length = torch.randint(0, 3, (batch_size,), generator=gen)
        keys.append(f"f_{t}")
        lengths.append(length)
        values.append(torch.randint(0, min(TABLES.values()), (int(length.sum()),), generator=gen))
    dense = torch.randn(batch_size, DENSE_WIDTH, generator=gen)
    labels = (torch.rand(batch_size, TASKS, generator=gen) < 0.4).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return RecapBatch(
        dense={"continuous": dense}, labels=labels, weights=torch.ones(batch_size, TASKS), sparse=kjt
    )


def slice_batch(batch: RecapBatch, start: int, stop: int) -> RecapBatch:
    """Rows [start, stop) of a batch (a rank's share of a global batch)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = batch.sparse
    keys, values, lengths = [], [], []
    kjt_keys = kjt.keys()
    for key in kjt_keys:
        jt = kjt[key]
        offsets = jt.offsets()
        keys.append(key)
        lengths.append(jt.lengths()[start:stop])
        values.append(jt.values()[offsets[start] : offsets[stop]])
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    return RecapBatch(
        dense={k: v[start:stop] for k, v in batch.dense.items()},
        labels=batch.labels[start:stop],
        weights=batch.weights[start:stop],
        sparse=sparse,
    )


def build_training(
    env,
    tables=("a", "b"),
    shardings=None,
    hidden: int = 8,
    lr: float = 0.05,
    accumulation=1,
    dropout=0.0,
    table_optimizers: dict | None = None,
    clip_grad_norm: float | None = None,
):
    """Shard the tiny model and build its Adam dense optimizer: (sharded, optimizer, scheduler)."""
    from tml.core.sharding import shard_model
    from tml.optimizers.build import build_optimizer, embedding_optimizer
    from tml.optimizers.config import EmbeddingOptimizerConfig, OptimizerConfig

    table_opt = {
        "a": EmbeddingOptimizerConfig(rowwise_adagrad={"learning_rate": 0.1}),
        "b": EmbeddingOptimizerConfig(sgd={"learning_rate": 0.1}),
        "c": EmbeddingOptimizerConfig(adagrad={"learning_rate": 0.1}),
    }
    model = make_model(tables, hidden=hidden, dropout=dropout)
    table_opt.update({t: EmbeddingOptimizerConfig(**c) for t, c in (table_optimizers or {}).items()})
    specs = {t: embedding_optimizer(table_opt[t]) for t in tables}
    sharded = shard_model(model, env, shardings, specs, gradient_accumulation=accumulation)
    config = OptimizerConfig(
        adam={},
        learning_rate={"linear_ramp_to_constant": {"learning_rate": lr, "num_ramp_steps": 2}},
        clip_grad_norm=clip_grad_norm,
    )
    optimizer, scheduler = build_optimizer(sharded.dense_named_parameters(), config)
    return sharded, optimizer, scheduler


def rank_batches(env, start: int, stop: int, batch_size: int = 4):
    """This rank's batches [start, stop) of a deterministic stream (different data per rank)."""
    for index in range(start, stop):
        yield make_batch(index * env.world_size + env.rank, batch_size)


class RankStream:
    """`rank_batches` as a resumable dataset (the reader's state_dict / load_state_dict contract)."""

    def __init__(self, env, stop: int, offset: int = 0, batch_size: int = 4) -> None:
        self.env, self.stop, self.offset, self.batch_size, self.start = env, stop, offset, batch_size, 0

    def __iter__(self):
        return rank_batches(self.env, self.offset + self.start, self.stop, self.batch_size)

    def state_dict(self, batches: int) -> dict:
        return {"batches": batches}

    def load_state_dict(self, state: dict, all_states=None) -> None:
        self.start = state["batches"]


def checkpointer(save_dir: str, env, sharded, optimizer, scheduler, every_n: int, stream=None):
    """A Checkpointer with the parts a training run registers; returns (checkpointer, loop state)."""
    from tml.core.checkpoint import Checkpointer
    from tml.core.run import training_states
    from tml.core.state import DataState, LoopState, RngState

    loop = LoopState()
    rank_states = {"rng": RngState(0, env, loop)}
    if stream is not None:
        rank_states["data"] = DataState(stream, loop)
    states = training_states(sharded, optimizer, scheduler, loop)
    return Checkpointer(save_dir, env, states, rank_states, every_n=every_n), loop


class CountMetrics:
    """Counts evaluated examples and sums probabilities, reduced across ranks in compute()."""

    def reset(self):
        self.totals = torch.zeros(2, dtype=torch.float64)

    def update(self, batch, outputs):
        self.totals += torch.tensor(
            [batch.batch_size, float(outputs["probabilities"].sum())], dtype=torch.float64
        )

    def compute(self):
        totals = self.totals.clone()
        torch.distributed.all_reduce(totals)
        return {"examples": totals[0].item(), "probability_sum": totals[1].item()}
