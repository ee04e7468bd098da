"""The `plan` section: the phases `tml-recap plan` runs, in order (docs/platform.md)."""

from __future__ import annotations

import pydantic

from tml.core.config.base import BaseConfig


class PlanConfig(BaseConfig):
    phases: list[str] | None = pydantic.Field(
        None,
        description="Phases of `tml-recap plan`, in the order they run (a subsequence of the registered "
        "order: train, calibrate, evaluate, with discretizer calibration first where the config has a "
        "discretizer); None: every phase that applies to this config. A finished phase whose inputs are "
        "unchanged is skipped.",
    )

    @pydantic.field_validator("phases")
    @classmethod
    def _distinct(cls, phases: list[str] | None) -> list[str] | None:
        if phases is not None and (not phases or len(set(phases)) != len(phases)):
            raise ValueError(f"expected a non-empty list of distinct phase names, got {phases}")
        return phases
