"""DCN-V2 (Wang et al. 2020, arXiv 2008.13535): explicit feature crosses plus a deep network.

Cross layer l: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, with W_l = U_l V_l^T when a projection (low-rank) dim
is given. Stacked: cross network, then the output MLP. Parallel: [cross(x), deep(x)] concatenated, then the
output MLP.

Shapes: B = batch, F = input features, D = output width.

Example:
    net = Dcn(16, poly_degree=2, projection_dim=4)
    net(torch.randn(4, 16)).shape  # (4, 16)
"""

from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """One DCN-V2 cross: [B, F] x [B, F] -> [B, F].

    Args:
        width: F.
        projection_dim: rank of the low-rank weight, or None for a full F x F weight.

    Example:
        CrossLayer(8, projection_dim=2)(torch.randn(2, 8), torch.randn(2, 8))
    """

    def __init__(self, width: int, projection_dim: int | None) -> None:
        super().__init__()
        if projection_dim is None:
            self.down = None
            self.up = nn.Linear(width, width)
        else:
            self.down = nn.Linear(width, projection_dim, bias=False)
            self.up = nn.Linear(projection_dim, width)
        for layer in (self.down, self.up):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hidden = self.down(x) if self.down is not None else x
        return x0 * self.up(hidden) + x


class Dcn(nn.Module):
    """DCN-V2, stacked or parallel.

    Args:
        in_features: F.
        poly_degree: number of cross layers.
        projection_dim: low-rank dim of the cross weights, or None.
        parallel_mlp: deep network beside the cross network (parallel mode), or None (stacked).
        output_mlp: network on the cross (+ deep) output, or None; its in_features must match.

    Shapes: [B, F] -> [B, D] with D = output_mlp width, else F (+ parallel_mlp width).

    Example:
        Dcn(8, 2, None, parallel_mlp=Mlp(8, [4]))(torch.randn(2, 8)).shape  # (2, 12)
    """

    def __init__(
        self,
        in_features: int,
        poly_degree: int,
        projection_dim: int | None = None,
        parallel_mlp: nn.Module | None = None,
        output_mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cross = nn.ModuleList(CrossLayer(in_features, projection_dim) for _ in range(poly_degree))
        self.parallel_mlp = parallel_mlp
        self.output_mlp = output_mlp
        self.in_features = in_features
        self.cross_output_width = in_features + (parallel_mlp.out_features if parallel_mlp else 0)
        self.out_features = output_mlp.out_features if output_mlp is not None else self.cross_output_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.cross:
            out = layer(x, out)
        if self.parallel_mlp is not None:
            out = torch.cat([out, self.parallel_mlp(x)], dim=1)
        return self.output_mlp(out) if self.output_mlp is not None else out
