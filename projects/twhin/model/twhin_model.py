"""The TwHIN model: one TorchRec table per entity type, relation operators, a comparator, and the loss.

Shapes: B = edges, N = rows looked up, T = tables, D = dim, S = corrupted sides, K = negatives per side.

`TwhinModel(batch)` scores each edge and its negatives: for the rhs side, comparator(lhs, op_r(n)) for every
negative rhs n; for the lhs side, comparator(n, op_r(rhs)) for every negative lhs n: negatives go through
the relation operator exactly as positives do. Logits are [B, S, 1 + K], column 0 the positive.

`TwhinTrainModule(batch)` adds the loss (`EdgeLoss`) and returns `(loss, outputs)` with `logits`,
`labels` (1 for column 0, 0 for the negatives) and `mask` (False for empty negative slots).

The forwards of modules holding the tables (TwhinTrainModule, TwhinModel) are fx-traced by TorchRec's
sparse-dist pipeline: `batch.lookups` reaches the table unchanged, and nothing branches on tensor values or
shapes (the sides and operators are Python constants from the config).

Example:
    model = TwhinModel([TableSpec("user", 100, 8), TableSpec("tweet", 50, 8)], [(0, 1)], ["translation"],
                       comparator="dot", sides=("rhs", "lhs"))
    loss, outputs = TwhinTrainModule(model, "logistic")(batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tml.projects.twhin.model.operators import RelationOperators, compare


@dataclasses.dataclass(frozen=True)
class TableSpec:
    name: str
    num_embeddings: int
    embedding_dim: int
    fp16: bool = False


class TwhinModel(nn.Module):
    """Tables + relation operators + comparator (build it with `build.build_model`).

    Args:
        tables: one per entity type, all of one dim; KJT keys are their names.
        relation_tables: (lhs table index, rhs table index) per relation.
        operators: operator name per relation.
        comparator: "dot" or "cos".
        sides: corrupted sides of the negatives, in the batch's order.
        device: where the tables are allocated ("meta": by the sharder, one rank's shards at a time).
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        relation_tables: Sequence[tuple[int, int]],
        operators: Sequence[str],
        comparator: str,
        sides: Sequence[str],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_configs import DataType

        self.tables = list(tables)
        self.relation_tables = [tuple(pair) for pair in relation_tables]
        self.dim = self.tables[0].embedding_dim
        self.comparator = comparator
        self.sides = tuple(sides)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    feature_names=[t.name],
                    pooling=PoolingType.SUM,
                    data_type=DataType.FP16 if t.fp16 else DataType.FP32,
                )
                for t in self.tables
            ],
            device=torch.device(device),
        )
        self.relations = RelationOperators(operators, self.dim)

    @property
    def table_names(self) -> list[str]:
        return [t.name for t in self.tables]

    def embed(self, lookups) -> torch.Tensor:
        """Vectors [N, D] of the N bags of `lookups` (each bag one id of one table)."""
        values = self.ebc(lookups).values().float()
        if len(self.tables) == 1:
            return values
        # Bag i has a vector in its own table's D columns and zeros in the others.
        return values.reshape(-1, len(self.tables), self.dim).sum(1)

    def score(self, lhs: torch.Tensor, rel: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Scores [B] of edges given their vectors [B, D] and relations [B]."""
        return compare(lhs, self.relations(rel, rhs), self.comparator)

    def forward(self, batch) -> torch.Tensor:
        x = self.embed(batch.lookups)
        lhs, rhs = x[batch.lhs_index], x[batch.rhs_index]
        operated = self.relations(batch.rel, rhs)
        positive = compare(lhs, operated, self.comparator).unsqueeze(1)
        per_side = []
        for s, side in enumerate(self.sides):
            candidates = x[batch.neg_index[:, s]]  # [B, K, D]
            if side == "rhs":
                moved = self.relations(batch.rel, candidates, per_row=True)
                negative = compare(lhs.unsqueeze(1), moved, self.comparator)
            else:
                negative = compare(candidates, operated.unsqueeze(1), self.comparator)
            per_side.append(torch.cat([positive, negative], dim=1))
        return torch.stack(per_side, dim=1)


class EdgeLoss(nn.Module):
    """The loss of [B, S, 1 + K] logits (column 0 the positive) with a [B, S, 1 + K] bool mask.

    Each (edge, side) is one query. logistic: binary cross-entropy of the positive (label 1) plus the
    mean binary cross-entropy of its real negatives (label 0), so a positive and its negatives weigh the
    same whatever K is (the original's neg_weight = positives / negatives); softmax: cross-entropy of the
    positive against itself and its real negatives. The loss is the mean over queries.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("logistic", "softmax"):
            raise ValueError(f"loss must be logistic or softmax, got {kind!r}")
        self.kind = kind

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.kind == "softmax":
            masked = logits.masked_fill(~mask, float("-inf"))
            return (torch.logsumexp(masked, dim=-1) - logits[..., 0]).mean()
        positive = F.softplus(-logits[..., 0])  # BCE with label 1
        negatives = F.softplus(logits[..., 1:]) * mask[..., 1:]  # BCE with label 0
        count = mask[..., 1:].sum(-1).clamp(min=1)
        return (positive + negatives.sum(-1) / count).mean()


class TwhinTrainModule(nn.Module):
    """TwhinModel plus the loss: forward(batch) -> (loss, outputs) (docs/design.md's train-module contract).

    outputs: `logits` [B, S, 1 + K] (detached), `labels` [B, S, 1 + K] (1 then 0s), `mask` [B, S, 1 + K].
    """

    def __init__(self, model: TwhinModel, loss: str) -> None:
        super().__init__()
        self.model = model
        self.loss = EdgeLoss(loss)

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(batch)
        first = torch.ones_like(batch.neg_mask[..., :1])
        mask = torch.cat([first, batch.neg_mask], dim=-1)
        labels = torch.cat([first.float(), torch.zeros_like(batch.neg_mask, dtype=torch.float32)], dim=-1)
        loss = self.loss(logits, mask)
        return loss, {"logits": logits.detach(), "labels": labels, "mask": mask}
