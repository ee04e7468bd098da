"""Link-prediction metrics (graph embeddings): mean reciprocal rank and Hits@K of a positive among its negatives.

Shapes: B = positive edges, K = negatives per positive.

The rank of a positive with score s among negatives n_1..n_K is
`1 + #{n_k > s} + 0.5 * #{n_k == s}` (ties counted half, so a constant scorer gets the middle rank, not the
best); a NaN positive score gets the worst rank, 1 + K. MRR = mean(1 / rank), Hits@k = mean(rank <= k).
An optional mask marks which negatives are real (in-batch negatives can be fewer than K).

Example:
    metrics = RankMetrics(ks=(1, 10))
    metrics.update_scores(pos_scores, neg_scores)  # [B], [B, K]
    metrics.compute()  # {"mrr": 0.41, "hits_at_1": 0.3, "hits_at_10": 0.8, "count": 1000.0}
    metrics.reset()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tml.core.metrics_sync import all_reduce_sum


def ranks(
    scores_pos: torch.Tensor, scores_neg: torch.Tensor, neg_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank of each positive among its negatives (1 = best), ties counted half.

    Args:
        scores_pos: [B] score of each positive edge.
        scores_neg: [B, K] scores of its negatives.
        neg_mask: [B, K] bool, True for a real negative (None: all are real).

    Returns:
        [B] float64 ranks in [1, 1 + K].
    """
    if scores_pos.dim() != 1:
        raise ValueError(f"scores_pos must be [B], got {tuple(scores_pos.shape)}")
    if scores_neg.dim() != 2 or scores_neg.shape[0] != scores_pos.shape[0]:
        raise ValueError(f"scores_neg must be [B={scores_pos.shape[0]}, K], got {tuple(scores_neg.shape)}")
    pos = scores_pos.detach().unsqueeze(1)
    neg = scores_neg.detach()
    valid = torch.ones_like(neg, dtype=torch.bool) if neg_mask is None else neg_mask
    if valid.shape != neg.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"neg_mask must be a bool tensor shaped like scores_neg {tuple(neg.shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    # A NaN positive compares false to everything; count every real negative as above it.
    above = ((neg > pos) | torch.isnan(pos)) & valid
    tied = (neg == pos) & valid
    return 1.0 + above.sum(1, dtype=torch.float64) + 0.5 * tied.sum(1, dtype=torch.float64)


def mrr(scores_pos: torch.Tensor, scores_neg: torch.Tensor, neg_mask: torch.Tensor | None = None) -> float:
    """Mean reciprocal rank of the positives ([B] and [B, K] scores); NaN when B = 0."""
    r = ranks(scores_pos, scores_neg, neg_mask)
    return float((1.0 / r).mean()) if r.numel() else float("nan")


def hits_at_k(
    scores_pos: torch.Tensor, scores_neg: torch.Tensor, k: int, neg_mask: torch.Tensor | None = None
) -> float:
    """Fraction of positives ranked within the top k ([B] and [B, K] scores); NaN when B = 0."""
    r = ranks(scores_pos, scores_neg, neg_mask)
    return float((r <= k).double().mean()) if r.numel() else float("nan")


class RankMetrics:
    """Accumulating MRR and Hits@k, reduced over ranks with one SUM all_reduce in `compute()`.

    State: [2 + len(ks)] float64 sums: positives seen, sum of 1 / rank, hits per k.

    Args:
        ks: the k of each Hits@k (positive ints, no repeats).
        device: where the state starts; it follows the scores' device on the first update.

    Example:
        metrics = RankMetrics(ks=(1, 10))
        metrics.update_scores(torch.tensor([2.0, 0.0]), torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
        metrics.compute()  # {"mrr": 0.4167, "hits_at_1": 0.0, "hits_at_10": 1.0, "count": 2.0}
    """

    def __init__(self, ks: Sequence[int] = (1, 10), device: torch.device | str = "cpu") -> None:
        self.ks = list(ks)
        bad = [k for k in self.ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"RankMetrics: ks must be distinct positive ints, got {list(ks)}")
        self._state = torch.zeros(2 + len(self.ks), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update_scores(
        self, scores_pos: torch.Tensor, scores_neg: torch.Tensor, neg_mask: torch.Tensor | None = None
    ) -> None:
        """Add a batch: scores_pos [B], scores_neg [B, K], optional neg_mask [B, K] bool."""
        self.update_ranks(ranks(scores_pos, scores_neg, neg_mask))

    @torch.no_grad()
    def update_ranks(self, r: torch.Tensor) -> None:
        """Add positives whose ranks [B] (1 = best, ties counted half) are already known, e.g. from a full
        ranking against every candidate."""
        r = r.detach().to(torch.float64)
        if self._state.device != r.device:
            self._state = self._state.to(r.device)
        hits = [(r <= k).sum(dtype=torch.float64) for k in self.ks]
        self._state += torch.stack([r.new_tensor(float(r.numel())), (1.0 / r).sum(), *hits])

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """{"mrr", "hits_at_<k>" per k, "count"} over all ranks (every rank must call); NaN before any data."""
        count, rr_sum, *hits = all_reduce_sum(self._state.clone()).tolist()
        mean = (lambda x: x / count) if count > 0 else (lambda x: float("nan"))
        results = {"mrr": mean(rr_sum)}
        results.update({f"hits_at_{k}": mean(h) for k, h in zip(self.ks, hits, strict=True)})
        results["count"] = count
        return results

    def reset(self) -> None:
        """Forget everything added so far."""
        self._state.zero_()
