"""Which (file, row group) units each rank reads in each epoch, and where a resumed stream starts.

Every epoch the units are shuffled from (seed, epoch), then dealt to ranks largest first, each to the rank
with the fewest rows so far (ties: lowest rank), so row counts stay balanced even when files differ in size
and every row is read exactly once per epoch across ranks. A rank reads its units in the shuffled order,
grouped into shuffle windows of at least `buffer_size` rows; rows are permuted within a window from
(seed, epoch, rank, window index). Everything is arithmetic on row-group metadata, so a stream can be
positioned at any batch without decoding what came before.

Example:
    plan = epoch_plan(units, epoch=3, rank=0, world_size=2, seed=0, shuffle_units=True, buffer_size=0)
    plan.num_rows, [window.units for window in plan.windows]
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class Unit:
    """One non-empty row group: the smallest piece of work given to a rank."""

    file: int
    row_group: int
    num_rows: int


@dataclasses.dataclass(frozen=True)
class Window:
    """Consecutive units of one rank decoded together; `seed` (None: keep order) permutes their rows."""

    units: tuple[Unit, ...]
    start_row: int
    num_rows: int
    seed: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    epoch: int
    windows: tuple[Window, ...]
    num_rows: int

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_rows // batch_size)


def assign_units(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """This rank's share of `units` (already in epoch order), balanced by rows, order kept."""
    if world_size == 1:
        return list(units)
    by_size = sorted(range(len(units)), key=lambda index: -units[index].num_rows)
    loads = [(0, owner) for owner in range(world_size)]
    mine = []
    for index in by_size:
        load, owner = heapq.heappop(loads)
        if owner == rank:
            mine.append(index)
        heapq.heappush(loads, (load + units[index].num_rows, owner))
    return [units[index] for index in sorted(mine)]


def epoch_plan(
    units: list[Unit],
    epoch: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle_units: bool,
    buffer_size: int,
) -> EpochPlan:
    """The windows this rank reads in `epoch`."""
    ordered = list(units)
    if shuffle_units:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        ordered = [units[index] for index in order]
    mine = assign_units(ordered, rank, world_size)
    windows: list[Window] = []
    group: list[Unit] = []
    start = rows = 0
    for unit in mine:
        group.append(unit)
        rows += unit.num_rows
        if rows >= max(buffer_size, 1):
            window_seed = (seed, epoch, rank, len(windows)) if buffer_size > 0 else None
            windows.append(Window(tuple(group), start, rows, window_seed))
            start, group, rows = start + rows, [], 0
    if group:
        window_seed = (seed, epoch, rank, len(windows)) if buffer_size > 0 else None
        windows.append(Window(tuple(group), start, rows, window_seed))
    return EpochPlan(epoch, tuple(windows), start + rows)


def window_permutation(window: Window) -> np.ndarray | None:
    if window.seed is None:
        return None
    return np.random.default_rng(list(window.seed)).permutation(window.num_rows)
