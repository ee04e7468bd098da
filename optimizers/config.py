"""Optimizer and learning-rate configs (the original's YAML keys).

A dense `OptimizerConfig` holds exactly one algorithm (`adam`, `sgd`, `adagrad`), a `LearningRate` schedule
and optional global-norm gradient clipping. An `EmbeddingOptimizerConfig` holds exactly one table algorithm
(`sgd`, `adagrad`, `rowwise_adagrad`, `adam`), each with its own constant `learning_rate`; it runs fused in
the backward pass where the device supports it (see docs/training.md).

Example:
    optimizer:
      adam: {beta_1: 0.95, beta_2: 0.999, epsilon: 1.0e-7}
      learning_rate:
        linear_ramp_to_constant: {learning_rate: 0.001, num_ramp_steps: 1000}
      clip_grad_norm: 1.0
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import pydantic

from tml.core.config.base import BaseConfig

_F = pydantic.Field


# A learning rate below 0 would climb the loss instead of descending it; 0 (a frozen group, the end of a
# cosine decay) is allowed.
Rate = Annotated[float, pydantic.Field(ge=0.0)]


class PiecewiseConstant(BaseConfig):
    """`learning_rate_values[i]` while `step < learning_rate_boundaries[i]`, the last value after."""

    learning_rate_boundaries: list[int] = _F(description="Strictly increasing step boundaries.")
    learning_rate_values: list[Rate] = _F(description="One more value than boundaries, each >= 0.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> PiecewiseConstant:
        bounds, values = self.learning_rate_boundaries, self.learning_rate_values
        if len(values) != len(bounds) + 1:
            raise ValueError(
                f"learning_rate_values needs len(learning_rate_boundaries) + 1 = {len(bounds) + 1} "
                f"entries, got {len(values)}"
            )
        if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"learning_rate_boundaries must be strictly increasing, got {bounds}")
        return self


class LinearRampToConstant(BaseConfig):
    """0 at step 0, rising linearly to `learning_rate` at `num_ramp_steps`, constant after."""

    learning_rate: float = _F(ge=0.0, description="Learning rate reached at the end of the ramp.")
    num_ramp_steps: int = _F(ge=1, description="Steps of the linear ramp.")


class LinearRampToCosine(BaseConfig):
    """Linear ramp from 0 to `learning_rate`, then a cosine decay to `final_learning_rate`."""

    learning_rate: float = _F(ge=0.0, description="Peak learning rate reached at the end of the ramp.")
    final_learning_rate: float = _F(ge=0.0, description="Learning rate at `final_num_steps` and after.")
    num_ramp_steps: int = _F(ge=1, description="Steps of the linear ramp.")
    final_num_steps: int = _F(description="Step at which the cosine decay ends (> num_ramp_steps).")

    @pydantic.model_validator(mode="after")
    def _check(self) -> LinearRampToCosine:
        if self.final_num_steps <= self.num_ramp_steps:
            raise ValueError(
                f"final_num_steps ({self.final_num_steps}) must exceed num_ramp_steps ({self.num_ramp_steps})"
            )
        return self


class LearningRate(BaseConfig):
    """A learning-rate schedule over optimizer steps: exactly one of the four shapes."""

    exactly_one_of: ClassVar = (
        ("constant", "piecewise_constant", "linear_ramp_to_constant", "linear_ramp_to_cosine"),
    )
    constant: float | None = _F(None, ge=0.0, description="A fixed learning rate.")
    piecewise_constant: PiecewiseConstant | None = _F(None, description="Step-wise constant values.")
    linear_ramp_to_constant: LinearRampToConstant | None = _F(None, description="Warm-up then constant.")
    linear_ramp_to_cosine: LinearRampToCosine | None = _F(None, description="Warm-up then cosine decay.")


class AdamConfig(BaseConfig):
    beta_1: float = _F(0.9, ge=0.0, lt=1.0, description="Decay of the first moment.")
    beta_2: float = _F(0.999, ge=0.0, lt=1.0, description="Decay of the second moment.")
    epsilon: float = _F(1e-7, gt=0.0, description="Added to the denominator for stability.")
    weight_decay: float = _F(0.0, ge=0.0, description="Decoupled weight decay (AdamW) when > 0.")


class SgdConfig(BaseConfig):
    momentum: float = _F(0.0, ge=0.0, description="Momentum factor (0: plain SGD).")
    weight_decay: float = _F(0.0, ge=0.0, description="L2 penalty added to the gradient.")


class AdagradConfig(BaseConfig):
    epsilon: float = _F(1e-10, gt=0.0, description="Added to the denominator for stability.")
    initial_accumulator_value: float = _F(0.0, ge=0.0, description="Starting sum of squared gradients.")
    weight_decay: float = _F(0.0, ge=0.0, description="L2 penalty added to the gradient.")


class OptimizerConfig(BaseConfig):
    """The optimizer of the dense (non-table) parameters."""

    exactly_one_of: ClassVar = (("adam", "sgd", "adagrad"),)
    adam: AdamConfig | None = _F(None, description="Adam (AdamW when weight_decay > 0).")
    sgd: SgdConfig | None = _F(None, description="Stochastic gradient descent.")
    adagrad: AdagradConfig | None = _F(None, description="Adagrad.")
    learning_rate: LearningRate = _F(description="Schedule of the default parameter group.")
    clip_grad_norm: float | None = _F(
        None,
        gt=0.0,
        description="Clip the gradients of this optimizer's parameters to this global L2 norm before each "
        "of its steps (build_optimizer installs it on the optimizer).",
    )


class EmbeddingSgd(BaseConfig):
    learning_rate: float = _F(gt=0.0, description="Constant learning rate of the table.")


class EmbeddingAdagrad(BaseConfig):
    learning_rate: float = _F(gt=0.0, description="Constant learning rate of the table.")
    epsilon: float = _F(1e-10, gt=0.0, description="Added to the denominator for stability.")


class EmbeddingAdam(BaseConfig):
    """Adam for a table; betas are fixed at (0.9, 0.999), the values the fused kernel uses."""

    learning_rate: float = _F(gt=0.0, description="Constant learning rate of the table.")
    epsilon: float = _F(1e-8, gt=0.0, description="Added to the denominator for stability.")


class EmbeddingOptimizerConfig(BaseConfig):
    """The optimizer of one embedding table (or all tables of a collection)."""

    exactly_one_of: ClassVar = (("sgd", "adagrad", "rowwise_adagrad", "adam"),)
    sgd: EmbeddingSgd | None = _F(None, description="Exact SGD (fused on CPU and GPU).")
    adagrad: EmbeddingAdagrad | None = _F(None, description="Exact Adagrad (fused on CPU and GPU).")
    rowwise_adagrad: EmbeddingAdagrad | None = _F(
        None, description="Row-wise Adagrad: one accumulator per row (fused on CPU and GPU)."
    )
    adam: EmbeddingAdam | None = _F(
        None, description="Adam (fused on GPU; on CPU an ordinary optimizer over a data-parallel table)."
    )
