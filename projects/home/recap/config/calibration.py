"""The `calibration` section: isotonic calibration of each task's probability (docs/platform.md)."""

from __future__ import annotations

import pydantic

from tml.core.config.base import BaseConfig


class CalibrationConfig(BaseConfig):
    """`tml-recap calibrate` fits, per task, an isotonic map of the model's probabilities on a held-out
    partition and writes it beside the checkpoint (`<run>/calibration/step-N.json`); evaluate, predict and
    export then apply it."""

    partition: str | None = pydantic.Field(
        None,
        description="The validation_data partition `calibrate` fits on (its example weights, which undo "
        "downsampling, weigh the fit); None: the first partition. `tml-recap calibrate --partition NAME` "
        "overrides it.",
    )
    num_bins: int = pydantic.Field(
        1000,
        ge=2,
        le=100000,
        description="Resolution of the fit: predictions are pooled in this many equal-width logit bins over "
        "[-16.1, 16.1] (each bin one weighted point of the isotonic regression), which bounds the knots "
        "at two per bin holding data.",
    )
    apply: bool = pydantic.Field(
        True,
        description="evaluate, predict and export apply the calibration file of the checkpoint they load "
        "(<run>/calibration/step-N.json) when it exists; false: they use the probabilities as trained.",
    )
