"""What a checkpoint holds, each part a `Stateful` (`state_dict()` / `load_state_dict()`), as in torchtitan.

Job-wide parts (the same on every rank, or sharded tensors that DCP cuts and re-cuts):
- `ModelState`: the model's weights, names without wrapper prefixes (the same at every world size).
- `OptimizerState`: an ordinary torch optimizer through `torch.distributed.checkpoint.state_dict`, which maps
  parameters to names and, on load, goes through the optimizer's own `load_state_dict`, so every state
  tensor lands on the device and dtype the optimizer expects (fused CUDA Adam wants `step` on the GPU).
- `FusedOptimizerState`: torchrec's fused (in-backward) table optimizers; their state tensors are the FBGEMM
  kernel's own, loaded in place.
- `SchedulerState`, `LoopState` (the optimizer step and the batches trained).

Per-rank parts (`RankState`: JSON-serialisable plain data, one copy per rank): the data position
(`DataState`) and the random generators (`RngState`). When the world size changes they are handed the
states of all old ranks and decide for themselves (see `load_resharded`).

Example:
    states = {"model": ModelState(module), "optim/dense": OptimizerState(sharded.state_module, optimizer)}
    rank_states = {"data": DataState(dataset, loop), "rng": RngState(seed, env)}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from tml.core.distributed import DistEnv, hash_seed
from tml.core.sharding import clean_name
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


def model_state(module: nn.Module) -> dict[str, Any]:
    """The module's state_dict with names free of DMP/DDP prefixes."""
    return {clean_name(k): v for k, v in module.state_dict().items()}


def load_model_state(module: nn.Module, cleaned: dict[str, Any], strict: bool = True) -> None:
    """Load a `model_state`-named dict into `module` (its own wrapper prefixes restored)."""
    own = {clean_name(key): key for key in module.state_dict()}
    module.load_state_dict(
        {own[name]: value for name, value in cleaned.items() if name in own}, strict=strict
    )


class ModelState:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return model_state(self.module)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_model_state(self.module, state)


class OptimizerState:
    """An ordinary torch optimizer over parameters of `model` (pass `ShardedModel.state_module`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Flat keys (`state.<param>.<name>`) make every tensor its own checkpoint entry.
        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options())


class FusedOptimizerState:
    """torchrec's KeyedOptimizer of the fused tables (`DistributedModelParallel.fused_optimizer`)."""

    def __init__(self, fused) -> None:
        self.fused = fused

    def state_dict(self) -> dict[str, Any]:
        # Only the state tensors: the param groups (constant table learning rates) come from the config.
        return self.fused.state_dict()["state"]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = self.fused.state_dict()
        full["state"] = state
        self.fused.load_state_dict(full)


class SchedulerState:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


@dataclasses.dataclass
class LoopState:
    """The training loop's counters: optimizer steps taken and batches trained on (from the stream's start)."""

    step: int = 0
    batches_trained: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "batches_trained": self.batches_trained}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.batches_trained = int(state["step"]), int(state["batches_trained"])


class RankState(Protocol):
    """A per-rank part of a checkpoint; states are JSON-serialisable plain data."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Resume with another world size, from the states of every old rank (old rank order)."""
        ...


class DataState:
    """The reader position of this rank: where the stream continues after the batches trained so far.

    The loop prefetches batches it has not trained on yet, so the position comes from the loop's count, not
    from what the reader has yielded.
    """

    def __init__(self, dataset, loop: LoopState) -> None:
        self.dataset, self.loop = dataset, loop

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(self.loop.batches_trained)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        self.dataset.load_state_dict(states[0], all_states=states)


class RngState:
    """This rank's torch generators (CPU, and CUDA when used), so dropout masks continue exactly on resume."""

    def __init__(self, seed: int, env: DistEnv, loop: LoopState) -> None:
        self.seed, self.env, self.loop = seed, env, loop

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state().tolist()}
        if self.env.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.env.device).tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
        if self.env.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), self.env.device)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        # Old ranks' streams do not map onto new ranks; start fresh ones that still differ per rank and step.
        torch.manual_seed(hash_seed(self.seed, "resharded", self.env.rank, self.loop.step))
        logger.info("world size changed: random generators re-seeded from (seed, rank, step)")
