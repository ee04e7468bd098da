"""Ranking metrics for the evaluation loop: per task and per segment, from summable histograms.

Shapes: B = batch, T = tasks, S = segments (1 + the project's segments; segment 0 is all rows),
N = `num_bins`.

The loop calls `metrics.update(batch, outputs)` per batch (under no_grad) with `outputs["probabilities"]`,
`outputs["labels"]` and `outputs["weights"]`, each [B, T]; `metrics.compute()` returns
`{"<task>/<metric>": float, "<segment>/<task>/<metric>": float}` already reduced over all ranks;
`reset()` starts over. docs/metrics.md defines every metric. Segments come from the project: it names them
and gives a function `segment_masks(batch) -> [B, S - 1] bool` (core knows nothing about a batch's fields).

All state is one float64 tensor of sums (a weighted histogram per segment and task plus a few totals), so
one SUM all_reduce merges ranks and memory is O(S x T x N), independent of the number of examples.

Binning: a probability p is clipped to [eps, 1 - eps] (eps = 1e-7, the clipping log loss uses too) and its
logit is cut into N equal-width bins over [logit(eps), logit(1 - eps)]. Bins on the logit scale keep rare
tasks (probabilities ~1e-5) apart, where equal-width probability bins would put them all in bin 0. The map is
monotone, so AUROC and PR-AUC are exact up to ties inside a bin (counted half / as one threshold).

NRCE is RCE after recalibrating every prediction, and the recalibrated log loss does not split into sums,
so it comes from the histogram, whose third channel holds each bin's logit mass (l_b: the bin's weighted
mean logit, q_b = sigmoid(l_b)). The recalibrated log loss is the exact log loss plus the histogram's
estimate of the change, CE' = CE + H(f) - H(identity), H(f) = sum_bins [pos_b CE(f(q_b), 1) +
neg_b CE(f(q_b), 0)] / W: exact when f is the identity, otherwise off by second order in the bin width
(32.2 / N on the logit scale).
- `nrce` (the original's definition): f(p) = clip(p * k), k = mean label / mean prediction.
- `nrce_logit_shift`: f(p) = sigmoid(logit(p) + b), b the one constant for which the weighted mean of f(p)
  equals the weighted mean label (found by bisection over the histogram); it never leaves (0, 1).

Example:
    metrics = RankingMetrics(["fav", "reply"], ["country=7"], lambda batch: batch.country[:, None] == 7)
    with torch.no_grad():
        for batch in loader:
            loss, outputs = model(batch)
            metrics.update(batch, outputs)
    results = metrics.compute()  # {"fav/auroc": 0.71, ..., "country=7/reply/rce": 3.2, ...}
    metrics.reset()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tml.core.metrics_exact import auroc_exact, pr_auc_exact
from tml.core.metrics_rank import RankMetrics, hits_at_k, mrr
from tml.core.metrics_sync import all_reduce_sum

__all__ = [
    "EPS",
    "RankMetrics",
    "RankingMetrics",
    "auroc_exact",
    "auroc_from_histograms",
    "hits_at_k",
    "mrr",
    "pr_auc_exact",
    "pr_auc_from_histograms",
]

EPS = 1e-7
# Totals kept per (segment, task): rows, sum w, sum w y, sum w p, sum w * logloss(p, y).
_COUNT, _WEIGHT, _LABEL, _PRED, _CE = range(5)
_NUM_SUMS = 5
# Histogram channels per bin: positive weight (w y), negative weight (w (1-y)), logit mass (w logit(p)).
_NUM_CHANNELS = 3
METRIC_NAMES = (
    "auroc",
    "pr_auc",
    "log_loss",
    "rce",
    "nrce",
    "nrce_logit_shift",
    "calibration",
    "mean_label",
    "mean_prediction",
    "count",
    "weight_sum",
)


def auroc_from_histograms(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Weighted Mann-Whitney AUROC from per-bin weights, bins in ascending score order, ties counted half.

    Args:
        pos: [..., N] positive weight per bin; neg: [..., N] negative weight per bin.

    Returns:
        [...] AUROC, NaN where the positive or the negative total is zero.
    """
    neg_below = torch.cumsum(neg, dim=-1) - neg
    total_pos, total_neg = pos.sum(-1), neg.sum(-1)
    area = (pos * (neg_below + 0.5 * neg)).sum(-1) / (total_pos * total_neg)
    return torch.where((total_pos > 0) & (total_neg > 0), area, torch.full_like(area, math.nan))


def pr_auc_from_histograms(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Weighted average precision from per-bin weights (bins ascending; each bin is one threshold).

    Args:
        pos: [..., N] positive weight per bin; neg: [..., N] negative weight per bin.

    Returns:
        [...] PR-AUC, NaN where the positive or the negative total is zero.
    """
    tp = torch.flip(torch.cumsum(torch.flip(pos, [-1]), -1), [-1])  # positive weight at or above each bin
    fp = torch.flip(torch.cumsum(torch.flip(neg, [-1]), -1), [-1])
    predicted = tp + fp
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1e-300), torch.zeros_like(tp))
    total_pos, total_neg = pos.sum(-1), neg.sum(-1)
    area = (pos * precision).sum(-1) / total_pos
    return torch.where((total_pos > 0) & (total_neg > 0), area, torch.full_like(area, math.nan))


def _log_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = p.clamp(EPS, 1.0 - EPS)
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))


class RankingMetrics:
    """AUROC, PR-AUC, log loss, RCE, NRCE, calibration and means per task and per segment.

    Args:
        task_names: the T task names, in the column order of outputs["labels"].
        segment_names: names of the project's segments (used as metric-key prefixes: no '/'), in the
            column order of `segment_masks`' result; empty for no segments.
        segment_masks: batch -> [B, len(segment_names)] bool, True where a row belongs to the segment
            (the project computes them from its own batch); required exactly when there are segment names.
        num_bins: histogram bins per task and segment (logit scale, see the module docstring).
        device: where the state starts; it follows the outputs' device on the first update.

    Example:
        metrics = RankingMetrics(["fav"], ["country=7"], lambda b: b.country[:, None] == 7, num_bins=10000)
        metrics.update(batch, {"probabilities": p, "labels": y, "weights": w})  # each [B, 1]
        metrics.compute()["country=7/fav/auroc"]
    """

    def __init__(
        self,
        task_names: Sequence[str],
        segment_names: Sequence[str] = (),
        segment_masks: Callable[[Any], torch.Tensor] | None = None,
        num_bins: int = 10000,
        device: torch.device | str = "cpu",
    ) -> None:
        self.task_names = list(task_names)
        if not self.task_names:
            raise ValueError("RankingMetrics: task_names is empty; give at least one task")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"RankingMetrics: task_names has duplicates: {self.task_names}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"RankingMetrics: num_bins must be an int >= 2, got {num_bins!r}")
        self.num_bins = num_bins
        self.segment_names = _check_segment_names(segment_names)
        if bool(self.segment_names) != (segment_masks is not None):
            raise ValueError(
                "RankingMetrics: give segment_masks exactly when there are segment_names, got "
                f"{len(self.segment_names)} names and segment_masks={segment_masks!r}"
            )
        self.segment_masks = segment_masks
        self._prefixes = ["", *(f"{name}/" for name in self.segment_names)]
        s, t = len(self._prefixes), len(self.task_names)
        self._hist_numel = s * t * num_bins * _NUM_CHANNELS
        self._state = torch.zeros(self._hist_numel + s * t * _NUM_SUMS, dtype=torch.float64, device=device)
        self._max_logit = math.log((1.0 - EPS) / EPS)

    def _views(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = len(self._prefixes), len(self.task_names)
        hist = state[: self._hist_numel].view(s, t, self.num_bins, _NUM_CHANNELS)
        sums = state[self._hist_numel :].view(s, t, _NUM_SUMS)
        return hist, sums

    def _segment_mask(self, batch: Any, num_rows: int, device: torch.device) -> torch.Tensor:
        """[S, B] float64: 1 where a row belongs to the segment (segment 0: every row)."""
        every_row = torch.ones(1, num_rows, dtype=torch.float64, device=device)
        if self.segment_masks is None:
            return every_row
        masks = self.segment_masks(batch)
        expected = (num_rows, len(self.segment_names))
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != expected:
            got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks)
            raise ValueError(
                f"RankingMetrics: segment_masks(batch) must return a bool tensor [B, S] = {list(expected)} "
                f"for segments {self.segment_names}, got {got}"
            )
        return torch.cat([every_row, masks.to(device=device, dtype=torch.float64).T])

    @torch.no_grad()
    def update(self, batch: Any, outputs: dict[str, torch.Tensor]) -> None:
        """Add one batch. `outputs` needs `probabilities`, `labels`, `weights`, each [B, T].

        `batch` is only handed to `segment_masks` (and may be anything when there are no segments).
        """
        probs, labels, weights = _check_outputs(outputs, len(self.task_names))
        device = probs.device
        if self._state.device != device:
            self._state = self._state.to(device)
        hist, sums = self._views(self._state)
        num_rows, num_tasks = probs.shape
        mask = self._segment_mask(batch, num_rows, device)  # [S, B]

        p = probs.to(torch.float64).clamp(EPS, 1.0 - EPS)
        y = labels.to(device=device, dtype=torch.float64)
        w = weights.to(device=device, dtype=torch.float64)
        per_row = torch.stack([torch.ones_like(p), w, w * y, w * p, w * _log_loss(p, y)], dim=-1)
        sums += torch.einsum("sb,btk->stk", mask, per_row)

        # NaN predictions land in bin 0 here; compute() reports NaN for their task (the sum w p is NaN).
        logit = torch.nan_to_num(torch.log(p) - torch.log1p(-p), nan=-self._max_logit)
        scaled = (logit + self._max_logit) * (self.num_bins / (2.0 * self._max_logit))
        bins = scaled.floor().long().clamp_(0, self.num_bins - 1)  # [B, T]
        channels = torch.stack([w * y, w * (1.0 - y), w * logit], dim=-1)  # [B, T, 3]
        segments = torch.arange(mask.shape[0], device=device).view(-1, 1, 1)
        tasks = torch.arange(num_tasks, device=device).view(1, 1, -1)
        flat = (segments * num_tasks + tasks) * self.num_bins + bins.unsqueeze(0)  # [S, B, T]
        values = mask.view(mask.shape[0], num_rows, 1, 1) * channels.unsqueeze(0)  # [S, B, T, 3]
        hist.view(-1, _NUM_CHANNELS).index_add_(0, flat.reshape(-1), values.reshape(-1, _NUM_CHANNELS))

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """Metrics over everything added since the last reset, summed over all ranks (every rank must call)."""
        hist, sums = self._views(all_reduce_sum(self._state.clone()).cpu())
        pos, neg, logit_mass = hist.unbind(-1)
        count, weight, label_sum, pred_sum, ce_sum = sums.unbind(-1)
        nan = torch.full_like(weight, math.nan)

        has_weight = weight > 0
        mean_label = torch.where(has_weight, label_sum / weight, nan)
        mean_pred = torch.where(has_weight, pred_sum / weight, nan)
        log_loss = torch.where(has_weight, ce_sum / weight, nan)
        # The baseline (constant prediction at the mean label) is degenerate when every label is 0 or 1.
        informative = (mean_label > 0) & (mean_label < 1)
        baseline = torch.where(informative, _log_loss(mean_label, mean_label), nan)
        rce = 100.0 * (1.0 - log_loss / baseline)
        calibration = torch.where(mean_label > 0, mean_pred / mean_label, nan)

        bin_weight = pos + neg
        bin_logit = torch.where(
            bin_weight > 0, logit_mass / bin_weight.clamp_min(1e-300), torch.zeros_like(pos)
        )
        bin_prob = torch.sigmoid(bin_logit)

        def recalibrated_rce(f_prob: torch.Tensor) -> torch.Tensor:
            # CE' = CE + H(f) - H(identity), the histogram's estimate of the change (module docstring).
            change = (_binned_log_loss(pos, neg, f_prob) - _binned_log_loss(pos, neg, bin_prob)) / weight
            return torch.where(informative, 100.0 * (1.0 - (log_loss + change) / baseline), nan)

        # The original's NRCE: every prediction times mean label / mean prediction, clipped.
        scale = torch.where(pred_sum > 0, label_sum / pred_sum.clamp_min(1e-300), nan)
        nrce = recalibrated_rce(bin_prob * scale.unsqueeze(-1))
        shift = _solve_shift(bin_weight, bin_logit, label_sum)
        nrce_logit_shift = recalibrated_rce(torch.sigmoid(bin_logit + shift.unsqueeze(-1)))

        # A NaN prediction poisons the sums but sits in bin 0 of the histograms: don't report its AUCs.
        finite = torch.isfinite(pred_sum)
        auroc = torch.where(finite, auroc_from_histograms(pos, neg), nan)
        pr_auc = torch.where(finite, pr_auc_from_histograms(pos, neg), nan)

        table = dict(
            auroc=auroc,
            pr_auc=pr_auc,
            log_loss=log_loss,
            rce=rce,
            nrce=nrce,
            nrce_logit_shift=nrce_logit_shift,
            calibration=calibration,
            mean_label=mean_label,
            mean_prediction=mean_pred,
            count=count,
            weight_sum=weight,
        )
        columns = {name: table[name].tolist() for name in METRIC_NAMES}
        results: dict[str, float] = {}
        for s, prefix in enumerate(self._prefixes):
            for t, task in enumerate(self.task_names):
                for name in METRIC_NAMES:
                    results[f"{prefix}{task}/{name}"] = float(columns[name][s][t])
        return results

    def reset(self) -> None:
        """Forget everything added so far (the state stays on its device)."""
        self._state.zero_()


def _binned_log_loss(pos: torch.Tensor, neg: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """[...] sum over bins of pos_b CE(prob_b, 1) + neg_b CE(prob_b, 0), prob clipped like log loss.

    Args:
        pos, neg: [..., N] positive / negative weight per bin; prob: [..., N] the prediction of each bin.
    """
    prob = prob.clamp(EPS, 1.0 - EPS)
    return (pos * -torch.log(prob) + neg * -torch.log1p(-prob)).sum(-1)


def _solve_shift(bin_weight: torch.Tensor, bin_logit: torch.Tensor, label_sum: torch.Tensor) -> torch.Tensor:
    """[...] logit shift b with sum_bins bin_weight * sigmoid(bin_logit + b) == label_sum, by bisection.

    The left side rises monotonically in b, so bisection cannot miss; 64 halvings of [-2L, 2L] (L the largest
    logit) reach float64 resolution. Where every label is 0 or 1 no finite b exists; NRCE is NaN there anyway.
    """
    bound = 4.0 * math.log((1.0 - EPS) / EPS)
    low = torch.full_like(label_sum, -bound)
    high = torch.full_like(label_sum, bound)
    for _ in range(64):
        mid = 0.5 * (low + high)
        too_high = (bin_weight * torch.sigmoid(bin_logit + mid.unsqueeze(-1))).sum(-1) > label_sum
        high = torch.where(too_high, mid, high)
        low = torch.where(too_high, low, mid)
    return 0.5 * (low + high)


def _check_segment_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"RankingMetrics: a segment name must be a non-empty string without '/', got {name!r}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"RankingMetrics: segment_names has duplicates: {names}")
    return names


def _check_outputs(outputs: dict[str, torch.Tensor], num_tasks: int) -> tuple[torch.Tensor, ...]:
    tensors = []
    for key in ("probabilities", "labels", "weights"):
        if key not in outputs:
            raise ValueError(f"RankingMetrics.update: outputs has no {key!r} (keys: {sorted(outputs)})")
        tensor = outputs[key].detach()
        if tensor.dim() != 2 or tensor.shape[1] != num_tasks:
            raise ValueError(
                f"RankingMetrics.update: outputs[{key!r}] must be [B, T={num_tasks}], got {tuple(tensor.shape)}"
            )
        tensors.append(tensor)
    if not tensors[0].shape == tensors[1].shape == tensors[2].shape:
        raise ValueError(
            "RankingMetrics.update: probabilities, labels and weights differ in shape: "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    return tuple(tensors)
