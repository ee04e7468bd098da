"""The test launcher itself: a port taken between picking and binding is retried on a new port."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.distributed


def _rank_and_size() -> tuple[int, int]:
    from tml.core.distributed import init_distributed, shutdown

    env = init_distributed("gloo", "cpu")
    result = (env.rank, env.world_size)
    shutdown()
    return result


def test_port_taken_before_bind_is_retried(run_ranks, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        real_free_port = run_ranks.__globals__["free_port"]
        picked: list[int] = []

        def busy_then_free() -> int:
            picked.append(busy.getsockname()[1] if not picked else real_free_port())
            return picked[-1]

        monkeypatch.setitem(run_ranks.__globals__, "free_port", busy_then_free)
        assert run_ranks(_rank_and_size, 2) == [(0, 2), (1, 2)]
        assert len(picked) == 2  # the launch on the busy port failed and was retried
