"""configure_cpu_threads: the config wins, then OMP_NUM_THREADS, then the process's share of the cores minus one
for the reader; ThreadTuner gives that core to torch when measuring shows it wins."""

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


class _Machine:
    """A fake clock where a step takes `seconds[threads]`, and torch's thread count as a plain number."""

    def __init__(self, monkeypatch, seconds: dict[int, float], threads: int = 1) -> None:
        self.now, self.seconds, self.threads, self.calls = 0.0, seconds, threads, []
        monkeypatch.setattr(torch, "get_num_threads", lambda: self.threads)
        monkeypatch.setattr(torch, "set_num_threads", self._set)

    def _set(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n

    def clock(self) -> float:
        return self.now

    def train(self, tuner, steps: int) -> None:
        for step in range(1, steps + 1):
            self.train_step(tuner, step)

    def train_step(self, tuner, step: int) -> None:
        tuner.before(step)
        self.now += self.seconds[self.threads]
        tuner.after(step)
        self.now += 10.0  # a checkpoint or evaluation between steps: not step time


def _tuner(machine, reader_s_per_batch: float, share: int = 2):
    from tml.core.cpu_threads import ThreadTuner

    return ThreadTuner(lambda: reader_s_per_batch, share, clock=machine.clock)


def test_a_compute_bound_model_gets_the_readers_core(monkeypatch):
    machine = _Machine(monkeypatch, {1: 1.0, 2: 0.55})
    tuner = _tuner(machine, reader_s_per_batch=0.05)  # 5% of a core at 1 step/s
    machine.train(tuner, 100)
    # warm-up 5, a window of 5 steps (>= 2 s) at 1 thread, 2 settling steps, 10 steps at 2 threads, 2
    # settling steps, 5 more at 1 thread.
    assert tuner.decided == 2 and machine.threads == 2 and machine.calls == [2, 1, 2]
    assert tuner.rates == {1: 1.0, 2: pytest.approx(1 / 0.55)} and tuner.reader_busy == pytest.approx(0.05)


def test_a_busy_reader_keeps_its_core_without_a_trial(monkeypatch):
    machine = _Machine(monkeypatch, {1: 0.02, 2: 0.01})
    tuner = _tuner(machine, reader_s_per_batch=0.012)  # 60% of a core at 50 steps/s
    machine.train(tuner, 400)
    assert tuner.decided == 1 and machine.calls == [1] and 2 not in tuner.rates


def test_the_full_share_must_win_by_the_margin(monkeypatch):
    machine = _Machine(monkeypatch, {1: 1.0, 2: 0.97})  # 3% faster: within the margin
    tuner = _tuner(machine, reader_s_per_batch=0.01)
    machine.train(tuner, 100)
    assert tuner.decided == 1 and machine.calls == [2, 1, 1] and machine.threads == 1


def test_a_speed_that_drifts_over_the_first_steps_weighs_on_both_counts_alike(monkeypatch):
    # 2 threads are 3% faster (within the margin: 1 thread stays), but every step is 1% faster than the
    # one before: measured one window after the other, 2 threads would look 9% faster and win.
    machine = _Machine(monkeypatch, {1: 1.0, 2: 0.97})
    base = dict(machine.seconds)
    tuner = _tuner(machine, reader_s_per_batch=0.01)
    for step in range(1, 41):
        machine.seconds = {n: seconds * (1.3 - 0.01 * step) for n, seconds in base.items()}
        machine.train_step(tuner, step)
    assert tuner.decided == 1 and machine.threads == 1
    assert tuner.rates[2] / tuner.rates[1] == pytest.approx(1 / 0.97)


def test_the_tuner_runs_only_when_threads_are_automatic(monkeypatch):
    from tml.core.cpu_threads import ThreadTuner, thread_tuner
    from tml.core.distributed import DistEnv

    class Data:
        def cpu_seconds_per_batch(self):
            return 0.01

    cpu, cuda = (DistEnv(0, 1, 0, torch.device(kind), "gloo") for kind in ("cpu", "cuda"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    torch.set_num_threads(1)
    assert isinstance(thread_tuner(None, cpu, Data()), ThreadTuner)
    assert thread_tuner(1, cpu, Data()) is None  # training.num_threads set
    assert thread_tuner(None, cuda, Data()) is None
    assert thread_tuner(None, cpu, Data(), compiled=True) is None  # training.compile=dense
    assert thread_tuner(None, cpu, object()) is None  # data that does not report its cost
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one core per process: nothing to give
    assert thread_tuner(None, cpu, Data()) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_tuner(None, cpu, Data()) is None


@pytest.mark.parametrize("where", ["in the training thread", "in a separate process"])
def test_a_reader_decoding_outside_its_threads_leaves_torch_the_whole_share(monkeypatch, where):
    from tml.core.cpu_threads import thread_tuner
    from tml.core.distributed import DistEnv

    class Data:
        decoding = where

        def cpu_seconds_per_batch(self):
            return 0.01

    machine = _Machine(monkeypatch, {1: 1.0, 2: 0.9})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cpu = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    assert thread_tuner(1, cpu, Data()) is None and machine.threads == 1  # training.num_threads set
    assert thread_tuner(None, cpu, Data()) is None  # nothing to measure
    assert machine.threads == 2


def test_auto_decoding(monkeypatch):
    from tml.reader.pipeline import resolve_decoding

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cores, expected in ((1, (0, False)), (2, (0, False)), (3, (2, False)), (16, (2, False))):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert resolve_decoding(None, None) == expected
        assert resolve_decoding(None, False) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 16 cores, 8 processes: 2 each
    assert resolve_decoding(None, None) == (0, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_decoding(None, None) == (2, False)
    # What is set wins.
    assert resolve_decoding(0, None) == (0, False) and resolve_decoding(3, None) == (3, False)
    assert resolve_decoding(None, True) == (0, True) and resolve_decoding(0, True) == (0, True)
    with pytest.raises(ValueError, match="num_workers 2 with decode_process"):
        resolve_decoding(2, True)


def test_the_openmp_spin_counts_as_short_when_set_so(monkeypatch):
    from tml.core.cores import spin_wait_is_short

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    assert not spin_wait_is_short()
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert spin_wait_is_short()
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert not spin_wait_is_short()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert spin_wait_is_short()
