"""Isotonic regression of labels on predicted probabilities, from binned sufficient statistics.

Predictions are pooled in `num_bins` equal-width bins of their logit over [-L, L] (L = logit(1 - 1e-7));
each bin keeps three float64 sums per task: weight, weight * label, weight * prediction. Sums add over
batches and ranks (one all_reduce), so the fit needs no rank to hold another's predictions and costs the
same for a thousand rows or a billion. Each non-empty bin is one weighted point (x = its mean prediction,
y = its mean label), and pool-adjacent-violators (`pav`) fits the non-decreasing step function of least
weighted squared error through them. The step function becomes piecewise-linear knots (`knots_from_fit`):
two per block of pooled points (its first and last x, both at the block's value), linear between blocks,
flat beyond the first and last point, which is scikit-learn's `IsotonicRegression(out_of_bounds="clip")`
on these points. The knots are what `model.heads.Calibrator` applies, so predict, export and serving
compute exactly this map.

Shapes: T = tasks, N = bins.

Example:
    stats = BinnedStats(num_tasks=2, num_bins=1000)
    stats.update(probabilities, labels, weights)   # each [B, 2], any number of times
    total = stats.reduced()                        # sums over ranks (every rank calls it)
    x, y = fit_knots(*total.points(0))             # task 0's knots for the Calibrator
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tml.core.metrics_sync import all_reduce_sum

EPS = 1e-7  # predictions are clamped to [EPS, 1 - EPS] before binning, as the ranking metrics do
LOGIT_RANGE = math.log((1.0 - EPS) / EPS)


def pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) least-squares fit of `y` in the given order: pool adjacent
    violators. Equal neighbouring blocks are pooled too, so blocks have strictly rising values.

    Args:
        y: [N] values, w: [N] positive weights.

    Returns:
        [N] fitted values.

    Example:
        pav(np.array([1.0, 3.0, 2.0]), np.ones(3))  # [1.0, 2.5, 2.5]
    """
    values: list[float] = []
    weights: list[float] = []
    counts: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        values.append(value)
        weights.append(weight)
        counts.append(1)
        while len(values) > 1 and values[-2] >= values[-1]:
            value, weight, count = values.pop(), weights.pop(), counts.pop()
            total = weights[-1] + weight
            values[-1] = (values[-1] * weights[-1] + value * weight) / total
            weights[-1] = total
            counts[-1] += count
    return np.repeat(np.array(values, dtype=np.float64), counts)


def knots_from_fit(x: np.ndarray, fitted: np.ndarray) -> tuple[list[float], list[float]]:
    """Piecewise-linear knots (x from 0 to 1 strictly rising, y non-decreasing) of a fitted step function:
    each block's first and last x at its value, (0, first value) and (1, last value) at the ends.

    x is rounded to float32 first (the Calibrator's precision), so no two knots share an x there.

    Args:
        x: [N] strictly increasing points in [0, 1]; fitted: [N] their non-decreasing values (`pav`).
    """
    x32 = x.astype(np.float32).astype(np.float64).tolist()
    xs: list[float] = []
    ys: list[float] = []

    def add(at: float, value: float) -> None:
        if xs and at <= xs[-1]:  # the same float32 x (or a point at 0): the later, larger value wins
            ys[-1] = max(ys[-1], value)
            return
        xs.append(at)
        ys.append(min(max(value, 0.0), 1.0))

    add(0.0, float(fitted[0]))
    start = 0
    for end in range(1, len(x32) + 1):
        if end < len(x32) and fitted[end] == fitted[start]:
            continue
        add(x32[start], float(fitted[start]))
        add(x32[end - 1], float(fitted[start]))
        start = end
    if xs[-1] < 1.0:
        add(1.0, ys[-1])
    return xs, ys


def fit_knots(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[list[float], list[float]]:
    """The isotonic map of points (x rising, mean label y, weight w) as Calibrator knots."""
    return knots_from_fit(x, pav(y, w))


class BinnedStats:
    """Per task and logit bin: sum of weights, of weight * label, of weight * prediction (float64).

    Args:
        num_tasks: T.
        num_bins: N bins of equal width in logit over [-LOGIT_RANGE, LOGIT_RANGE].
        device: where the sums live (they follow the predictions' device on the first update).

    Shapes: update(probabilities [B, T], labels [B, T], weights [B, T]); `sums` [T, N, 3].
    """

    def __init__(self, num_tasks: int, num_bins: int, device: torch.device | str = "cpu") -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_tasks, self.num_bins = num_tasks, num_bins
        self.sums = torch.zeros(num_tasks, num_bins, 3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        if self.sums.device != probabilities.device:
            self.sums = self.sums.to(probabilities.device)
        p = probabilities.detach().to(torch.float64).clamp(EPS, 1.0 - EPS)
        y = labels.to(device=p.device, dtype=torch.float64)
        w = weights.to(device=p.device, dtype=torch.float64)
        logit = torch.log(p) - torch.log1p(-p)
        bins = ((logit + LOGIT_RANGE) * (self.num_bins / (2.0 * LOGIT_RANGE))).floor().long()
        bins = bins.clamp_(0, self.num_bins - 1)  # [B, T]
        flat = bins + torch.arange(self.num_tasks, device=p.device) * self.num_bins
        values = torch.stack([w, w * y, w * p], dim=-1)  # [B, T, 3]
        self.sums.view(-1, 3).index_add_(0, flat.reshape(-1), values.reshape(-1, 3))

    def reduced(self) -> BinnedStats:
        """A copy holding the sums over every rank (every rank must call, in the same order)."""
        total = BinnedStats(self.num_tasks, self.num_bins, self.sums.device)
        total.sums = all_reduce_sum(self.sums.clone())
        return total

    def reset(self) -> None:
        self.sums.zero_()

    def points(self, task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Task `task`'s non-empty bins as points: (mean prediction, mean label, weight), x rising."""
        sums = self.sums[task].cpu().numpy()
        keep = sums[:, 0] > 0
        weight, label, prediction = sums[keep, 0], sums[keep, 1], sums[keep, 2]
        return prediction / weight, label / weight, weight

    def totals(self, task: int) -> tuple[float, float, float]:
        """(weight, weighted label sum, weighted prediction sum) of task `task`."""
        weight, label, prediction = self.sums[task].sum(dim=0).tolist()
        return weight, label, prediction
