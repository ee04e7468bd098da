"""Exact (unbinned) weighted AUROC and PR-AUC in numpy: references for the binned metrics.

These sort every prediction, so memory and time grow with the number of examples; the evaluation loop
uses the histogram versions in `tml.core.metrics` instead, and tests check that the two agree.

Inputs are 1-D, N = number of examples: predictions [N] (any real scores; only their order matters),
labels [N] in [0, 1] (a soft label y counts as weight w*y positive and w*(1-y) negative), weights [N] >= 0.
Both functions return NaN when the positive or the negative weight is zero (the metric is undefined).

Example:
    auroc_exact([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], [1, 1, 1, 1])  # 0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_arrays(pred: Any, label: Any, weight: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def to_numpy(x: Any) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        return np.asarray(x, dtype=np.float64).reshape(-1)

    p, y = to_numpy(pred), to_numpy(label)
    w = np.ones_like(p) if weight is None else to_numpy(weight)
    if not (p.shape == y.shape == w.shape):
        raise ValueError(
            f"pred, label and weight must have the same length, got {p.shape[0]}, {y.shape[0]}, {w.shape[0]}"
        )
    return p, y, w


def auroc_exact(pred: Any, label: Any, weight: Any | None = None) -> float:
    """Weighted Mann-Whitney AUROC: P(score of a positive > score of a negative), ties counted half.

    AUROC = sum_{i, j} w_i y_i * w_j (1 - y_j) * ([p_i > p_j] + 0.5 [p_i == p_j]) / (P * N)
    with P = sum w y and N = sum w (1 - y).

    Args:
        pred: [N] scores; label: [N] in [0, 1]; weight: [N] >= 0 (None: all ones).
    """
    p, y, w = _as_arrays(pred, label, weight)
    values, group = np.unique(p, return_inverse=True)
    pos = np.bincount(group, weights=w * y, minlength=values.size)
    neg = np.bincount(group, weights=w * (1.0 - y), minlength=values.size)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negative weight strictly below each distinct score
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (total_pos * total_neg))


def pr_auc_exact(pred: Any, label: Any, weight: Any | None = None) -> float:
    """Weighted average precision: the area under the precision-recall step curve.

    Thresholds are the distinct scores, from high to low; at threshold t, TP(t) = sum w y [p >= t],
    FP(t) = sum w (1-y) [p >= t], recall R(t) = TP(t) / P, precision Pr(t) = TP(t) / (TP(t) + FP(t));
    PR-AUC = sum_t (R(t) - R(t_prev)) * Pr(t). Tied scores enter together (one threshold).

    Args:
        pred: [N] scores; label: [N] in [0, 1]; weight: [N] >= 0 (None: all ones).
    """
    p, y, w = _as_arrays(pred, label, weight)
    order = np.argsort(-p, kind="stable")
    p, pos, neg = p[order], (w * y)[order], (w * (1.0 - y))[order]
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    # The last index of each run of equal scores closes one threshold.
    last = np.r_[p[1:] != p[:-1], True]
    tp, fp = tp[last], fp[last]
    recall_step = np.diff(np.r_[0.0, tp]) / total_pos
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return float(np.sum(recall_step * precision))
