"""The per-task heads of the recap model: raw tower logits -> logits and calibrated probabilities.

Per task t: logit = raw * scale_t + bias_t (the fixed affine map, identity when unset); p = sigmoid(logit)
with its odds scaled back to the data's, p * r_t / (1 - p + r_t * p) with r_t = neg_rate / (pos_rate *
pos_weight) (negative downsampling multiplied the odds the model learned by pos_rate / neg_rate, BCE with
pos_weight w fits w times the odds); then the calibrator, a monotone piecewise-linear map of p per task.
The calibrator is the identity ((0, 0) -> (1, 1)) until knots fitted on held-out data (an isotonic
regression gives exactly such knots) are handed to `build_model`; the export format stores the knots, so
a fitted calibrator changes numbers, never the format.

Every constant here derives from the config (or a calibration file), so all are buffers kept out of the
state dict: a checkpoint never overrides them.

Shapes: B = batch, T = tasks, K = knots per task.

Example:
    heads = TaskHeads(["fav"], odds_ratios=[0.1], affine_scales=[1.0], affine_biases=[0.0])
    out = heads(torch.zeros(4, 1))  # {"logits": [4, 1], "probabilities": [4, 1]}: p = 0.5 * 0.1 / 0.55
"""

from __future__ import annotations

import torch
from torch import nn

IDENTITY_KNOTS = ((0.0, 1.0), (0.0, 1.0))


def odds_correction(p: torch.Tensor, odds_ratio: torch.Tensor) -> torch.Tensor:
    """Scale the odds of p by r: p' = p*r / (1 - p + r*p), so p' / (1 - p') = r * p / (1 - p).

    Args:
        p: [B, T] probabilities the model learned.
        odds_ratio: [T] r per task, neg_rate / (pos_rate * pos_weight) (see the module docstring).

    Example:
        odds_correction(torch.tensor([[0.5]]), torch.tensor([0.1]))  # [[0.0909]]
    """
    return p * odds_ratio / (1.0 - p + odds_ratio * p)


def check_knots(task: str, x: list[float], y: list[float]) -> None:
    """Knots of one task: x strictly increasing from 0 to 1, y non-decreasing within [0, 1]."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"calibration of task {task!r}: need >= 2 (x, y) knots of equal count, got {len(x)}, {len(y)}"
        )
    if x[0] != 0.0 or x[-1] != 1.0 or any(b <= a for a, b in zip(x, x[1:], strict=False)):
        raise ValueError(f"calibration of task {task!r}: x must rise strictly from 0 to 1, got {x}")
    if any(b < a for a, b in zip(y, y[1:], strict=False)) or y[0] < 0.0 or y[-1] > 1.0:
        raise ValueError(f"calibration of task {task!r}: y must be non-decreasing within [0, 1], got {y}")


class Calibrator(nn.Module):
    """Monotone piecewise-linear map per task: p in [x_k, x_{k+1}] -> y_k + (p - x_k) * slope_k.

    Tasks with fewer knots are padded by repeating their last knot (zero-width segments, slope 0). With the
    identity knots the result is p exactly (0 + (p - 0) * 1). Costs B * T * K comparisons: meant for up to
    a few hundred knots per task.

    Args:
        knots: per task, (x, y) lists (see `check_knots`).

    Shapes: [B, T] -> [B, T].

    Example:
        Calibrator([((0.0, 0.5, 1.0), (0.0, 0.2, 1.0))])(torch.tensor([[0.25]]))  # [[0.1]]
    """

    def __init__(self, knots: list[tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
        super().__init__()
        size = max(len(x) for x, _ in knots)
        xs = [list(x) + [x[-1]] * (size - len(x)) for x, _ in knots]
        ys = [list(y) + [y[-1]] * (size - len(y)) for _, y in knots]
        x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)
        dx, dy = x[:, 1:] - x[:, :-1], y[:, 1:] - y[:, :-1]
        slope = torch.where(dx > 0, dy / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.zeros_like(dx))
        self.register_buffer("knots_x", x, persistent=False)
        self.register_buffer("knots_y", y, persistent=False)
        self.register_buffer("slopes", slope, persistent=False)
        # Row starts of each task in the flattened [T, K] / [T, K - 1] tables, for `torch.take`.
        self.register_buffer("knot_rows", torch.arange(len(knots)) * size, persistent=False)
        self.register_buffer("slope_rows", torch.arange(len(knots)) * (size - 1), persistent=False)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        # The segment of p: how many interior knots lie at or below it (a comparison, not searchsorted,
        # which would need p transposed to [T, B]: an exported program would then specialise on B).
        interior = self.knots_x[:, 1:-1]
        segment = (p.unsqueeze(2) >= interior.unsqueeze(0)).sum(dim=2)  # [B, T] in [0, K - 2]
        x0 = torch.take(self.knots_x, segment + self.knot_rows)
        y0 = torch.take(self.knots_y, segment + self.knot_rows)
        slope = torch.take(self.slopes, segment + self.slope_rows)
        return y0 + (p - x0) * slope


class TaskHeads(nn.Module):
    """Affine map, sigmoid, odds correction and calibrator of every task (module docstring).

    Args:
        task_names: the T tasks, in output order.
        odds_ratios: [T] r of `odds_correction`.
        affine_scales, affine_biases: [T] the fixed affine map of each raw logit.
        calibration: per task (x, y) knots of its calibrator; None: the identity for every task.

    Shapes: raw [B, T] -> {"logits": [B, T], "probabilities": [B, T]}.
    """

    def __init__(
        self,
        task_names: list[str],
        odds_ratios: list[float],
        affine_scales: list[float],
        affine_biases: list[float],
        calibration: dict[str, tuple[list[float], list[float]]] | None = None,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        for name, values in [
            ("odds_ratios", odds_ratios),
            ("affine_scales", affine_scales),
            ("affine_biases", affine_biases),
        ]:
            assert len(values) == len(self.task_names), name
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        calibration = calibration or {}
        unknown = sorted(set(calibration) - set(self.task_names))
        if unknown:
            raise ValueError(f"calibration for unknown tasks {unknown}; the tasks are {self.task_names}")
        self.knots = {t: tuple(map(tuple, calibration.get(t, IDENTITY_KNOTS))) for t in self.task_names}
        for task, (x, y) in self.knots.items():
            check_knots(task, list(x), list(y))
        self.calibrator = Calibrator([self.knots[t] for t in self.task_names])

    def describe(self) -> dict:
        """Plain data of every constant, per task (what the export writes next to the program)."""
        return {
            task: {
                "odds_ratio": float(self.odds_ratios[i]),
                "affine_scale": float(self.affine_scales[i]),
                "affine_bias": float(self.affine_biases[i]),
                "calibration": {"x": list(self.knots[task][0]), "y": list(self.knots[task][1])},
            }
            for i, task in enumerate(self.task_names)
        }

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = raw * self.affine_scales + self.affine_biases
        probabilities = odds_correction(torch.sigmoid(logits), self.odds_ratios)
        return {"logits": logits, "probabilities": self.calibrator(probabilities)}
