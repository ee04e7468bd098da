"""A process joins one process group of several ranks: a second one could hang (tml.core.distributed)."""

from __future__ import annotations

import pytest


def _join_twice() -> str:
    import torch
    import torch.distributed as dist

    from tml.core.distributed import init_distributed, shutdown

    init_distributed("gloo", "cpu")
    dist.all_reduce(torch.ones(1))
    shutdown()
    try:
        init_distributed("gloo", "cpu")
    except RuntimeError as error:
        return str(error)
    return "joined again"


@pytest.mark.unit
def test_a_rank_that_left_a_group_cannot_join_another(run_ranks):
    messages = run_ranks(_join_twice, 2)
    for rank, message in enumerate(messages):
        assert message.startswith(f"rank {rank} already left a process group of 2 ranks"), message
        assert "one distributed job per process" in message
