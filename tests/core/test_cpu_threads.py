"""configure_cpu_threads: the config wins, then OMP_NUM_THREADS, then the process's share of the cores."""

from __future__ import annotations

import os

import pytest
import torch

from tml.core.distributed import configure_cpu_threads

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_requested_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_cpu_threads(2) == 2 and torch.get_num_threads() == 2


def test_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert configure_cpu_threads(None) == 1


@pytest.mark.parametrize(
    ("cores", "local_world", "expected"), [(2, 1, 1), (16, 1, 15), (16, 4, 3), (4, 8, 1)]
)
def test_share_of_cores_minus_the_reader(monkeypatch, cores, local_world, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert configure_cpu_threads(None) == expected and torch.get_num_threads() == expected
