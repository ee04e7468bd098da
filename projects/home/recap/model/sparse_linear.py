"""The sparse linear layer (TWML's), and the `sparse_linear` segment that holds it with the discretizer.

`SparseLinear` maps a row's (id, value) pairs to `sum_i W[id_i] * x_i + b[id_i]` ([B, D]):
- **online normalisation**: `x_i = value_i / max_abs[id_i]`, where `max_abs` is a running max |value| per
  id: a buffer raised by every training batch before it is used (so |x| <= 1 and the gradient of a
  weight row never exceeds its upstream gradient, whatever the value's scale), frozen in eval mode (values
  beyond the training maximum clamp to +-1), saved in checkpoints. A non-finite value counts as 0.
- **presence bias** `b[id]`: added whenever the id is in the row, whatever its value, so "present with
  value 0" (b) differs from "absent" (nothing).
For binary inputs (the discretizer's bin ids, value 1) the layer is a sum-pooled embedding bag: one
weight row per id, no normalisation, no separate bias.

`SparseFeatures` is the model's `sparse_linear` segment: the bin ids of the discretizer (when
`model.sparse_linear.features` names it) and each named sparse continuous feature, each through its own
SparseLinear, summed. In a multi-rank run each rank raises its own copy of `max_abs` from its batches
(like BatchNorm's running statistics); the checkpoint keeps one copy.

Shapes: B = batch, N = ids in the batch, D = output_size.

Example:
    layer = SparseLinear(num_ids=1000, output_size=8, continuous=True)
    out = layer(ids, offsets, values)          # ids [N] int64, offsets [B + 1] int64, values [N] float -> [B, 8]
"""

from __future__ import annotations

import torch
from torch import nn

from tml.core.config.loader import ConfigError
from tml.projects.home.recap.config.discretizer import DISCRETIZER, DiscretizerConfig, SparseLinearConfig
from tml.projects.home.recap.model.discretizer import (
    KEY,
    Discretizer,
    build_discretizer,
    check_calibration,
    discretized_inputs,
    read_boundaries,
)
from tml.reader.batch import SparseValues
from tml.reader.config import DataSource

INIT_STD = 0.05


class SparseLinear(nn.Module):
    """sum_i W[id_i] * value_i / max_abs[id_i] + b[id_i] over a row's ids (module docstring).

    Args:
        num_ids: ids lie in [0, num_ids).
        output_size: D.
        continuous: values given (normalised online, with a presence bias); False: binary ids (value 1).

    Shapes: (ids [N] int64, offsets [B + 1] int64, values [N] float or None) -> [B, D]; or ids [B, W] (W
    binary ids in every row, offsets None) -> [B, D].
    """

    def __init__(self, num_ids: int, output_size: int, continuous: bool) -> None:
        super().__init__()
        self.num_ids, self.output_size, self.continuous = num_ids, output_size, continuous
        self.weight = nn.Parameter(torch.randn(num_ids, output_size) * INIT_STD)
        if continuous:
            self.bias = nn.Parameter(torch.zeros(num_ids, output_size))
            self.register_buffer("max_abs", torch.zeros(num_ids))

    def forward(
        self, ids: torch.Tensor, offsets: torch.Tensor | None, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.continuous:
            if offsets is None:
                return nn.functional.embedding(ids, self.weight).sum(dim=1)
            return nn.functional.embedding_bag(
                ids, self.weight, offsets, mode="sum", include_last_offset=True
            )
        values = values.float()
        values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
        if self.training:
            with torch.no_grad():
                self.max_abs.scatter_reduce_(0, ids, values.abs(), reduce="amax")
        scale = self.max_abs[ids].clamp(min=torch.finfo(torch.float32).tiny)
        x = (values / scale).clamp(-1.0, 1.0)
        weighted = nn.functional.embedding_bag(
            ids, self.weight, offsets, mode="sum", per_sample_weights=x, include_last_offset=True
        )
        present = nn.functional.embedding_bag(ids, self.bias, offsets, mode="sum", include_last_offset=True)
        return weighted + present


class SparseFeatures(nn.Module):
    """The `sparse_linear` segment (module docstring); build it with `build_sparse_features`.

    Args:
        output_size: D.
        discretizer: bin ids of continuous inputs (their layer: 2**out_bits rows), or None.
        out_bits: the discretizer's id bits.
        continuous: sparse continuous feature -> its num_buckets, each read raw by its own SparseLinear.

    Shapes: (dense {name: [B, W]}, sparse_continuous {name: SparseValues}) -> [B, D].
    """

    def __init__(
        self,
        output_size: int,
        discretizer: Discretizer | None,
        out_bits: int | None,
        continuous: dict[str, int],
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.discretizer = discretizer
        self.bins = SparseLinear(1 << out_bits, output_size, continuous=False) if discretizer else None
        self.linear = nn.ModuleDict(
            {name: SparseLinear(rows, output_size, continuous=True) for name, rows in continuous.items()}
        )

    def dense_names(self) -> list[str]:
        """Dense tensors read (the discretized ones)."""
        return [] if self.discretizer is None else self.discretizer.dense_names()

    def sparse_names(self) -> list[str]:
        """Sparse continuous features read, raw or discretized."""
        names = [] if self.discretizer is None else self.discretizer.sparse_names()
        return list(dict.fromkeys([*names, *self.linear]))

    def sparse_rows(self) -> dict[str, int]:
        """Sparse continuous feature -> its num_buckets (ids lie below it)."""
        rows = {name: layer.num_ids for name, layer in self.linear.items()}
        if self.discretizer is not None:
            rows.update({i.name: i.num_buckets for i in self.discretizer.inputs if i.keys is None})
        return {name: rows[name] for name in self.sparse_names()}

    def forward(
        self, dense: dict[str, torch.Tensor], sparse_continuous: dict[str, SparseValues]
    ) -> torch.Tensor:
        parts = []
        if self.discretizer is not None:
            for ids, offsets in self.discretizer(dense, sparse_continuous):
                parts.append(self.bins(ids, offsets))
        for name, layer in self.linear.items():
            feature = sparse_continuous[name]
            parts.append(layer(feature.ids, feature.offsets, feature.values))
        return torch.stack(parts).sum(dim=0)


def build_sparse_features(
    discretizer: DiscretizerConfig | None, config: SparseLinearConfig | None, data: DataSource
) -> SparseFeatures | None:
    """The `sparse_linear` segment of `model.discretizer` / `model.sparse_linear` for the data section
    (the boundaries file is read here); None when neither is set."""
    if config is None:
        if discretizer is not None:
            raise ConfigError(
                f"{KEY} is set but nothing reads its bins: add '{DISCRETIZER}' to model.sparse_linear.features"
            )
        return None
    known = {f.name: f.num_buckets for f in data.sparse_continuous_features}
    raw = {}
    for name in config.features:
        if name == DISCRETIZER:
            if discretizer is None:
                raise ConfigError(f"model.sparse_linear.features names '{DISCRETIZER}', but {KEY} is not set")
        elif name in known:
            raw[name] = known[name]
        else:
            raise ConfigError(
                f"model.sparse_linear.features: {name!r} is not a sparse continuous feature of the data "
                f"(train_data.sparse_continuous_features: {sorted(known)}) nor '{DISCRETIZER}'"
            )
    bins = None
    if discretizer is not None:
        if DISCRETIZER not in config.features:
            raise ConfigError(
                f"{KEY} is set but nothing reads its bins: add '{DISCRETIZER}' to model.sparse_linear.features"
            )
        inputs = discretized_inputs(discretizer.features, data)
        document = read_boundaries(discretizer.boundaries_path)
        check_calibration(document, discretizer.boundaries_path, calibration_settings(discretizer), inputs)
        bins = build_discretizer(inputs, document, discretizer.out_bits, discretizer.num_bins)
    return SparseFeatures(config.output_size, bins, discretizer.out_bits if discretizer else None, raw)


def calibration_settings(config: DiscretizerConfig) -> dict:
    """The settings a boundaries file records and must match."""
    return {
        "num_bins": config.num_bins,
        "relative_accuracy": config.relative_accuracy,
        "max_rows": config.max_rows,
    }
