"""RankingMetrics and the exact AUROC / PR-AUC references, on hand-computed and random inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tml.core.metrics import EPS, METRIC_NAMES, RankingMetrics, auroc_exact, pr_auc_exact

pytestmark = pytest.mark.unit


def _outputs(p, y, w) -> dict[str, torch.Tensor]:
    as_2d = lambda x: torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1)  # noqa: E731
    return {"probabilities": as_2d(p), "labels": as_2d(y), "weights": as_2d(w)}


def _segments(discrete: torch.Tensor, stratifiers):
    """Segment names and a mask function over `discrete` rows, as a project would give them."""
    names = [f"{name}={value}" for name, _, value in stratifiers]

    def masks(batch: dict) -> torch.Tensor:
        rows = batch["rows"]
        return torch.stack([discrete[rows, column] == value for _, column, value in stratifiers], dim=1)

    return names, masks


def _random(n: int, tasks: int, seed: int, mean_logit: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(n, tasks, generator=g) * 1.5 + mean_logit
    y = (torch.rand(n, tasks, generator=g) < torch.sigmoid(0.8 * logit + 0.2)).float()
    w = torch.rand(n, tasks, generator=g) * 2.0 + 0.1
    return torch.sigmoid(logit), y, w


def _as_numpy(p, y, w):
    p, y, w = (np.asarray(x, dtype=np.float64).ravel() for x in (p, y, w))
    return np.clip(p, EPS, 1 - EPS), y, w


def _rce_of(q, y, w) -> float:
    q = np.clip(q, EPS, 1 - EPS)
    loss = np.sum(w * -(y * np.log(q) + (1 - y) * np.log1p(-q))) / w.sum()
    m = np.sum(w * y) / w.sum()
    return 100 * (1 - loss / -(m * np.log(m) + (1 - m) * np.log1p(-m)))


def _nrce_reference(p, y, w) -> float:
    """The original's NRCE on every example: predictions times mean label / mean prediction, clipped."""
    p, y, w = _as_numpy(p, y, w)
    return _rce_of(p * np.sum(w * y) / np.sum(w * p), y, w)


def _nrce_logit_shift_reference(p, y, w) -> float:
    """Logits shifted by the one constant that makes the weighted mean prediction the mean label."""
    p, y, w = _as_numpy(p, y, w)
    logit = np.log(p) - np.log1p(-p)
    low, high = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if np.sum(w / (1 + np.exp(-(logit + mid)))) > np.sum(w * y):
            high = mid
        else:
            low = mid
    return _rce_of(1 / (1 + np.exp(-(logit + 0.5 * (low + high)))), y, w)


def test_exact_references_on_hand_computed_inputs():
    assert auroc_exact([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # positive (w=2) at 0.5 ties a negative (w=1) and beats one (w=1): 2 * (1 + 0.5) / (2 * 2)
    assert auroc_exact([0.5, 0.5, 0.2], [1, 0, 0], [2, 1, 1]) == pytest.approx(0.75)
    # ranks 1..4 are +, -, +, -: precision 1 at recall 0.5, 2/3 at recall 1
    assert pr_auc_exact([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert pr_auc_exact([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # one threshold for the tie
    assert pr_auc_exact([0.9, 0.8, 0.7], [1, 0, 1], [1, 5, 1]) == pytest.approx(0.5 + 0.5 * 2 / 7)
    assert math.isnan(auroc_exact([0.1, 0.2], [1, 1]))
    assert math.isnan(pr_auc_exact([0.1, 0.2], [0, 0]))


def test_auroc_exact_matches_brute_force_pairs():
    rng = np.random.default_rng(3)
    p = rng.integers(0, 5, 40) / 4.0  # many ties
    y = rng.integers(0, 2, 40).astype(float)
    w = rng.random(40)
    num = den = 0.0
    for i, j in itertools.product(range(40), range(40)):
        pair = w[i] * y[i] * w[j] * (1 - y[j])
        num += pair * ((p[i] > p[j]) + 0.5 * (p[i] == p[j]))
        den += pair
    assert auroc_exact(p, y, w) == pytest.approx(num / den, abs=1e-12)


@pytest.mark.parametrize("mean_logit", [0.0, -7.0])  # -7: a rare task, probabilities ~1e-3 and below
def test_binned_auc_matches_exact_on_weighted_random_data(mean_logit):
    p, y, w = _random(20000, 2, seed=1, mean_logit=mean_logit)
    metrics = RankingMetrics(["a", "b"])
    for rows in torch.arange(20000).split(3000):
        metrics.update(None, {"probabilities": p[rows], "labels": y[rows], "weights": w[rows]})
    results = metrics.compute()
    for t, task in enumerate(["a", "b"]):
        assert abs(results[f"{task}/auroc"] - auroc_exact(p[:, t], y[:, t], w[:, t])) < 1e-3
        assert abs(results[f"{task}/pr_auc"] - pr_auc_exact(p[:, t], y[:, t], w[:, t])) < 1e-3


def test_each_metric_on_a_hand_computed_batch():
    p, y, w = [0.8, 0.4, 0.3, 0.1], [1, 0, 1, 0], [1.0, 2.0, 1.0, 1.0]
    metrics = RankingMetrics(["t"])
    metrics.update(None, _outputs(p, y, w))
    r = metrics.compute()
    weight, mean_label = 5.0, 2.0 / 5.0
    mean_pred = (0.8 + 0.8 + 0.3 + 0.1) / 5.0
    loss = -(math.log(0.8) + 2 * math.log(0.6) + math.log(0.3) + math.log(0.9)) / weight
    baseline = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    assert r["t/count"] == 4.0 and r["t/weight_sum"] == pytest.approx(weight)
    assert r["t/mean_label"] == pytest.approx(mean_label)
    assert r["t/mean_prediction"] == pytest.approx(mean_pred, rel=1e-6)
    assert r["t/calibration"] == pytest.approx(mean_pred / mean_label, rel=1e-6)
    assert r["t/log_loss"] == pytest.approx(loss, rel=1e-6)
    assert r["t/rce"] == pytest.approx(100 * (1 - loss / baseline), rel=1e-5)
    # pairs (pos, neg weight): 0.8 beats 0.4 (2) and 0.1 (1); 0.3 beats 0.1 (1): 4 of 2 * 3
    assert r["t/auroc"] == pytest.approx(4.0 / 6.0)
    # thresholds 0.8 (+), 0.4 (-, w 2), 0.3 (+): 0.5 * 1 + 0.5 * 2 / 4
    assert r["t/pr_auc"] == pytest.approx(0.75)
    # mean prediction equals mean label here, so NRCE needs no rescaling and equals RCE exactly
    assert r["t/nrce"] == pytest.approx(r["t/rce"], abs=1e-5)


def test_binned_metrics_count_ties_like_the_exact_ones():
    metrics = RankingMetrics(["t"], num_bins=100)
    # 0.5 and 0.5001 share a bin: a tie, as in the exact case [0.5, 0.5, 0.2] with weights [2, 1, 1]
    metrics.update(None, _outputs([0.5, 0.5001, 0.2], [1, 0, 0], [2.0, 1.0, 1.0]))
    r = metrics.compute()
    assert r["t/auroc"] == pytest.approx(auroc_exact([0.5, 0.5, 0.2], [1, 0, 0], [2, 1, 1]))
    assert r["t/pr_auc"] == pytest.approx(pr_auc_exact([0.5, 0.5, 0.2], [1, 0, 0], [2, 1, 1]))
    metrics.reset()
    metrics.update(None, _outputs([0.3] * 4, [1, 0, 1, 0], [1.0] * 4))
    assert metrics.compute()["t/auroc"] == pytest.approx(0.5)


def test_rce_is_zero_at_the_mean_label_and_nrce_is_zero_for_any_constant():
    _, y, w = _random(1000, 1, seed=2)
    mean_label = float((w * y).sum() / w.sum())
    metrics = RankingMetrics(["t"])
    metrics.update(None, _outputs(torch.full_like(y, mean_label), y, w))
    assert metrics.compute()["t/rce"] == pytest.approx(0.0, abs=1e-4)
    metrics.reset()
    metrics.update(None, _outputs(torch.full_like(y, 0.03), y, w))
    r = metrics.compute()
    assert r["t/rce"] < -10.0
    assert r["t/nrce"] == pytest.approx(0.0, abs=1e-4)


def test_nrce_logit_shift_is_invariant_to_a_logit_shift_and_matches_its_definition():
    p, y, w = _random(20000, 1, seed=4)
    logit = torch.logit(p.double())
    reference = _nrce_logit_shift_reference(p, y, w)
    rces = []
    for shift in (0.0, -1.5, 0.8):
        shifted = torch.sigmoid(logit + shift).float()
        metrics = RankingMetrics(["t"])
        metrics.update(None, _outputs(shifted, y, w))
        r = metrics.compute()
        assert r["t/nrce_logit_shift"] == pytest.approx(reference, abs=1e-3)
        rces.append(r["t/rce"])
    assert max(rces) - min(rces) > 1.0  # the shifts do change RCE


# Logit shifts of the predictions: -2 and -1 under-predict (rescaled 8x and 3x; 2% of the rescaled
# predictions reach the clip at 1 - 1e-7, where the binned estimate is coarsest), 1 and 3 over-predict.
@pytest.mark.parametrize(
    ("shift", "tolerance"), [(0.0, 0.01), (-2.0, 0.1), (-1.0, 0.01), (1.0, 0.01), (3.0, 0.01)]
)
def test_nrce_is_the_originals_rescaling_on_every_example(shift, tolerance):
    # The original's NRCE multiplies every prediction by mean label / mean prediction (then clips).
    p, y, w = _random(20000, 2, seed=7, mean_logit=-3.0)
    p = torch.sigmoid(torch.logit(p.double()) + shift).float()
    metrics = RankingMetrics(["a", "b"])
    for rows in torch.arange(20000).split(4096):
        metrics.update(None, _outputs(p[rows], y[rows], w[rows]))
    r = metrics.compute()
    for t, task in enumerate(["a", "b"]):
        assert r[f"{task}/nrce"] == pytest.approx(_nrce_reference(p[:, t], y[:, t], w[:, t]), abs=tolerance)
        assert r[f"{task}/nrce_logit_shift"] == pytest.approx(
            _nrce_logit_shift_reference(p[:, t], y[:, t], w[:, t]), abs=1e-3
        )
    if shift == 3.0:
        # Far from calibrated, the two recalibrations disagree by whole points: they are different metrics.
        assert abs(r["a/nrce"] - r["a/nrce_logit_shift"]) > 1.0


def test_nrce_rescales_a_hand_computed_batch():
    # Mean prediction 0.4, mean label 0.5: every prediction times 1.25.
    p, y = [0.6, 0.2], [1.0, 0.0]
    metrics = RankingMetrics(["t"])
    metrics.update(None, _outputs(p, y, [1.0, 1.0]))
    r = metrics.compute()
    loss = -(math.log(0.75) + math.log(0.75)) / 2
    assert r["t/nrce"] == pytest.approx(100 * (1 - loss / math.log(2)), abs=1e-3)


def test_segments_equal_metrics_on_their_rows_alone():
    p, y, w = _random(3000, 2, seed=5)
    discrete = torch.randint(0, 3, (3000, 4), generator=torch.Generator().manual_seed(6))
    names, masks = _segments(discrete, [("country", 1, 2), ("surface", 3, 0)])
    metrics = RankingMetrics(["a", "b"], names, masks)
    for rows in torch.arange(3000).split(1000):
        metrics.update({"rows": rows}, _outputs(p[rows], y[rows], w[rows]))
    results = metrics.compute()
    assert len(results) == 3 * 2 * len(METRIC_NAMES)
    for name, column, value in [("country", 1, 2), ("surface", 3, 0)]:
        rows = discrete[:, column] == value
        alone = RankingMetrics(["a", "b"])
        alone.update(None, _outputs(p[rows], y[rows], w[rows]))
        for key, expected in alone.compute().items():
            assert results[f"{name}={value}/{key}"] == pytest.approx(expected, rel=1e-9, abs=1e-9), key
    assert results["country=2/a/count"] == float((discrete[:, 1] == 2).sum())


def test_core_metrics_name_no_project_field():
    # Segments come from the project (segment_masks); core must not know a batch's fields.
    import pathlib

    import tml.core.metrics as module

    source = pathlib.Path(module.__file__).read_text()
    for name in ("discrete", "dense", "RecapBatch", "stratif", "recap"):
        assert name not in source, name


def test_degenerate_and_nan_inputs_give_nan_not_numbers():
    metrics = RankingMetrics(["t", "u"])
    assert math.isnan(metrics.compute()["t/auroc"])  # nothing seen yet
    p = torch.tensor([[0.2, 0.2], [0.7, float("nan")]])
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    metrics.update(None, {"probabilities": p, "labels": y, "weights": torch.ones_like(y)})
    r = metrics.compute()
    for key in ("t/auroc", "t/pr_auc", "t/rce", "t/nrce", "t/calibration"):
        assert math.isnan(r[key]), key  # task t has no positive label
    assert r["t/log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2, rel=1e-6)
    for key in ("u/auroc", "u/log_loss", "u/mean_prediction", "u/rce"):
        assert math.isnan(r[key]), key  # task u saw a NaN prediction
    assert r["u/mean_label"] == 0.5
    metrics.reset()
    assert metrics.compute()["t/count"] == 0.0


def test_bad_inputs_raise_errors_that_name_the_problem():
    with pytest.raises(ValueError, match="duplicates"):
        RankingMetrics(["a", "a"])
    with pytest.raises(ValueError, match="num_bins"):
        RankingMetrics(["a"], num_bins=1)
    with pytest.raises(ValueError, match="segment_names has duplicates"):
        RankingMetrics(["a"], ["c=1", "c=1"], lambda batch: batch)
    with pytest.raises(ValueError, match="segment name must be a non-empty string without '/'"):
        RankingMetrics(["a"], ["a/b"], lambda batch: batch)
    with pytest.raises(ValueError, match="give segment_masks exactly when there are segment_names"):
        RankingMetrics(["a"], ["c=1"])
    with pytest.raises(ValueError, match="give segment_masks exactly when there are segment_names"):
        RankingMetrics(["a"], [], lambda batch: batch)
    # The mask function here returns the batch itself: a test hands the masks in directly.
    metrics = RankingMetrics(["a", "b"], ["c=1"], lambda batch: batch)
    good = _outputs([0.5], [1.0], [1.0])
    with pytest.raises(ValueError, match=r"outputs\['probabilities'\] must be \[B, T=2\]"):
        metrics.update(torch.ones(1, 1, dtype=torch.bool), good)
    two = {k: v.repeat(1, 2) for k, v in good.items()}
    with pytest.raises(ValueError, match="outputs has no 'weights'"):
        metrics.update(torch.ones(1, 1, dtype=torch.bool), {k: two[k] for k in ("probabilities", "labels")})
    for wrong in (torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1), [[True]]):
        with pytest.raises(ValueError, match=r"must return a bool tensor \[B, S\] = \[1, 1\]"):
            metrics.update(wrong, two)
    metrics.update(torch.ones(1, 1, dtype=torch.bool), two)
    assert metrics.compute()["c=1/a/count"] == 1.0
