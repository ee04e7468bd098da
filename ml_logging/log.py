"""Rank-aware logging on top of the standard `logging` module.

Only rank 0 prints by default; `setup_logging(rank, all_ranks=True)` lets every rank print with a
`[rank N]` prefix. `warn_once` keeps warnings that would repeat every step to a single line.
"""

from __future__ import annotations

import logging
import sys

_ROOT = "tml"
_warned: set[str] = set()


def setup_logging(rank: int = 0, all_ranks: bool = False, level: int | str = logging.INFO) -> None:
    """Configure the `tml` logger hierarchy for this process (idempotent).

    Args:
        rank: this process's rank.
        all_ranks: print on every rank (with a rank prefix) instead of rank 0 only.
        level: logging level for rank 0 (and every rank when `all_ranks`).
    """
    logger = logging.getLogger(_ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if all_ranks else ""
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.propagate = False
    # Other ranks still report errors: a failure on rank 3 must not be invisible.
    logger.setLevel(level if (rank == 0 or all_ranks) else logging.ERROR)


def get_logger(name: str) -> logging.Logger:
    """A logger under the `tml` hierarchy (module names such as `tml.core.train_loop` already are)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process, never again."""
    if message in _warned:
        return
    _warned.add(message)
    logger.warning(message)
