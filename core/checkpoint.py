"""Checkpoints with torch.distributed.checkpoint: sharded model, optimizer states, scheduler, step, and each
rank's reader position, under `<save_dir>/checkpoints/step-N/`.

A save writes into `.tmp-step-N/`, then rank 0 adds `meta.json` and the `COMPLETE` marker and renames the
folder, so an interrupted save is never taken for the latest. Resharding (N ranks -> M) is DCP's: sharded
tables are re-cut from the saved shard metadata. All ranks must see the same filesystem.

Example:
    ckpt = Checkpointer(save_dir, sharded.module, {"dense": optimizer}, scheduler, env, every_n=1000)
    restored = ckpt.restore_latest()  # (step, extra) or None
    ckpt.install_signal_handlers()    # SIGTERM/SIGINT: checkpoint at the next step, exit cleanly
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from tml.core.distributed import DistEnv, any_rank_true
from tml.core.sharding import clean_name
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)
MARKER = "COMPLETE"


def model_state(module: nn.Module) -> dict:
    return {clean_name(k): v for k, v in module.state_dict().items()}


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


class Preempted(SystemExit):
    """Raised after the final checkpoint once SIGTERM/SIGINT arrived; exit status 0."""


class Checkpointer:
    """Saves and restores one training run (see module docstring).

    Args:
        save_dir: the run folder; checkpoints go to `<save_dir>/checkpoints/`.
        module: the sharded (or plain) model.
        optimizers: name -> ordinary torch optimizer (e.g. "dense", "table/<name>").
        scheduler: the LR scheduler or None.
        env: from init_distributed.
        every_n: save every N steps; max_to_keep: newest complete checkpoints kept.
    """

    def __init__(self, save_dir, module, optimizers, scheduler, env: DistEnv, every_n=1000, max_to_keep=3):
        self.dir = os.path.join(save_dir, "checkpoints")
        self.module, self.optimizers, self.scheduler, self.env = module, optimizers, scheduler, env
        self.every_n, self.max_to_keep = every_n, max_to_keep
        self._signal: int | None = None
        if env.is_main:
            os.makedirs(self.dir, exist_ok=True)
            for entry in os.listdir(self.dir):
                if entry.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)
        dist.barrier()

    # -- state ---------------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        return {id(p): clean_name(n) for n, p in self.module.named_parameters()}

    def _tensor_state(self) -> dict:
        state = {"model": model_state(self.module)}
        fused = getattr(self.module, "fused_optimizer", None)
        if fused is not None:
            state["fused"] = fused.state_dict()["state"]
        names = self._param_names()
        for key, optimizer in self.optimizers.items():
            state[f"optim/{key}"] = {
                names[id(p)]: dict(optimizer.state[p])
                for group in optimizer.param_groups
                for p in group["params"]
                if p in optimizer.state
            }
        return state

    @staticmethod
    def _nonempty(state: dict) -> dict:
        # DCP stores an empty dict as a leaf of its own, which a rank holding no shard of that part
        # (e.g. no fused table with optimizer state) would then miss on load.
        pruned = {}
        for key, value in state.items():
            if isinstance(value, dict):
                value = Checkpointer._nonempty(value)
                if not value:
                    continue
            pruned[key] = value
        return pruned

    def latest_step(self) -> int | None:
        steps = complete_steps(self.dir)
        return steps[-1] if steps else None

    # -- save ----------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        """A SIGTERM/SIGINT arrived on this rank (see install_signal_handlers)."""
        return self._signal is not None

    def maybe_save(
        self,
        step: int,
        extra: dict,
        before_save: Callable[[int], None] | None = None,
        stop: bool | None = None,
    ) -> bool:
        """Save when `step` is a multiple of every_n or a signal arrived (then exit via Preempted).

        `before_save(step)` runs on every rank just before a save (the loop checks its losses there).
        `stop`: whether any rank has a stop request, when the caller already agreed on it (the train loop
        does, overlapped with compute); None: agree here (one tiny all_reduce).
        """
        if stop is None:
            stop = any_rank_true(self.stop_requested, self.env)
        if (step % self.every_n == 0 or stop) and self.latest_step() != step:
            if before_save is not None:
                before_save(step)
            self.save(step, extra)
        if stop:
            logger.info("stopping after the checkpoint of step %d (signal)", step)
            raise Preempted(0)
        return step % self.every_n == 0

    def save(self, step: int, extra: dict) -> None:
        final = os.path.join(self.dir, f"step-{step}")
        tmp = os.path.join(self.dir, f".tmp-step-{step}")
        dcp.save(self._nonempty(self._tensor_state()), checkpoint_id=tmp)
        with open(os.path.join(tmp, f"extra-rank{self.env.rank}.json"), "w") as f:
            json.dump(extra, f)
        dist.barrier()
        if self.env.is_main:
            meta = {
                "step": step,
                "world_size": self.env.world_size,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "param_groups": {
                    k: [{n: v for n, v in g.items() if n != "params"} for g in o.param_groups]
                    for k, o in self.optimizers.items()
                },
            }
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, default=str)
            open(os.path.join(tmp, MARKER), "w").close()
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in complete_steps(self.dir)[: -self.max_to_keep]:
                shutil.rmtree(os.path.join(self.dir, f"step-{old}"), ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        dist.barrier()

    # -- restore -------------------------------------------------------------------------------
    def restore_latest(self) -> tuple[int, dict] | None:
        """Load the newest complete checkpoint of this run: (step, this rank's extra state) or None."""
        step = self.latest_step()
        return None if step is None else (step, self.load(os.path.join(self.dir, f"step-{step}")))

    def load(self, path: str) -> dict:
        """Load everything from checkpoint folder `path`; returns this rank's extra state ({} when the
        world size changed: the reader positions of another rank layout do not apply)."""
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        state = self._tensor_state()
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for key in self.optimizers:
            # A fresh optimizer has no state yet: allocate the saved tensors to load into.
            prefix = f"optim/{key}."
            for full_key, md in saved.items():
                if full_key.startswith(prefix) and hasattr(md, "size"):
                    fqn, _, name = full_key[len(prefix) :].rpartition(".")
                    tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                    state[f"optim/{key}"].setdefault(fqn, {})[name] = tensor
        dcp.load(self._nonempty(state), checkpoint_id=path)
        self.module.load_state_dict(_unclean(self.module, state["model"]))
        fused = getattr(self.module, "fused_optimizer", None)
        if fused is not None and state["fused"]:
            # DCP already copied into the state tensors; this re-checks keys and restores param groups.
            fused_state = fused.state_dict()
            fused_state["state"] = state["fused"]
            fused.load_state_dict(fused_state)
        params = {clean_name(n): p for n, p in self.module.named_parameters()}
        for key, optimizer in self.optimizers.items():
            for fqn, values in state[f"optim/{key}"].items():
                param = params[fqn]
                optimizer.state[param] = {
                    n: v.to(param.device) if n != "step" else v for n, v in values.items()
                }
            for group, saved_group in zip(optimizer.param_groups, meta["param_groups"][key], strict=True):
                group.update({n: v for n, v in saved_group.items() if n in group and n != "params"})
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        logger.info("restored checkpoint %s (step %d)", path, meta["step"])
        extra_path = os.path.join(path, f"extra-rank{self.env.rank}.json")
        if meta["world_size"] != self.env.world_size or not os.path.exists(extra_path):
            logger.warning(
                "checkpoint was saved by %d ranks, this job has %d: reader positions are not restored",
                meta["world_size"],
                self.env.world_size,
            )
            return {}
        with open(extra_path) as f:
            return json.load(f)

    # -- signals -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT set a flag; the next maybe_save() checkpoints on every rank and exits."""

        def handler(signum, _frame):
            self._signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def resolve_checkpoint(path: str) -> str:
    """`path` itself when it is a complete step folder, else the newest complete one inside it (a run's
    `checkpoints/` folder or the run folder)."""
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    for folder in (path, os.path.join(path, "checkpoints")):
        steps = complete_steps(folder)
        if steps:
            return os.path.join(folder, f"step-{steps[-1]}")
    raise FileNotFoundError(f"initial_checkpoint_dir {path!r} holds no complete checkpoint (step-N/{MARKER})")


def warm_start(module: nn.Module, path: str) -> list[str]:
    """Load model weights only from checkpoint `path` (see resolve_checkpoint); optimizer state and step
    are not loaded. Weights that are new or changed shape keep their fresh initialisation; their names
    are logged and returned."""
    path = resolve_checkpoint(path)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    current = model_state(module)
    loadable, fresh = {}, []
    for name, tensor in current.items():
        md = saved.get(f"model.{name}")
        if md is not None and hasattr(md, "size") and tuple(md.size) == tuple(tensor.shape):
            loadable[name] = tensor
        else:
            fresh.append(name)
    dcp.load({"model": loadable}, checkpoint_id=path)
    merged = {**current, **loadable}
    module.load_state_dict(_unclean(module, merged))
    logger.info("warm start from %s: %d tensors loaded", path, len(loadable))
    if fresh:
        logger.info("warm start: freshly initialised (new or changed shape): %s", ", ".join(fresh))
    return fresh


def _unclean(module: nn.Module, cleaned: dict) -> dict:
    """Map cleaned names back to `module`'s own state_dict keys."""
    return {key: cleaned[clean_name(key)] for key in module.state_dict()}
