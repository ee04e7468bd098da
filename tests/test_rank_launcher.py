"""The test suite's rank launcher (tests/conftest.py): what a failing or hanging rank reports."""

from __future__ import annotations

import time

import pytest


def _sleep_on_rank_one(seconds: float) -> int:
    import os

    rank = int(os.environ["RANK"])
    if rank == 1:
        time.sleep(seconds)
    return rank


def _fail_on_rank_one() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("rank one's own error")


@pytest.mark.unit
def test_a_hang_reports_where_each_running_rank_is(run_ranks):
    with pytest.raises(TimeoutError) as raised:
        run_ranks(_sleep_on_rank_one, 2, 60.0, timeout=2.0)
    message = str(raised.value)
    assert "ranks still running after 2.0 s" in message
    assert "--- rank 0 (exit 0) ---" in message and "--- rank 1 (running) ---" in message
    assert "in _sleep_on_rank_one" in message  # rank 1's Python stack


@pytest.mark.unit
def test_a_failing_rank_reports_its_error(run_ranks):
    with pytest.raises(AssertionError, match="rank one's own error"):
        run_ranks(_fail_on_rank_one, 2)
    assert run_ranks(_sleep_on_rank_one, 2, 0.0) == [0, 1]
