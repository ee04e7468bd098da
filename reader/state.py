"""The reader's resumable state: a position in the stream and the data plan it belongs to.

A state is plain JSON data (the trainer stores one per rank with each checkpoint):

    {"version": 1,
     "plan": {"inputs": {"root": "/data/train", "num_files": 2, "num_rows": 47,
                         "files": [["a.parquet", [16, 16, 8]], ["b.parquet", [7]]]},   # rows per row group
              "global_batch_size": 8, "world_size": 2, "rank": 0, "num_epochs": 4,
              "shuffle": {"seed": 0, "shuffle_files": true, "buffer_size": 0}},
     "position": {"batches": 12, "epoch": 1, "row": 24}}

`position` reads: after `batches` batches of its stream (resumed ones included) the rank reads epoch `epoch`
from row `row` of its share on (rows in the epoch's shuffled order). Resuming under another plan either
re-plans exactly, re-plans with a logged approximation, or raises `ResumeError` naming the setting:

| changed | outcome |
|---|---|
| input files (names relative to their common folder, row-group row counts) | ResumeError naming `inputs` and the files added / removed / changed |
| `shuffle.seed` (while anything shuffles), `shuffle.shuffle_files`, `shuffle.buffer_size` | ResumeError naming the key |
| `rank` at the same world size | ResumeError naming `rank` |
| `global_batch_size` at the same world size | exact: the same rows from the same row on, cut into new batches |
| world size | the same epoch; each new rank skips (rows the old ranks read of it) // new world size rows of its share; rows of that epoch may repeat or be skipped; later epochs exact |
| `num_epochs` | fine while the position is inside the new number of epochs, else ResumeError naming `num_epochs` |
| only the folder of the files | fine (logged) |

Example:
    state = encode_state(plan, Position(batches=12, epoch=1, row=24))
    saved_plan, position = decode_state(json.loads(json.dumps(state)))
    position, notes = replan(saved_plan, position, plan)       # notes: [(logging level, message)]
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

from tml.core.errors import UserError

VERSION = 1


class ResumeError(UserError, ValueError):
    """A saved reader state cannot continue under the current plan; the message names the setting."""


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _row_groups(then: tuple[int, ...], now: tuple[int, ...]) -> str:
    """How a file's row groups changed, in the fewest words that show the difference."""
    if sum(then) == sum(now) and len(then) == len(now):  # the same totals: show the sizes themselves
        return f"rows per row group {list(then)} -> {list(now)}"
    return f"{sum(then)} rows in {len(then)} row groups -> {sum(now)} rows in {len(now)} row groups"


@dataclasses.dataclass(frozen=True)
class InputFiles:
    """The files a plan reads: names relative to their common folder `root`, with rows per row group."""

    root: str
    files: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, paths: Sequence[str], row_groups: Sequence[Sequence[int]]) -> InputFiles:
        root = posixpath.commonpath([posixpath.dirname(path) for path in paths]) if paths else ""
        cut = len(root.rstrip("/"))
        names = [path[cut:].lstrip("/") for path in paths]
        return cls(root, tuple((name, tuple(rows)) for name, rows in zip(names, row_groups, strict=True)))

    @property
    def num_rows(self) -> int:
        return sum(sum(rows) for _, rows in self.files)

    @property
    def num_row_groups(self) -> int:
        return sum(len(rows) for _, rows in self.files)

    def to_json(self) -> dict[str, Any]:
        files = [[name, list(rows)] for name, rows in self.files]
        return {"root": self.root, "num_files": len(files), "num_rows": self.num_rows, "files": files}

    @classmethod
    def from_json(cls, raw: Any) -> InputFiles:
        files = raw["files"]
        return cls(str(raw["root"]), tuple((str(name), tuple(int(r) for r in rows)) for name, rows in files))

    def changes_since(self, saved: InputFiles) -> str | None:
        """What differs from `saved` (files added, removed, with other row groups), or None."""
        now, then = dict(self.files), dict(saved.files)
        added = sorted(set(now) - set(then))
        removed = sorted(set(then) - set(now))
        changed = [
            f"{name}: {_row_groups(then[name], now[name])}"
            for name in sorted(set(now) & set(then))
            if now[name] != then[name]
        ]
        parts = [
            f"{len(items)} files {what} ({_few(items)})"
            for items, what in ((added, "added"), (removed, "removed"), (changed, "changed"))
            if items
        ]
        return "; ".join(parts) or None


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What decides which rows a rank reads in which order; a position only means something under it."""

    inputs: InputFiles
    global_batch_size: int
    world_size: int
    rank: int
    num_epochs: int | None
    seed: int
    shuffle_files: bool
    buffer_size: int

    @property
    def batch_size(self) -> int:
        """Rows per batch on one rank."""
        return self.global_batch_size // self.world_size

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs.to_json(),
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_epochs": self.num_epochs,
            "shuffle": {
                "seed": self.seed,
                "shuffle_files": self.shuffle_files,
                "buffer_size": self.buffer_size,
            },
        }

    @classmethod
    def from_json(cls, raw: Any) -> DataPlan:
        shuffle = raw["shuffle"]
        num_epochs = raw["num_epochs"]
        return cls(
            inputs=InputFiles.from_json(raw["inputs"]),
            global_batch_size=int(raw["global_batch_size"]),
            world_size=int(raw["world_size"]),
            rank=int(raw["rank"]),
            num_epochs=None if num_epochs is None else int(num_epochs),
            seed=int(shuffle["seed"]),
            shuffle_files=bool(shuffle["shuffle_files"]),
            buffer_size=int(shuffle["buffer_size"]),
        )


@dataclasses.dataclass(frozen=True)
class Position:
    """After `batches` batches of the stream, the rank reads `epoch` from row `row` of its share on."""

    batches: int
    epoch: int
    row: int


def encode_state(plan: DataPlan, position: Position) -> dict[str, Any]:
    """The JSON-serialisable state of `position` under `plan`."""
    return {"version": VERSION, "plan": plan.to_json(), "position": dataclasses.asdict(position)}


def decode_state(state: Any) -> tuple[DataPlan, Position]:
    """(plan, position) of a state made by `encode_state`; ResumeError for anything else."""
    if isinstance(state, dict) and set(state) == {"batches_yielded"}:
        raise ResumeError(
            f"reader state {state}: the old format, a batch count without the data plan it counts in, cannot "
            "be checked; resume from a checkpoint written by this version or start without the reader state"
        )
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ResumeError(
            f"reader state: expected a dict with version {VERSION} (from dataset.state_dict()), got "
            f"{'version ' + repr(version) if version is not None else repr(state)[:200]}"
        )
    try:
        plan = DataPlan.from_json(state["plan"])
        raw = state["position"]
        position = Position(int(raw["batches"]), int(raw["epoch"]), int(raw["row"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ResumeError(f"reader state: malformed ({type(error).__name__}: {error})") from error
    if min(position.batches, position.epoch, position.row) < 0:
        raise ResumeError(f"reader state: negative position {position}")
    return plan, position


def _check_unchanged(saved: DataPlan, current: DataPlan) -> list[tuple[int, str]]:
    notes = []
    changes = current.inputs.changes_since(saved.inputs)
    if changes is not None:
        raise ResumeError(
            f"inputs changed since the reader state was saved: {changes}. The saved position counts rows "
            "of the old files, so resuming would repeat some rows and skip others: restore the old files "
            "or start without the saved reader state"
        )
    if current.inputs.root != saved.inputs.root:
        notes.append((logging.INFO, f"inputs moved from {saved.inputs.root} to {current.inputs.root} "
                      "(same files and row groups)"))  # fmt: skip
    shuffles = any(plan.shuffle_files or plan.buffer_size > 0 for plan in (saved, current))
    for key in ("shuffle_files", "buffer_size", *(("seed",) if shuffles else ())):
        before, now = getattr(saved, key), getattr(current, key)
        if before != now:
            raise ResumeError(
                f"shuffle.{key} changed from {before!r} to {now!r} since the reader state was saved: the "
                "saved position belongs to another order of rows, so resuming would repeat some rows and "
                f"skip others; set it back to {before!r} or start without the saved reader state"
            )
    return notes


def _check_all_saved(saved: DataPlan, all_saved: Sequence[tuple[DataPlan, Position]]) -> None:
    ranks = [plan.rank for plan, _ in all_saved]
    if ranks != list(range(saved.world_size)):
        raise ResumeError(
            f"all_states: expected the states of old ranks 0..{saved.world_size - 1} in rank order, got the "
            f"states of ranks {ranks}"
        )
    for plan, _ in all_saved:
        if plan != dataclasses.replace(saved, rank=plan.rank):
            raise ResumeError(
                f"all_states: old rank {plan.rank}'s state has another data plan than the others"
            )


def replan(
    saved: DataPlan,
    position: Position,
    current: DataPlan,
    all_saved: Sequence[tuple[DataPlan, Position]] | None = None,
    old_share_rows: Callable[[int, int], int] | None = None,
) -> tuple[Position, list[tuple[int, str]]]:
    """`position` (saved under `saved`) under the `current` plan, and what to log: [(level, message)].

    Args:
        saved / position: the decoded state handed to this rank.
        current: this rank's plan.
        all_saved: when the world size changed, every old rank's (plan, position), old rank order: the new
            ranks then skip the rows the old ranks read of the epoch in total; None: estimated from
            `position` alone (every old rank read as many rows as this one).
        old_share_rows: (epoch, old rank) -> rows of that rank's share of the epoch in the old layout
            (needed with `all_saved`, for old ranks already past the epoch).

    Raises:
        ResumeError: the plans differ in a way no position can bridge (see the module docstring).
    """
    notes = _check_unchanged(saved, current)
    epoch, row = position.epoch, position.row
    if saved.world_size == current.world_size:
        if saved.rank != current.rank:
            raise ResumeError(
                f"rank: the reader state was saved by rank {saved.rank} but is loaded by rank {current.rank} "
                f"at the same world size {current.world_size}; each rank resumes from its own state"
            )
        if saved.global_batch_size != current.global_batch_size:
            notes.append((logging.INFO, (
                f"global_batch_size {saved.global_batch_size} -> {current.global_batch_size} at world size "
                f"{current.world_size}: exact by rows; rank {current.rank} resumes epoch {epoch} at row {row} "
                f"of its share, in batches of {current.batch_size} rows from there"
            )))  # fmt: skip
    else:
        if all_saved is not None:
            assert old_share_rows is not None, "all_saved needs old_share_rows"
            _check_all_saved(saved, all_saved)
            read = sum(
                pos.row
                if pos.epoch == epoch
                else old_share_rows(epoch, plan.rank)
                if pos.epoch > epoch
                else 0
                for plan, pos in all_saved
            )
            source = f"the {saved.world_size} old ranks had read {read} rows of it"
        else:
            read = position.row * saved.world_size
            source = (
                f"from old rank {saved.rank}'s position: row {position.row} of its share x {saved.world_size} "
                "ranks"
            )
        # The new ranks skip as many rows of this epoch in total as the old ranks had read.
        row = read // current.world_size
        notes.append((logging.WARNING, (
            f"world size {saved.world_size} -> {current.world_size}: epoch {epoch} is re-dealt over "
            f"{current.world_size} ranks ({source}); resuming at row {row} of each rank's share (batch "
            f"{row // current.batch_size} of {current.batch_size} rows); rows of this epoch before/after the "
            "resume may repeat or be skipped; later epochs are exact"
        )))  # fmt: skip
    if saved.num_epochs != current.num_epochs:
        end = current.num_epochs
        if end is not None and (epoch > end or (epoch == end and row > 0)):
            raise ResumeError(
                f"num_epochs changed from {saved.num_epochs} to {end}, but the saved position is in epoch "
                f"{epoch} (counted from 0), past the new end; set num_epochs to at least {epoch + 1} or "
                "start without the saved reader state"
            )
        notes.append((logging.INFO, f"num_epochs {saved.num_epochs} -> {end}: the position (epoch {epoch}, "
                      f"row {row}) is inside; continuing"))  # fmt: skip
    return Position(position.batches, epoch, row), notes
