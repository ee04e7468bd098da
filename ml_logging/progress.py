"""Progress reporting for long loops: a tqdm bar on a terminal (rank 0), plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time

from tml.ml_logging.log import get_logger

logger = get_logger(__name__)


class _PlainProgress:
    """Logs `desc: n/total (rate/s) postfix` at most every `interval_s` seconds."""

    def __init__(self, total: int | None, desc: str, interval_s: float) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, **postfix: float) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s or (self.total is not None and self.n >= self.total):
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            rate = self.n / max(now - self.start, 1e-9)
            extra = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
            logger.info("%s: %d%s (%.1f/s) %s", self.desc, self.n, of, rate, extra)

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _NoProgress:
    def update(self, n: int = 1, **postfix: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, rank: int = 0, interval_s: float = 30.0):
    """Progress for `total` units (None: unknown). Other ranks than 0 report nothing.

    Example:
        bar = progress_bar(1000, "train", rank)
        for step in range(1000):
            bar.update(1, loss=0.3)
        bar.close()
    """
    if rank != 0:
        return _NoProgress()
    if sys.stderr.isatty():
        return _TqdmProgress(total, desc)
    return _PlainProgress(total, desc, interval_s)
