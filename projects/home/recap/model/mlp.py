"""Building blocks shared by the recap architectures: an MLP and a LayerNorm with separate center/scale.

Shapes: B = batch, F = input features, D = output width.

Example:
    mlp = Mlp(in_features=16, layer_sizes=[8, 1], batch_norm_momentum=0.1)
    out = mlp(torch.randn(4, 16))  # [4, 1]
"""

from __future__ import annotations

import torch
from torch import nn


def init_linear(layer: nn.Linear) -> nn.Linear:
    # Xavier keeps activation scale steady through deep stacks of wide layers (as the original did).
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Mlp(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer, then a final Linear [-> ReLU].

    Args:
        in_features: F.
        layer_sizes: widths of the Linear layers; the last is D.
        batch_norm_affine: learn BatchNorm scale/shift (only with batch_norm_momentum).
        batch_norm_momentum: BatchNorm momentum; None means no BatchNorm.
        dropout_rate: dropout after hidden activations; None means no dropout.
        final_layer_activation: ReLU after the last Linear too.

    Shapes: [B, F] -> [B, D].

    Example:
        Mlp(16, [8, 4], dropout_rate=0.1)(torch.randn(2, 16)).shape  # (2, 4)
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: list[int],
        batch_norm_affine: bool = True,
        batch_norm_momentum: float | None = None,
        dropout_rate: float | None = None,
        final_layer_activation: bool = False,
    ) -> None:
        super().__init__()
        assert layer_sizes, "an MLP needs at least one layer"
        layers: list[nn.Module] = []
        width = in_features
        for size in layer_sizes[:-1]:
            layers.append(init_linear(nn.Linear(width, size)))
            if batch_norm_momentum is not None:
                layers.append(nn.BatchNorm1d(size, affine=batch_norm_affine, momentum=batch_norm_momentum))
            layers.append(nn.ReLU())
            if dropout_rate is not None:
                layers.append(nn.Dropout(dropout_rate))
            width = size
        layers.append(init_linear(nn.Linear(width, layer_sizes[-1])))
        if final_layer_activation:
            layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = layer_sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with an optional learned bias (center) and scale, independently.

    Args:
        width: size of the last axis.
        eps: added to the variance.
        center: learn a bias.
        scale: learn a scale.

    Shapes: [B, F] -> [B, F].

    Example:
        LayerNorm(8, center=True, scale=False)(torch.randn(2, 8))
    """

    def __init__(self, width: int, eps: float = 1e-5, center: bool = True, scale: bool = True) -> None:
        super().__init__()
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if scale else None
        self.bias = nn.Parameter(torch.zeros(width)) if center else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (self.width,), self.weight, self.bias, self.eps)
