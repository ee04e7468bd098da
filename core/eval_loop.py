"""The evaluation loop: forward passes under no_grad in eval mode, ranks kept in step.

Ranks' shares of a validation set can differ in length. `lockstep` keeps them in step (also for predict):
every round one tiny all_reduce tells whether any rank still has a batch; a rank that has run out repeats
a forward on its last batch (outputs dropped, metrics untouched) so that sharded embeddings' all-to-alls
and DDP's collectives see every rank. Outputs
follow docs/design.md (`probabilities`, `labels`, `weights`: [B, T]).

Example:
    results = evaluate(sharded.module, val_batches, metrics, num_steps=None, env=env)
    # {"<task>/auroc": 0.71, ...}, already reduced across ranks
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from tml.core.distributed import DistEnv, any_rank_true
from tml.ml_logging.progress import progress_bar


class EvalMetrics(Protocol):
    def update(self, batch, outputs: dict[str, torch.Tensor]) -> None: ...
    def compute(self) -> dict[str, float]: ...
    def reset(self) -> None: ...


def lockstep(batches: Iterable, env: DistEnv, limit: int | None = None) -> Iterator[tuple[object, bool]]:
    """(batch, real) pairs on `env.device`, the same number on every rank: until every rank's data ends
    (or `limit` rounds). A rank that has run out gets its last batch again with real=False, to run a
    forward whose outputs it drops, so that sharded embeddings' all-to-alls see every rank.

    One tiny all_reduce per round (on the CPU control group) tells whether any rank still has a batch.
    """
    it, last, rounds = iter(batches), None, 0
    try:
        while limit is None or rounds < limit:
            batch = next(it, None)
            if not any_rank_true(batch is not None, env):
                return
            if batch is None and last is None:
                raise RuntimeError(
                    f"rank {env.rank} has no batch while other ranks do: give every rank at least one "
                    "batch (more data files or row groups than ranks, or a smaller batch size)"
                )
            if batch is not None:
                last = batch.to(env.device, non_blocking=True)
            yield last, batch is not None
            rounds += 1
    finally:  # a reader stopped at `limit` (or by a failure) stops its threads now
        close_iterator(it)


def close_iterator(it: Iterator) -> None:
    """Stop an iterator that holds resources (a reader's threads, a generator); others have no `close`."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


@torch.no_grad()
def evaluate(
    module: torch.nn.Module,
    batches: Iterable,
    metrics: EvalMetrics,
    num_steps: int | None,
    env: DistEnv,
    bf16: bool = False,
    desc: str = "eval",
    log_every_n: int = 100,
) -> dict[str, float]:
    """Run up to `num_steps` batches per rank (None or -1: until every rank's data ends).

    Returns `metrics.compute()`; the module's train/eval mode is restored afterwards.
    """
    was_training = module.training
    module.eval()
    metrics.reset()
    limit = None if num_steps is None or num_steps < 0 else num_steps
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    bar = progress_bar(limit, desc, env.rank)
    for rounds, (batch, real) in enumerate(lockstep(batches, env, limit), start=1):
        with autocast:
            _, outputs = module(batch)
        if real:
            metrics.update(batch, outputs)
        if rounds % log_every_n == 0:
            bar.update(log_every_n)
    bar.close()
    results = metrics.compute()
    module.train(was_training)
    return results
