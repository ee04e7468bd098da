"""Relation operators and comparators: score(lhs, r, rhs) = comparator(lhs, op_r(rhs)).

Shapes: D = embedding dim, `...` = any leading shape; P, M = rows of two matrices.

| operator | op_r(v) | with `dot` | initial r |
|---|---|---|---|
| translation | v + r | lhs . (rhs + r) (TwHIN, TransE-like) | 0 |
| diagonal | r * v | sum_k lhs_k r_k rhs_k (DistMult) | 1 |
| complex_diagonal | conj(r) * v, the vectors read as D/2 complex numbers [real half, imaginary half] | Re(sum_k lhs_k r_k conj(rhs_k)) (ComplEx) | 1 + 0i |
| none | v | lhs . rhs | no parameter |

Every relation starts as the identity (or a zero shift), so the first steps train the tables alone and
the relation vectors move away from it as their gradients say. The relation vectors are ordinary
parameters trained by `model.translation_optimizer` (the original read them through `.data`, so they never
learned).

Example:
    ops = RelationOperators(["translation", "diagonal"], dim=4)
    ops(torch.tensor([0, 1]), torch.randn(2, 4))          # [2, 4]
    compare(torch.randn(2, 4), torch.randn(2, 4), "cos")    # [2]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("translation", "diagonal", "complex_diagonal", "none")
_EPS = 1e-8


def compare(a: torch.Tensor, b: torch.Tensor, comparator: str) -> torch.Tensor:
    """Scores of broadcast pairs of vectors: [..., D] x [..., D] -> [...]."""
    if comparator == "dot":
        return (a * b).sum(-1)
    return F.cosine_similarity(a, b, dim=-1, eps=_EPS)


def pairwise(a: torch.Tensor, b: torch.Tensor, comparator: str) -> torch.Tensor:
    """Scores of every pair of rows: [P, D] x [M, D] -> [P, M]."""
    if comparator == "cos":
        a, b = F.normalize(a, dim=-1, eps=_EPS), F.normalize(b, dim=-1, eps=_EPS)
    return a @ b.T


def _apply(kind: str, r: torch.Tensor, v: torch.Tensor, half: int) -> torch.Tensor:
    if kind == "translation":
        return v + r
    if kind == "diagonal":
        return r * v
    if kind == "complex_diagonal":
        # `half` is D // 2 from the config: slicing by a traced shape would not fx-trace.
        c, d = r[..., :half], r[..., half:]
        e, f = v[..., :half], v[..., half:]
        # conj(c + id) * (e + if) = (ce + df) + i(cf - de)
        return torch.cat([c * e + d * f, c * f - d * e], dim=-1)
    return v


class RelationOperators(nn.Module):
    """op_r of every relation (see the module docstring), vectorised over edges of mixed relations.

    Args:
        operators: operator name per relation, in relation-index order.
        dim: D (even when a complex_diagonal relation exists).

    Shapes: rel [B] int, v [B, D] (or [B, K, D] with `per_row=True`: one relation per row of K vectors)
        -> [B, D] (or [B, K, D]).
    """

    def __init__(self, operators: Sequence[str], dim: int) -> None:
        super().__init__()
        unknown = sorted(set(operators) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown relation operators {unknown}; expected one of {list(KINDS)}")
        self.operators = list(operators)
        if "complex_diagonal" in self.operators and dim % 2:
            raise ValueError(
                f"complex_diagonal splits vectors into real and imaginary halves: dim {dim} is odd"
            )
        self.half = dim // 2
        learned = [i for i, op in enumerate(self.operators) if op != "none"]
        rows = [learned.index(i) if i in learned else 0 for i in range(len(self.operators))]
        self.kinds = sorted({op for op in self.operators if op != "none"}, key=KINDS.index)
        self.mixed = len(set(self.operators)) > 1
        # Derived from the config: buffers left out of the state dict.
        self.register_buffer("row", torch.tensor(rows, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "kind",
            torch.tensor([KINDS.index(op) for op in self.operators], dtype=torch.int64),
            persistent=False,
        )
        self.vectors = nn.Parameter(self._initial(learned, dim)) if learned else None

    def _initial(self, learned: list[int], dim: int) -> torch.Tensor:
        values = torch.zeros(len(learned), dim)
        for row, relation in enumerate(learned):
            op = self.operators[relation]
            if op == "diagonal":
                values[row] = 1.0
            elif op == "complex_diagonal":
                values[row, : dim // 2] = 1.0
        return values

    def forward(self, rel: torch.Tensor, v: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        if self.vectors is None:
            return v
        r = self.vectors[self.row[rel]]
        kind = self.kind[rel]
        if per_row:
            r, kind = r.unsqueeze(-2), kind.unsqueeze(-1)
        if not self.mixed:
            return _apply(self.kinds[0], r, v, self.half)
        out = v  # operator none
        for name in self.kinds:
            chosen = (kind == KINDS.index(name)).unsqueeze(-1)
            out = torch.where(chosen, _apply(name, r, v, self.half), out)
        return out

    def of_relation(self, relation: int, v: torch.Tensor) -> torch.Tensor:
        """op of one relation over a matrix of vectors [M, D] (evaluation's candidates)."""
        if self.vectors is None or self.operators[relation] == "none":
            return v
        return _apply(self.operators[relation], self.vectors[int(self.row[relation])], v, self.half)
