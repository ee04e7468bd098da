"""This process's share of the cores, and whether torch's idle OpenMP threads give theirs up soon.

torch's OpenMP threads (libgomp on Linux) spin-wait after each parallel region before they sleep: about
300000 spins by default, long enough to fill the short gaps between a CPU step's ops. Those gaps are all the
reader's decoding process at idle priority gets on a 2-core machine (tml.reader.decode_process), so it
starves at the default spin: an input-bound model trained at 0.87 of a plain loop that way in a probe, at
0.99 with GOMP_SPINCOUNT=10000 (benchmarks/RESULTS.md, "End to end"). libgomp reads the variable once, when torch
loads it, so it must be set before the command starts; the reader warns when it is not
(`spin_wait_is_short`). Nothing here imports torch.

Example:
    GOMP_SPINCOUNT=10000 <training command> ...   # then spin_wait_is_short() is True
"""

from __future__ import annotations

import os

SHORT_SPIN = 10000  # GOMP_SPINCOUNT measured with the decoding process (benchmarks/RESULTS.md, "End to end")


def env_int(name: str, default: int) -> int:
    """Environment variable `name` as an int, `default` when it is unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def cpu_share() -> int:
    """This process's share of the usable cores: they are split between the LOCAL_WORLD_SIZE processes of
    this machine (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(env_int("LOCAL_WORLD_SIZE", 1), 1))


def spin_wait_is_short() -> bool:
    """Whether torch's idle OpenMP threads were started to sleep soon: OMP_WAIT_POLICY=passive, or a
    GOMP_SPINCOUNT of at most SHORT_SPIN (as read when torch loaded libgomp, if nothing changed it since)."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    try:
        return int(os.environ["GOMP_SPINCOUNT"]) <= SHORT_SPIN
    except (KeyError, ValueError):
        return False
