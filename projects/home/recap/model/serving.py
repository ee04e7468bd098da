"""The serving face of a trained RecapModel: plain tensors in, probabilities and the ranking score out.

No RecapBatch, no KeyedJaggedTensor, no process group, no torchrec: dense tensors come by name, each sparse
feature as flat ids with row offsets (a sparse continuous feature's values, when the model reads any, in a
fourth dict keyed like the ids), and the TorchRec tables become plain `nn.EmbeddingBag`s with the same
weights and pooling (their state-dict names are the TorchRec collection's, so a training checkpoint loads
into them as it is). This is what `tml-recap export` hands to `torch.export`.

The ranking score is `sum_i weight_i * p_i` over the tasks (`RankingScore`); `predict` computes it with
the same module.

Shapes: B = batch, T = tasks, N_f = ids of sparse feature f in the batch, D = an embedding width.

Example:
    serving = to_serving(model, ranking_weights=[0.5, 1.0])          # takes over `model`'s modules
    out = serving({"continuous": x, "binary": b}, {}, {})             # {"logits", "probabilities", "score"}
    out = serving(dense, {"author_id": ids}, {"author_id": offsets})  # ids [N], offsets [B + 1]
    out = serving(dense, {"counts": ids}, {"counts": offsets}, {"counts": values})  # sparse continuous
"""

from __future__ import annotations

import torch
from torch import nn

from tml.projects.home.recap.model.embeddings import LargeTable
from tml.projects.home.recap.model.recap_model import RecapModel
from tml.reader.batch import SparseValues


class RankingScore(nn.Module):
    """score = sum_i weight_i * p_i, the ranking score of the calibrated probabilities.

    Args:
        weights: [T] weight of each task, in the model's task order.

    Shapes: [B, T] -> [B].

    Example:
        RankingScore([0.5, 13.5])(torch.tensor([[0.2, 0.1]]))  # [1.45]
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        return (probabilities * self.weights).sum(dim=1)


class PlainEmbeddingBags(nn.Module):
    """The large tables as `nn.EmbeddingBag`s (sum or mean pooling), one pooled vector per sparse feature.

    The weights are allocated uninitialised: they are meant to be loaded from a checkpoint.

    Args:
        tables: the tables of `LargeEmbeddings` (its `tables`).

    Shapes: ({feature: ids [N_f]}, {feature: offsets [B + 1]}) -> {feature: [B, D]}; an empty row pools
    to zeros.
    """

    def __init__(self, tables: list[LargeTable]) -> None:
        super().__init__()
        self.tables = list(tables)
        # The TorchRec collection's state-dict names (`ebc.embedding_bags.<table>.weight`).
        self.ebc = nn.Module()
        self.ebc.embedding_bags = nn.ModuleDict(
            {
                t.name: nn.EmbeddingBag(
                    t.num_embeddings, t.embedding_dim, mode=t.pooling, include_last_offset=True, device="meta"
                )
                for t in self.tables
            }
        )
        self.ebc.to_empty(device="cpu")
        self.layout = [(f, t.embedding_dim) for t in self.tables for f in t.feature_names]

    def forward(
        self, values: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {
            f: self.ebc.embedding_bags[t.name](values[f], offsets[f])
            for t in self.tables
            for f in t.feature_names
        }


def dense_input_names(model: RecapModel) -> list[str]:
    """The dense tensors the model reads, in a fixed order (others in the data are not needed)."""
    names = ["continuous", *model.featurizer.concat_names]
    if model.dense_vectors is not None:
        names += [name for name, _ in model.dense_vectors.layout]
    if model.position is not None or model.small_embeddings is not None:
        names.append("discrete")
    if model.sparse_linear is not None:
        names += [name for name in model.sparse_linear.dense_names() if name not in names]
    return names


def sparse_input_rows(model: RecapModel) -> dict[str, int]:
    """The sparse features the model's tables read (KJT keys), in table order -> rows of their table."""
    tables = [] if model.large_embeddings is None else model.large_embeddings.tables
    return {feature: t.num_embeddings for t in tables for feature in t.feature_names}


def sparse_continuous_input_rows(model: RecapModel) -> dict[str, int]:
    """The sparse continuous features the model reads -> their num_buckets (ids lie below it)."""
    return {} if model.sparse_linear is None else model.sparse_linear.sparse_rows()


def _segments(
    model: RecapModel,
    dense: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    offsets: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    continuous = {
        name: SparseValues(values[name], weights[name], offsets[name])
        for name in sparse_continuous_input_rows(model)
    }
    segments = model.dense_segments(dense, continuous)
    if model.large_embeddings is not None:
        pooled = model.large_embeddings(values, offsets)
        for name, _ in model.large_embeddings.layout:
            segments[name] = pooled[name]
    return segments


class RecapServingModel(nn.Module):
    """The whole ranker on plain tensors (module docstring); build it with `to_serving`.

    Args:
        model: a RecapModel whose large tables are `PlainEmbeddingBags`, in eval mode.
        ranking_weights: [T] weights of the ranking score.

    Shapes: (dense {name: [B, width]}, ids {feature: [N_f]}, offsets {feature: [B + 1]}, [values
    {sparse continuous feature: [N_f] float32}]) -> {"logits": [B, T], "probabilities": [B, T], "score": [B]}.
    """

    def __init__(self, model: RecapModel, ranking_weights: list[float]) -> None:
        super().__init__()
        self.model = model
        self.score = RankingScore(ranking_weights)

    def forward(
        self,
        dense: dict[str, torch.Tensor],
        sparse_values: dict[str, torch.Tensor],
        sparse_offsets: dict[str, torch.Tensor],
        sparse_weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        out = self.model.from_features(
            self.model.combine(_segments(self.model, dense, sparse_values, sparse_offsets, sparse_weights))
        )
        return {
            "logits": out["logits"],
            "probabilities": out["probabilities"],
            "score": self.score(out["probabilities"]),
        }


class GroupEmbeddingsModel(nn.Module):
    """Split-tower groups alone (to precompute e.g. user embeddings); build it with `to_serving`.

    Args:
        model: a RecapModel with split towers, large tables as `PlainEmbeddingBags`, in eval mode.
        groups: the split-tower groups to compute.

    Shapes: same inputs as RecapServingModel -> {"embedding/<group>": [B, D_group]}.
    """

    def __init__(self, model: RecapModel, groups: list[str]) -> None:
        super().__init__()
        assert model.split_towers is not None
        self.model = model
        self.groups = list(groups)

    def forward(
        self,
        dense: dict[str, torch.Tensor],
        sparse_values: dict[str, torch.Tensor],
        sparse_offsets: dict[str, torch.Tensor],
        sparse_weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        segments = _segments(self.model, dense, sparse_values, sparse_offsets, sparse_weights)
        embeddings = self.model.split_towers.group_embeddings(segments, self.groups)
        return {f"embedding/{group}": embeddings[group] for group in self.groups}


def to_serving(
    model: RecapModel, ranking_weights: list[float], groups: list[str] | None = None
) -> RecapServingModel | GroupEmbeddingsModel:
    """The serving module of `model`, which it takes over: its TorchRec tables (on any device, "meta"
    included) are replaced by uninitialised `PlainEmbeddingBags` of the same shapes, to be loaded from a
    checkpoint; eval mode. `groups`: only those split-tower groups (GroupEmbeddingsModel).
    """
    if len(ranking_weights) != len(model.task_names):
        raise ValueError(f"{len(ranking_weights)} ranking weights for the {len(model.task_names)} tasks")
    if model.large_embeddings is not None:
        model.large_embeddings = PlainEmbeddingBags(model.large_embeddings.tables)
    if groups is None:
        return RecapServingModel(model, ranking_weights).eval()
    known = [] if model.split_towers is None else [g.name for g in model.split_towers.groups]
    unknown = [g for g in groups if g not in known]
    if not groups or unknown:
        have = f"split_towers.groups has {known}" if known else "the model has no model.split_towers"
        raise ValueError(f"unknown split-tower group(s) {unknown or groups}: {have}")
    return GroupEmbeddingsModel(model, groups).eval()
