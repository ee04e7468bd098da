"""Evaluation segments of the recap model (`model.stratifiers`): rows whose `discrete` column equals a value.

`RankingMetrics` (core) takes segment names and a mask function; this is the recap project's, built on
`batch.dense["discrete"]` (the original's "feature rollup").

Shapes: B = batch, K = discrete width, S = stratifiers.

Example:
    names, masks = stratifier_segments([("client_web", 1, 2)])  # names == ["client_web=2"]
    masks(batch)  # [B, 1] bool: batch.dense["discrete"][:, 1] == 2
    metrics = RankingMetrics(tasks, names, masks)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tml.reader.batch import RecapBatch


class StratifierMasks:
    """batch -> [B, S] bool, column s True where `discrete[:, index_s] == value_s`.

    Args:
        stratifiers: (name, discrete column index, value) per segment.

    Example:
        StratifierMasks([("client_web", 1, 2)])(batch)  # [B, 1]
    """

    def __init__(self, stratifiers: Sequence[tuple[str, int, int]]) -> None:
        self.stratifiers = list(stratifiers)
        self.index = torch.tensor([index for _, index, _ in self.stratifiers], dtype=torch.long)
        self.value = torch.tensor([value for _, _, value in self.stratifiers], dtype=torch.long)

    def __call__(self, batch: RecapBatch) -> torch.Tensor:
        discrete = batch.dense.get("discrete")
        if discrete is None:
            raise ValueError(
                "model.stratifiers need batch.dense['discrete'] [B, K], but the batch has none "
                f"(dense keys: {sorted(batch.dense)})"
            )
        if discrete.dim() != 2 or int(self.index.max()) >= discrete.shape[1]:
            raise ValueError(
                f"model.stratifiers read `discrete` columns {self.index.tolist()}, but batch.dense['discrete'] "
                f"has shape {tuple(discrete.shape)}"
            )
        index, value = self.index.to(discrete.device), self.value.to(discrete.device)
        return discrete[:, index].long() == value


def stratifier_segments(
    stratifiers: Sequence[tuple[str, int, int]],
) -> tuple[list[str], Callable[[RecapBatch], torch.Tensor] | None]:
    """Segment names `<name>=<value>` and their mask function for `RankingMetrics` (None without any).

    Args:
        stratifiers: (name, discrete column index, value) per segment, as in `model.stratifiers`.
    """
    if not stratifiers:
        return [], None
    return [f"{name}={value}" for name, _, value in stratifiers], StratifierMasks(stratifiers)
