"""Checkpoints with torch.distributed.checkpoint (DCP) under `<save_dir>/checkpoints/step-N/`.

A checkpoint holds the `Stateful` parts the run registers (core/state.py): job-wide ones (model, optimizers,
scheduler, loop counters) saved once, sharded tables as DCP cuts them, and per-rank ones (data position,
random generators) as one JSON document per rank. A save writes into `.tmp-step-N/`; rank 0 then adds
`meta.json` and the `COMPLETE` marker and renames the folder, so an interrupted save is never taken for the
latest. Resharding (N ranks -> M) is DCP's for tensors; per-rank parts get every old rank's state and
decide (`load_resharded`). All ranks must see the same filesystem.

Reading weights for evaluate / predict / export needs no Checkpointer: `load_weights(module, path)` reads
the model part only and writes nothing.

Example:
    ckpt = Checkpointer(save_dir, env, states, rank_states, every_n=1000)
    step = ckpt.restore_latest()      # step of the newest complete checkpoint, or None
    with ckpt.signal_handlers():      # SIGTERM/SIGINT: checkpoint at the next step, exit cleanly
        train(...)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan

from tml.core.config.loader import ConfigError
from tml.core.distributed import DistEnv, any_rank_true
from tml.core.state import load_model_state, model_state
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)
MARKER = "COMPLETE"
_RANKS = "rank"


def complete_steps(checkpoint_dir: str) -> list[int]:
    """Steps of complete checkpoints in `checkpoint_dir`, ascending."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for entry in os.listdir(checkpoint_dir):
        if entry.startswith("step-") and os.path.exists(os.path.join(checkpoint_dir, entry, MARKER)):
            try:
                steps.append(int(entry[len("step-") :]))
            except ValueError:
                continue
    return sorted(steps)


def checkpoint_step(path: str) -> int:
    """The step a complete checkpoint folder was saved at."""
    with open(os.path.join(path, "meta.json")) as f:
        return int(json.load(f)["step"])


class Preempted(SystemExit):
    """Raised after the final checkpoint once SIGTERM/SIGINT arrived; exit status 0."""


def _nonempty(state: dict) -> dict:
    # DCP stores an empty dict as a leaf of its own, which a rank holding no shard of that part (e.g. no
    # fused table with optimizer state) would then miss on load.
    pruned = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _nonempty(value)
            if not value:
                continue
        pruned[key] = value
    return pruned


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default planner without its pre-2.4 fallback: when a rank asks for fewer keys than the
    checkpoint holds (every rank does: other ranks' parts, shards it does not own), the default planner
    guesses an old checkpoint and re-flattens the request the old way, after which nested non-tensor parts
    (the loop counters) are reported missing."""

    def create_local_plan(self):
        return create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)


def _merge_into(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


class Checkpointer:
    """Saves and restores one training run (see module docstring).

    Args:
        save_dir: the run folder; checkpoints go to `<save_dir>/checkpoints/`.
        env: from init_distributed.
        states: name -> job-wide Stateful (e.g. "model", "optim/dense", "fused", "scheduler", "loop").
        rank_states: name -> per-rank state (core.state.RankState), e.g. "data", "rng".
        every_n: save every N steps; max_to_keep: newest complete checkpoints kept.
    """

    def __init__(
        self,
        save_dir: str,
        env: DistEnv,
        states: dict[str, Any],
        rank_states: dict[str, Any] | None = None,
        every_n: int = 1000,
        max_to_keep: int = 3,
    ) -> None:
        self.dir = os.path.join(save_dir, "checkpoints")
        self.env, self.states, self.rank_states = env, states, rank_states or {}
        self.every_n, self.max_to_keep = every_n, max_to_keep
        self._signal: int | None = None
        if env.is_main:
            os.makedirs(self.dir, exist_ok=True)
            for entry in os.listdir(self.dir):
                if entry.startswith(".tmp-"):  # a save that never completed
                    shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)
        dist.barrier()

    def latest_step(self) -> int | None:
        steps = complete_steps(self.dir)
        return steps[-1] if steps else None

    def latest_path(self) -> str | None:
        step = self.latest_step()
        return None if step is None else os.path.join(self.dir, f"step-{step}")

    # -- save ----------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        """A SIGTERM/SIGINT arrived on this rank (see signal_handlers)."""
        return self._signal is not None

    def maybe_save(
        self,
        step: int,
        before_save: Callable[[int], None] | None = None,
        stop: bool | None = None,
        last_step: bool = False,
    ) -> bool:
        """Save when `step` is a multiple of every_n, the last step, or a signal arrived (then exit via
        Preempted); returns whether it saved.

        `before_save(step)` runs on every rank just before a save (the loop checks its losses there).
        `stop`: whether any rank has a stop request, when the caller already agreed on it (the train loop
        does, overlapped with compute); None: agree here (one tiny all_reduce).
        """
        if stop is None:
            stop = any_rank_true(self.stop_requested, self.env)
        due = step % self.every_n == 0 or stop or last_step
        saved = False
        if due and self.latest_step() != step:
            if before_save is not None:
                before_save(step)
            self.save(step)
            saved = True
        if stop:
            logger.info("stopping after the checkpoint of step %d (signal)", step)
            raise Preempted(0)
        return saved

    def save(self, step: int) -> None:
        final = os.path.join(self.dir, f"step-{step}")
        tmp = os.path.join(self.dir, f".tmp-step-{step}")
        state = {name: part.state_dict() for name, part in self.states.items()}
        mine = {name: part.state_dict() for name, part in self.rank_states.items()}
        state[_RANKS] = {str(self.env.rank): json.dumps(mine)}
        dcp.save(_nonempty(state), checkpoint_id=tmp)
        dist.barrier()
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world_size, "states": sorted(self.states)}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            open(os.path.join(tmp, MARKER), "w").close()
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in complete_steps(self.dir)[: -self.max_to_keep]:
                shutil.rmtree(os.path.join(self.dir, f"step-{old}"), ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        dist.barrier()

    # -- restore -------------------------------------------------------------------------------
    def restore_latest(self) -> int | None:
        """Load the newest complete checkpoint of this run; its step, or None when there is none."""
        path = self.latest_path()
        return None if path is None else self.load(path)

    def load(self, path: str) -> int:
        """Load every registered part from checkpoint folder `path`; returns its step."""
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        missing = sorted(set(self.states) - set(meta["states"]))
        if missing:
            raise ValueError(f"checkpoint {path} has no {missing} (it holds {meta['states']})")
        targets = {name: part.state_dict() for name, part in self.states.items()}
        saved_world = int(meta["world_size"])
        resharded = saved_world != self.env.world_size
        wanted = range(saved_world) if resharded else [self.env.rank]
        targets[_RANKS] = {str(rank): "" for rank in wanted}
        loaded = _nonempty(targets)
        dcp.load(loaded, checkpoint_id=path, planner=_LoadPlanner())
        _merge_into(targets, loaded)  # tensors were loaded in place; other values replaced in `loaded`
        for name, part in self.states.items():
            part.load_state_dict(targets[name])
        documents = [json.loads(targets[_RANKS][str(rank)]) for rank in wanted]
        for name, part in self.rank_states.items():
            if resharded:
                part.load_resharded([document[name] for document in documents])
            else:
                part.load_state_dict(documents[0][name])
        if resharded:
            logger.warning(
                "checkpoint %s was saved by %d ranks, this job has %d (tensors are re-cut by DCP)",
                path,
                saved_world,
                self.env.world_size,
            )
        logger.info("restored checkpoint %s (step %d)", path, meta["step"])
        return int(meta["step"])

    # -- signals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """Inside: SIGTERM/SIGINT set a flag; the next maybe_save() checkpoints on every rank and exits.

        On leaving, the previous handlers come back. A handler left installed would also keep this
        Checkpointer, its model and the model's process groups alive past destroy_process_group, to be
        torn down with the interpreter, gloo's threads still running.
        """

        def handler(signum, _frame):
            self._signal = signum

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def resolve_checkpoint(path: str, what: str = "checkpoint") -> str:
    """`path` itself when it is a complete step folder, else the newest complete one inside it (a run's
    `checkpoints/` folder or the run folder)."""
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    for folder in (path, os.path.join(path, "checkpoints")):
        steps = complete_steps(folder)
        if steps:
            return os.path.join(folder, f"step-{steps[-1]}")
    raise FileNotFoundError(f"{what} {path!r} holds no complete checkpoint (step-N/{MARKER})")


def _saved_shapes(path: str) -> dict[str, tuple[int, ...]]:
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {
        key.removeprefix("model."): tuple(md.size)
        for key, md in saved.items()
        if key.startswith("model.") and hasattr(md, "size")
    }


def model_differences(module: nn.Module, path: str) -> list[str]:
    """Model tensors that differ between `module` and checkpoint `path` ("name: saved [..], model [..]"),
    so a resume into a changed model can be refused before anything is written."""
    saved = _saved_shapes(path)
    current = {name: tuple(value.shape) for name, value in model_state(module).items()}
    problems = [f"{name}: not in the checkpoint" for name in current if name not in saved]
    problems += [f"{name}: in the checkpoint, not in the model" for name in saved if name not in current]
    problems += [
        f"{name}: saved {list(saved[name])}, model {list(shape)}"
        for name, shape in current.items()
        if name in saved and saved[name] != shape
    ]
    return problems


def load_weights(module: nn.Module, path: str) -> int:
    """Load only the model weights of checkpoint `path` (a step folder, a run's `checkpoints/` folder or a
    run folder: its latest) into `module`, writing nothing; returns the checkpoint's step.

    Every tensor must be present with its shape; the error lists what differs.
    """
    path = resolve_checkpoint(path)
    problems = model_differences(module, path)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        # The config describes another model than the one trained (a user error: one line from the CLI).
        raise ConfigError(f"checkpoint {path} does not fit the config's model: {shown}")
    state = model_state(module)
    dcp.load({"model": state}, checkpoint_id=path, planner=_LoadPlanner())
    load_model_state(module, state)
    return checkpoint_step(path)


def warm_start(module: nn.Module, path: str) -> list[str]:
    """Load model weights only from checkpoint `path` (see resolve_checkpoint); optimizer state and step
    are not loaded. Weights that are new or changed shape keep their fresh initialisation; their names
    are logged and returned."""
    path = resolve_checkpoint(path, "initial_checkpoint_dir")
    saved = _saved_shapes(path)
    current = model_state(module)
    loadable = {n: t for n, t in current.items() if saved.get(n) == tuple(t.shape)}
    fresh = [n for n in current if n not in loadable]
    dcp.load({"model": loadable}, checkpoint_id=path, planner=_LoadPlanner())
    load_model_state(module, {**current, **loadable})
    logger.info("warm start from %s: %d tensors loaded: %s", path, len(loadable), _by_module(loadable))
    new = [n for n in fresh if n not in saved]
    if new:
        logger.info("warm start: new, freshly initialised: %s", _by_module(new))
    for name in fresh:
        if name in saved:
            shapes = f"saved {list(saved[name])}, model {list(current[name].shape)}"
            logger.info("warm start: changed shape, freshly initialised: %s (%s)", name, shapes)
    dropped = [n for n in saved if n not in current]
    if dropped:
        logger.info("warm start: in the checkpoint, not in the model (not loaded): %s", _by_module(dropped))
    return fresh


def _by_module(names) -> str:
    """Tensor names counted per module three levels deep: `model.towers.fav (4), model.backbone (6)`."""
    counts: dict[str, int] = {}
    for name in names:
        module = ".".join(name.split(".")[:3])
        counts[module] = counts.get(module, 0) + 1
    return ", ".join(f"{module} ({count})" for module, count in counts.items())
