"""MaskNet (Wang et al. 2021, arXiv 2102.07619): instance-guided masks over the input features.

Each MaskBlock computes a mask from the raw input (aggregation Linear -> ReLU -> projection Linear back to the
block's input width), multiplies it elementwise into the (optionally LayerNorm-ed) block input, then applies a
hidden Linear with LayerNorm + ReLU. Parallel: every block reads the input and their outputs are concatenated.
Serial: block i reads block i-1's output, every mask still reads the original input.

Shapes: B = batch, F = input features, D = output width (sum or last of the block sizes, or the MLP's).

Example:
    net = MaskNet(16, [MaskBlockSpec(output_size=8, aggregation_size=32)], use_parallel=True)
    net(torch.randn(4, 16)).shape  # (4, 8)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tml.projects.home.recap.model.mlp import init_linear


@dataclasses.dataclass(frozen=True)
class MaskBlockSpec:
    """One block: exactly one of aggregation_size / reduction_factor (times the mask input width)."""

    output_size: int
    aggregation_size: int | None = None
    reduction_factor: float | None = None
    input_layer_norm: bool = False


class MaskBlock(nn.Module):
    """Mask from `mask_input` [B, M] applied to `net` [B, N]; returns [B, output_size].

    Args:
        spec: block sizes.
        input_width: N, width of the masked input.
        mask_input_width: M, width of the input the mask is computed from.

    Example:
        MaskBlock(MaskBlockSpec(4, aggregation_size=8), 6, 6)(torch.randn(2, 6), torch.randn(2, 6))
    """

    def __init__(self, spec: MaskBlockSpec, input_width: int, mask_input_width: int) -> None:
        super().__init__()
        if spec.aggregation_size is not None:
            aggregation = spec.aggregation_size
        else:
            assert spec.reduction_factor is not None
            aggregation = max(1, int(mask_input_width * spec.reduction_factor))
        self.input_layer_norm = nn.LayerNorm(input_width) if spec.input_layer_norm else None
        self.mask = nn.Sequential(
            init_linear(nn.Linear(mask_input_width, aggregation)),
            nn.ReLU(),
            init_linear(nn.Linear(aggregation, input_width)),
        )
        self.hidden = init_linear(nn.Linear(input_width, spec.output_size))
        self.layer_norm = nn.LayerNorm(spec.output_size)

    def forward(self, net: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        if self.input_layer_norm is not None:
            net = self.input_layer_norm(net)
        return torch.relu(self.layer_norm(self.hidden(net * self.mask(mask_input))))


class MaskNet(nn.Module):
    """Parallel or serial MaskBlocks, optionally followed by an MLP.

    Args:
        in_features: F.
        blocks: block specs.
        use_parallel: side by side (concatenated) instead of stacked.
        mlp: optional module applied to the block output (its in_features must match `block_output_width`).

    Shapes: [B, F] -> [B, D].

    Example:
        MaskNet(16, [MaskBlockSpec(8, reduction_factor=0.5)] * 2, use_parallel=False)(torch.randn(2, 16))
    """

    def __init__(
        self, in_features: int, blocks: list[MaskBlockSpec], use_parallel: bool, mlp: nn.Module | None = None
    ) -> None:
        super().__init__()
        assert blocks, "MaskNet needs at least one block"
        self.use_parallel = use_parallel
        modules = []
        width = in_features
        for spec in blocks:
            modules.append(MaskBlock(spec, in_features if use_parallel else width, in_features))
            width = spec.output_size
        self.blocks = nn.ModuleList(modules)
        self.block_output_width = sum(s.output_size for s in blocks) if use_parallel else width
        self.mlp = mlp
        self.in_features = in_features
        self.out_features = mlp.out_features if mlp is not None else self.block_output_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_parallel:
            out = torch.cat([block(x, x) for block in self.blocks], dim=1)
        else:
            out = x
            for block in self.blocks:
                out = block(out, x)
        return self.mlp(out) if self.mlp is not None else out
