"""Learning-rate schedules: one formula per `LearningRate` shape, evaluated at an optimizer step.

Example:
    lr = LearningRate(linear_ramp_to_constant={"learning_rate": 0.1, "num_ramp_steps": 10})
    learning_rate_at(lr, 5)  # 0.05
"""

from __future__ import annotations

import bisect
import math

from tml.core.config.base import which_one
from tml.optimizers.config import LearningRate


def learning_rate_at(lr: LearningRate, step: int) -> float:
    """The learning rate of schedule `lr` at optimizer step `step` (0-based)."""
    kind, value = which_one(lr, LearningRate.exactly_one_of[0])
    if kind == "constant":
        return float(value)
    if kind == "piecewise_constant":
        # bisect_right: a step equal to a boundary already uses the next value.
        index = bisect.bisect_right(value.learning_rate_boundaries, step)
        return float(value.learning_rate_values[index])
    if kind == "linear_ramp_to_constant":
        return value.learning_rate * min(1.0, step / value.num_ramp_steps)
    if kind == "linear_ramp_to_cosine":
        if step < value.num_ramp_steps:
            return value.learning_rate * step / value.num_ramp_steps
        progress = min(1.0, (step - value.num_ramp_steps) / (value.final_num_steps - value.num_ramp_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return value.final_learning_rate + (value.learning_rate - value.final_learning_rate) * cosine
    raise AssertionError(f"unhandled schedule {kind}")
