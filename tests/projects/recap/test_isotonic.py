"""The isotonic fit: PAV equals the brute-force min-max formula, the binned sums of raw predictions give
the same fit as the raw points, and the Calibrator applies the fitted map at every fitted point."""

import numpy as np
import pytest
import torch

from tml.projects.home.recap.isotonic import BinnedStats, fit_knots, knots_from_fit, pav
from tml.projects.home.recap.model.heads import Calibrator, check_knots

pytestmark = pytest.mark.unit


def brute_force_isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted isotonic regression by its closed form: fit_i = max_{j<=i} min_{k>=i} mean_w(y[j..k])."""
    n = len(y)
    mean = lambda j, k: float((w[j : k + 1] * y[j : k + 1]).sum() / w[j : k + 1].sum())  # noqa: E731
    return np.array([max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


@pytest.mark.parametrize("seed", range(20))
def test_pav_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 25))
    y = rng.random(n) if seed % 2 else rng.integers(0, 2, n).astype(float)  # means and 0/1 labels
    w = rng.random(n) * 3 + 0.01
    fitted = pav(y, w)
    np.testing.assert_allclose(fitted, brute_force_isotonic(y, w), rtol=0, atol=1e-12)
    assert np.all(np.diff(fitted) >= 0)
    # The fit keeps the weighted mean (each pooled block's value is its points' weighted mean).
    assert (w * fitted).sum() == pytest.approx((w * y).sum())


def test_pav_examples():
    np.testing.assert_allclose(pav(np.array([1.0, 3.0, 2.0]), np.ones(3)), [1.0, 2.5, 2.5])
    np.testing.assert_allclose(pav(np.array([3.0, 2.0, 1.0]), np.array([1.0, 1.0, 2.0])), [1.75] * 3)
    np.testing.assert_allclose(pav(np.array([0.1, 0.2]), np.ones(2)), [0.1, 0.2])


@pytest.mark.parametrize("seed", range(5))
def test_knots_reproduce_the_fit_at_every_point(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.random(40)) * 0.9 + 0.05
    y = rng.integers(0, 2, 40).astype(float)
    w = rng.random(40) + 0.1
    knots = fit_knots(x, y, w)
    check_knots("t", *knots)  # x from 0 to 1, strictly rising; y non-decreasing within [0, 1]
    calibrated = Calibrator([knots])(torch.tensor(x, dtype=torch.float32)[:, None])[:, 0]
    np.testing.assert_allclose(calibrated.numpy(), brute_force_isotonic(y, w), atol=1e-6)
    # Flat outside the points, linear between blocks, like scikit-learn's out_of_bounds="clip".
    ends = Calibrator([knots])(torch.tensor([[0.0], [0.01], [0.99], [1.0]]))[:, 0].tolist()
    assert ends[0] == ends[1] == pytest.approx(knots[1][0]) and ends[2] == ends[3] == pytest.approx(
        knots[1][-1]
    )


def test_knots_of_one_block_and_of_points_at_the_ends():
    assert knots_from_fit(np.array([0.25, 0.5]), np.array([0.3, 0.3])) == ([0.0, 0.25, 0.5, 1.0], [0.3] * 4)
    xs, ys = knots_from_fit(np.array([0.0, 1.0]), np.array([0.1, 0.9]))
    assert (xs, ys) == ([0.0, 1.0], [0.1, 0.9])


def test_binned_sums_give_the_fit_of_the_raw_points():
    # Predictions far apart in logit land in bins of their own: the fit on bins is the fit on the points.
    rng = np.random.default_rng(0)
    logits = np.sort(rng.uniform(-6, 3, 30))
    logits += np.arange(30) * 0.01  # at least one bin apart at 100000 bins
    p = 1 / (1 + np.exp(-logits))
    y = (rng.random(30) < p).astype(float)
    w = rng.random(30) + 0.5
    stats = BinnedStats(num_tasks=2, num_bins=100000)
    order = rng.permutation(30)  # order and batching do not matter
    for part in np.array_split(order, 4):
        both = [torch.tensor(np.stack([a[part], a[part]], axis=1)) for a in (p, y, w)]  # two equal tasks
        stats.update(both[0].float(), both[1], both[2])
    x_bins, y_bins, w_bins = stats.reduced().points(1)
    assert len(x_bins) == 30
    np.testing.assert_allclose(x_bins, p.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(y_bins, y)
    np.testing.assert_allclose(w_bins, w)
    assert fit_knots(x_bins, y_bins, w_bins) == fit_knots(p.astype(np.float32).astype(np.float64), y, w)
    weight, labels, predictions = stats.totals(0)
    assert (weight, labels) == (pytest.approx(w.sum()), pytest.approx((w * y).sum()))
    assert predictions == pytest.approx((w * p).sum(), rel=1e-6)
