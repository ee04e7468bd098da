"""Process-group setup: the only place that reads torchrun's environment.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) this joins the job's process
group; alone, it creates a one-rank group on an in-memory store, so that sharding, collectives and
checkpoints take the same code path in both cases. CUDA uses NCCL and `cuda:LOCAL_RANK`; CPU uses gloo.

Example:
    env = init_distributed(backend="auto", device="auto")
    run_distributed(lambda: train(env))  # logs a failure with rank + traceback, exits non-zero
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tml.core.cores import cpu_share, env_int
from tml.core.errors import is_user_error
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # Processes on this machine (torchrun's LOCAL_WORLD_SIZE); world_size // local_world_size hosts.
    local_world_size: int = 1
    # Group for the loop's yes/no agreements (data left, stop requested): gloo on CPU tensors, so that
    # they never synchronise the GPU stream. None means the default group (already gloo).
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_hosts(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join (or create) the process group and pick this rank's device.

    A process joins one group of several ranks in its life: after `shutdown` it cannot join another (see
    `_left_a_group`); a single rank can.

    Args:
        backend: auto | gloo | nccl (auto: nccl on cuda, gloo on cpu).
        device: auto | cpu | cuda.
        timeout_s: how long a collective waits for other ranks before failing (no silent hangs).
    """
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", rank)
    torch_device = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and torch_device.type != "cuda":
        raise ValueError("backend 'nccl' needs a CUDA device")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if world_size > 1 and _left_a_group:
            raise RuntimeError(
                f"rank {rank} already left a process group of {world_size} ranks in this process; joining "
                "a new one through the same MASTER_ADDR/MASTER_PORT can meet ranks still in the old one and "
                "hang: run one distributed job per process (one run_distributed call, as the commands do)"
            )
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # One process without torchrun: an in-memory store needs no port.
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(**kwargs)
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    world = dist.get_world_size()
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    if local_world < 1 or world % local_world:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world} does not divide the world size {world}")
    # torchrec reads the ranks per host itself (its sharded tables' state and process groups); without
    # torchrun (one process, or a launcher that sets only RANK/WORLD_SIZE) tell it what was assumed here.
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
    env = DistEnv(
        dist.get_rank(),
        world,
        local_rank,
        torch_device,
        backend,
        local_world_size=local_world,
        control_group=control,
    )
    logger.info(
        "distributed: rank %d of %d on %s (%s, %d host(s))",
        env.rank,
        world,
        env.device,
        backend,
        env.num_hosts,
    )
    return env


def seed_ranks(seed: int, env: DistEnv) -> None:
    """Give each rank its own random stream (dropout, position drop) derived from `seed`.

    Call after the model is built from the shared seed, so weights start equal on every rank while the
    masks applied to each rank's share of the batch differ (the same masks would correlate the ranks'
    gradients). Resume restores each rank's generator state from the checkpoint instead.
    """
    torch.manual_seed(hash_seed(seed, "rank", env.rank))


def hash_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across runs, machines and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def configure_cpu_threads(requested: int | None, reserved: int = 1) -> int:
    """Set torch's intra-op thread count and return it.

    `requested` wins; else OMP_NUM_THREADS (already applied by torch) is kept; else this process's share
    of the usable cores (`cpu_share`) minus `reserved` cores for other busy threads (the data reader), at
    least 1. OpenMP threads that compete with other threads for the same cores wait on each other at every
    parallel region, which costs far more than the thread they add. A training process gives the reserved
    core back once it measures that the reader leaves it idle (tml.core.cpu_threads.ThreadTuner).
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if requested is None:
        requested = max(1, cpu_share() - reserved)
    torch.set_num_threads(requested)
    return requested


# torchrec.distributed.comm keeps the intra- and cross-node groups it creates in these globals and never
# lets them go: after destroy_process_group they would keep those groups' gloo threads running until the
# interpreter's teardown, and a later init_distributed in the same process would get the destroyed ones.
_TORCHREC_GROUP_CACHES = ("_INTRA_PG", "_CROSS_PG", "_INTRA_PG_2D", "_CROSS_PG_2D")


# Set once this process has destroyed a group of several ranks. A rank that leaves first and joins again
# reaches rank 0's old store (same port) before rank 0 has closed it, and both hang (seen in a test that ran
# two calibrations per process), so init_distributed refuses instead.
_left_a_group = False


def shutdown() -> None:
    """Destroy the process groups if any exist, torchrec's cached ones with them (safe to call twice).

    Garbage in reference cycles goes first: a sharded model (its hooks refer back to it) outlives the
    function that trained it, holding its process groups. Left to the interpreter's teardown, their gloo
    threads run until exit and can abort it ("terminate called without an active exception", seen once
    at the end of a finished 2-process training run).
    """
    global _left_a_group
    gc.collect()
    if dist.is_initialized():
        _left_a_group = _left_a_group or dist.get_world_size() > 1
        dist.destroy_process_group()
    comm = sys.modules.get("torchrec.distributed.comm")
    for name in _TORCHREC_GROUP_CACHES:
        if getattr(comm, name, None) is not None:
            setattr(comm, name, None)


def run_distributed(fn: Callable[[], Any]) -> Any:
    """Run `fn`; on an exception log it with this rank and its traceback, tear down, exit 1.

    A user error (`tml.core.errors.is_user_error`: a bad config, bad data, a missing file) is re-raised
    after the teardown instead, for the entry point's `tml.core.cli.user_errors_as_one_line` to report
    in one line. The process group is destroyed in every case so that other ranks' collectives fail
    within the timeout instead of hanging.
    """
    rank = dist.get_rank() if dist.is_initialized() else env_int("RANK", 0)
    try:
        result = fn()
    except SystemExit:
        shutdown()
        raise
    except BaseException as error:  # every failure must be reported with its rank
        if is_user_error(error):
            shutdown()
            raise
        text = "".join(traceback.format_exception(error))
        # Logged at error level: other ranks only print errors, and a failure on rank 3 must show.
        logger.error("rank %d failed:\n%s", rank, text)
        print(f"[rank {rank}] failed: {error!r}", file=sys.stderr, flush=True)
        shutdown()
        sys.exit(1)
    shutdown()
    return result


def any_rank_true(flag: bool, env: DistEnv) -> bool:
    """True when `flag` is true on at least one rank."""
    return bool(_reduce_scalar(1.0 if flag else 0.0, env, dist.ReduceOp.MAX))


def min_over_ranks(value: float, env: DistEnv) -> float:
    """The smallest `value` over all ranks."""
    return _reduce_scalar(value, env, dist.ReduceOp.MIN)


def _reduce_scalar(value: float, env: DistEnv, op) -> float:
    # One tiny all_reduce on the CPU control group (no GPU sync); none on a single rank.
    if env.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=env.control_group)
    return float(tensor.item())
