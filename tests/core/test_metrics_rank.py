"""Link-prediction metrics: ranks with ties, masks and NaN; MRR / Hits@k; the accumulating RankMetrics."""

from __future__ import annotations

import math

import pytest
import torch

from tml.core.metrics import RankMetrics, hits_at_k, mrr
from tml.core.metrics_rank import ranks

pytestmark = pytest.mark.unit


def test_ranks_count_ties_half_and_respect_the_mask():
    pos = torch.tensor([2.0, 0.0, 5.0, float("nan")])
    neg = torch.tensor([[1.0, 3.0, 3.0], [1.0, 1.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert ranks(pos, neg).tolist() == [3.0, 3.5, 1.0, 4.0]
    mask = torch.tensor([[True, False, True], [True, True, True], [True, True, True], [False, True, True]])
    assert ranks(pos, neg, mask).tolist() == [2.0, 3.5, 1.0, 3.0]


def test_mrr_and_hits_on_hand_computed_scores():
    pos = torch.tensor([2.0, 0.0])
    neg = torch.tensor([[1.0, 3.0], [1.0, 1.0]])  # ranks 2 and 3
    assert mrr(pos, neg) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert hits_at_k(pos, neg, 1) == 0.0
    assert hits_at_k(pos, neg, 2) == 0.5
    assert hits_at_k(pos, neg, 3) == 1.0
    assert math.isnan(mrr(torch.zeros(0), torch.zeros(0, 4)))


def test_rank_metrics_accumulate_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(300, generator=g), torch.randn(300, 20, generator=g)
    metrics = RankMetrics(ks=(1, 5))
    assert math.isnan(metrics.compute()["mrr"])
    for rows in torch.arange(300).split(70):
        metrics.update_scores(pos[rows], neg[rows])
    r = metrics.compute()
    assert r["count"] == 300.0
    assert r["mrr"] == pytest.approx(mrr(pos, neg), rel=1e-12)
    assert r["hits_at_1"] == pytest.approx(hits_at_k(pos, neg, 1), rel=1e-12)
    assert r["hits_at_5"] == pytest.approx(hits_at_k(pos, neg, 5), rel=1e-12)
    assert sorted(r) == ["count", "hits_at_1", "hits_at_5", "mrr"]
    metrics.reset()
    assert metrics.compute()["count"] == 0.0


def test_rank_inputs_are_checked():
    with pytest.raises(ValueError, match="ks must be distinct positive ints"):
        RankMetrics(ks=(0, 1))
    with pytest.raises(ValueError, match="ks must be distinct positive ints"):
        RankMetrics(ks=(3, 3))
    metrics = RankMetrics()
    with pytest.raises(ValueError, match=r"scores_neg must be \[B=2, K\]"):
        metrics.update_scores(torch.zeros(2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"scores_pos must be \[B\]"):
        metrics.update_scores(torch.zeros(2, 1), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="neg_mask must be a bool tensor"):
        metrics.update_scores(torch.zeros(2), torch.zeros(2, 4), torch.ones(2, 4))
