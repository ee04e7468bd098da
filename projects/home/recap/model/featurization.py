"""Featurization of the segdense `continuous` tensor, and the block [featurized continuous, appended tensors].

All four options first replace NaN/inf by 0 and take sign(x)*log1p(|x|) (clip_log1p_abs clamps the raw value
before that). z_score_log then standardises with precomputed per-feature stats; double_norm_log applies
BatchNorm and a clamp, appends the other tensors and LayerNorms the whole block.

Shapes: B = batch, C = continuous width, A = total width of the appended tensors, W = C + A.

Example:
    feat = DenseFeaturizer(Log1pAbs(), continuous_width=3, concat=[("binary", 2)])
    block = feat({"continuous": torch.randn(4, 3), "binary": torch.ones(4, 2)})  # [4, 5]
"""

from __future__ import annotations

import torch
from torch import nn

from tml.projects.home.recap.model.mlp import LayerNorm


def log1p_abs(x: torch.Tensor) -> torch.Tensor:
    """Non-finite -> 0, then sign(x) * log1p(|x|): compresses heavy-tailed counts, keeps the sign."""
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return torch.sign(x) * torch.log1p(torch.abs(x))


class Log1pAbs(nn.Module):
    """[B, C] -> [B, C]: sign(x)*log1p(|x|) with non-finite values mapped to 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log1p_abs(x)


class ClipLog1pAbs(nn.Module):
    """[B, C] -> [B, C]: clamp raw values to [-clip, clip] (non-finite -> 0), then log1p_abs.

    Args:
        clip_magnitude: clamp bound on the raw values.
    """

    def __init__(self, clip_magnitude: float) -> None:
        super().__init__()
        self.clip_magnitude = clip_magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        return log1p_abs(x.clamp(-self.clip_magnitude, self.clip_magnitude))


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe 2017, arXiv 1702.03275), no affine: [B, C] -> [B, C].

    In training, batch statistics are corrected towards the running ones by r = clip(sigma_B / sigma,
    1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max) (no gradient through r, d), so that
    training and serving see the same normalisation. Evaluation uses the running statistics.

    Args:
        width: C.
        momentum: weight of the batch in the running statistics.
        r_max, d_max: correction bounds.
        eps: added to variances.
    """

    def __init__(
        self, width: int, momentum: float = 0.01, r_max: float = 3.0, d_max: float = 5.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.momentum, self.r_max, self.d_max, self.eps = momentum, r_max, d_max, eps
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (x - self.running_mean) / self.running_std
        mean = x.mean(dim=0)
        std = torch.sqrt(x.var(dim=0, unbiased=False) + self.eps)
        with torch.no_grad():
            r = (std / self.running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / self.running_std).clamp(-self.d_max, self.d_max)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_std.lerp_(std, self.momentum)
        return (x - mean) / std * r + d


class ZScoreLog(nn.Module):
    """[B, C] -> [B, C]: log1p_abs, z-score with fixed stats, optional BatchNorm/renorm, clamp.

    Args:
        mean, std: [C] statistics of log1p_abs(x) (from `compute_continuous_stats`); std 0 is treated as 1.
        clip_magnitude: clamp bound on the result.
        norm: "none", "batch_norm" or "renorm".
        momentum: momentum of the BatchNorm / renorm running statistics.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        clip_magnitude: float,
        norm: str = "none",
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        assert norm in ("none", "batch_norm", "renorm")
        # A constant feature has std 0: leave it centred rather than dividing by zero.
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("std", std.to(torch.float32))
        self.clip_magnitude = clip_magnitude
        width = mean.shape[0]
        self.norm: nn.Module | None = None
        if norm == "batch_norm":
            self.norm = nn.BatchNorm1d(width, affine=False, momentum=momentum)
        elif norm == "renorm":
            self.norm = BatchRenorm(width, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (log1p_abs(x) - self.mean) / self.std
        if self.norm is not None:
            z = self.norm(z)
        return z.clamp(-self.clip_magnitude, self.clip_magnitude)


class DoubleNormLog(nn.Module):
    """[B, C] -> [B, C]: log1p_abs, BatchNorm, clamp (the LayerNorm is applied by DenseFeaturizer).

    Args:
        width: C.
        batch_norm_affine, batch_norm_momentum: the BatchNorm.
        clip_magnitude: clamp bound after the BatchNorm.
    """

    def __init__(
        self, width: int, batch_norm_affine: bool, batch_norm_momentum: float, clip_magnitude: float
    ) -> None:
        super().__init__()
        self.batch_norm = nn.BatchNorm1d(width, affine=batch_norm_affine, momentum=batch_norm_momentum)
        self.clip_magnitude = clip_magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batch_norm(log1p_abs(x)).clamp(-self.clip_magnitude, self.clip_magnitude)


class DenseFeaturizer(nn.Module):
    """Featurize `continuous`, append the named tensors unchanged, optionally LayerNorm the whole block.

    Args:
        transform: [B, C] -> [B, C] module for `continuous`.
        continuous_width: C.
        concat: (name, width) of each appended dense tensor, in order.
        block_norm: LayerNorm over the W columns (double_norm_log), or None.

    Shapes: dense dict with `continuous` [B, C] and each appended [B, width] -> [B, W].
    `layout` lists (name, width) of the block's segments in order.
    """

    def __init__(
        self,
        transform: nn.Module,
        continuous_width: int,
        concat: list[tuple[str, int]],
        block_norm: LayerNorm | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.concat_names = [name for name, _ in concat]
        self.layout = [("continuous", continuous_width), *concat]
        self.out_features = sum(width for _, width in self.layout)
        self.block_norm = block_norm

    def forward(self, dense: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.transform(dense["continuous"].float())]
        parts += [dense[name].float() for name in self.concat_names]
        block = torch.cat(parts, dim=1)
        return self.block_norm(block) if self.block_norm is not None else block
