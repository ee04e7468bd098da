"""Split towers: named groups of features (user, author, tweet...) each go through their own small MLP into a
compact embedding; the group embeddings and the ungrouped columns are concatenated for the backbone.

The user / user-author groups can then be run alone (`group_embeddings`) to precompute their embeddings.

Shapes: B = batch; segments are named [B, width] tensors; G = sum of the group embedding widths,
U = number of ungrouped columns; output [B, G + U].

Example:
    split = SplitTowers(layout=[("continuous", 10), ("user_emb", 4)],
                        groups=[TowerGroup("user", [("user_emb", 0, 4), ("continuous", 0, 3)], [8, 2])])
    split({"continuous": torch.randn(5, 10), "user_emb": torch.randn(5, 4)}).shape  # (5, 2 + 7)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tml.projects.home.recap.model.mlp import Mlp


@dataclasses.dataclass(frozen=True)
class TowerGroup:
    """A group: (segment name, start column, stop column) pieces and its MLP layer sizes."""

    name: str
    pieces: list[tuple[str, int, int]]
    layer_sizes: list[int]


def _ungrouped(layout: list[tuple[str, int]], groups: list[TowerGroup]) -> list[tuple[str, int, int]]:
    used: dict[str, list[bool]] = {name: [False] * width for name, width in layout}
    for group in groups:
        for name, start, stop in group.pieces:
            for col in range(start, stop):
                used[name][col] = True
    pieces = []
    for name, width in layout:
        col = 0
        while col < width:
            if used[name][col]:
                col += 1
                continue
            start = col
            while col < width and not used[name][col]:
                col += 1
            pieces.append((name, start, col))
    return pieces


def _gather(segments: dict[str, torch.Tensor], pieces: list[tuple[str, int, int]]) -> torch.Tensor:
    return torch.cat([segments[name][:, start:stop] for name, start, stop in pieces], dim=1)


class SplitTowers(nn.Module):
    """Per-group MLPs over column pieces of named segments, plus the ungrouped columns.

    Args:
        layout: (segment name, width) of every input segment, in concatenation order.
        groups: the groups (pieces must lie within the layout and not overlap; checked by the builder).

    Shapes: {segment: [B, width]} -> [B, G + U].
    """

    def __init__(self, layout: list[tuple[str, int]], groups: list[TowerGroup]) -> None:
        super().__init__()
        self.groups = list(groups)
        self.mlps = nn.ModuleDict(
            {
                g.name: Mlp(sum(stop - start for _, start, stop in g.pieces), g.layer_sizes)
                for g in self.groups
            }
        )
        self.ungrouped = _ungrouped(layout, self.groups)
        self.out_features = sum(g.layer_sizes[-1] for g in self.groups) + sum(
            stop - start for _, start, stop in self.ungrouped
        )

    def group_embeddings(
        self, segments: dict[str, torch.Tensor], groups: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """{group: [B, D_group]} for the named groups (all groups when None)."""
        names = [g.name for g in self.groups] if groups is None else groups
        by_name = {g.name: g for g in self.groups}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise KeyError(f"unknown split tower group(s) {unknown}; split_towers.groups has {list(by_name)}")
        return {n: self.mlps[n](_gather(segments, by_name[n].pieces)) for n in names}

    def forward(self, segments: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = list(self.group_embeddings(segments).values())
        if self.ungrouped:
            parts.append(_gather(segments, self.ungrouped))
        return torch.cat(parts, dim=1)
