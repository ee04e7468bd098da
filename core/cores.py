"""This process's share of the cores, and how long torch's idle OpenMP threads hold theirs (no torch import).

torch's OpenMP threads (libgomp on Linux) spin-wait after each parallel region before they sleep: about
300000 spins by default, long enough to fill the short gaps between a CPU step's ops. Those gaps are all a
decoding process at idle priority gets on a 2-core machine (tml.reader.decode_process), so it starves at
the default spin: local.yaml trained at 0.87 of a plain loop that way, at 0.99 with GOMP_SPINCOUNT=10000
(benchmarks/RESULTS.md, "End to end"). libgomp reads the variable once, when torch loads it, so a command
that may use that process sets it first thing (`shorten_spin_wait`), and the reader picks the process
automatically only when the spin in effect is that short (`spin_wait_is_short`).

Example (an entry module, before anything imports torch):
    from tml.core import cores
    cores.shorten_spin_wait()
"""

from __future__ import annotations

import os
import sys

SHORT_SPIN = 10000  # GOMP_SPINCOUNT measured with the decoding process (benchmarks/RESULTS.md, "End to end")
SHORT_SPIN_CORES = 2  # the share of cores where it was measured, and where the decoding process is automatic


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


def shorten_spin_wait() -> bool:
    """Set GOMP_SPINCOUNT to SHORT_SPIN where the decoding process may be picked (Linux, a share of
    SHORT_SPIN_CORES cores) and nothing decided the wait yet: torch not loaded, neither GOMP_SPINCOUNT nor
    OMP_WAIT_POLICY set by the user. True when it was set."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    if cpu_share() != SHORT_SPIN_CORES:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SHORT_SPIN)
    return True


def spin_wait_is_short() -> bool:
    """Whether torch's idle OpenMP threads were started to sleep soon: OMP_WAIT_POLICY=passive, or a
    GOMP_SPINCOUNT of at most SHORT_SPIN (as read when torch loaded libgomp, if nothing changed it since)."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    try:
        return int(os.environ["GOMP_SPINCOUNT"]) <= SHORT_SPIN
    except (KeyError, ValueError):
        return False
