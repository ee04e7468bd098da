"""The reader's decoding process (decode_process): the stream, counters and CPU of the other modes, idle
priority, no thread in the training process, and every way it can end reported (errors, killed, closed,
its consumer gone). The stream itself is checked with the other modes in test_guarantees.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tml.reader import decode_process
from tml.reader.dataset import build_dataset
from tml.reader.decode_process import DecodingProcess

pytestmark = pytest.mark.unit


def _stream(dataset):
    return [(b.ids["uid"].tolist(), b.labels.tolist(), b.dense["continuous"].tolist()) for b in dataset]


def test_the_process_yields_the_inline_stream_with_its_counters_and_cpu(files, rd):
    def dataset(process):
        config = rd.base_config(
            str(files), num_workers=0, decode_process=process, shuffle={"seed": 2, "buffer_size": 16}
        )
        return build_dataset(config, ["click"])

    inline, process = dataset(False), dataset(True)
    assert process.decoding == "in a separate process" and inline.decoding == "in the training thread"
    assert _stream(process) == _stream(inline)
    assert process.stats == inline.stats
    # The process's CPU time is counted per decoded row, as the threads' is.
    assert process._source.cpu.rows == inline._source.cpu.rows == 72
    assert 0 < process.cpu_seconds_per_batch() < 1.0


def test_a_long_openmp_spin_is_warned_about(files, rd, monkeypatch, reader_log):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    config = rd.base_config(str(files), num_workers=0, decode_process=True)
    build_dataset(config, ["click"])
    assert "start the command with GOMP_SPINCOUNT=10000" in reader_log.text
    reader_log.clear()
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    build_dataset(config, ["click"])
    assert "GOMP_SPINCOUNT" not in reader_log.text


def test_windows_that_find_no_slot_travel_whole(files, rd, monkeypatch):
    def stream(process):
        config = rd.base_config(
            str(files), num_workers=0, decode_process=process, shuffle={"seed": 2, "buffer_size": 16}
        )
        return _stream(build_dataset(config, ["click"]))

    expected = stream(False)
    monkeypatch.setattr(decode_process, "SLOT_BYTES", 256)  # no window fits: each goes through the pipe
    assert stream(True) == expected
    monkeypatch.setattr(decode_process, "SLOT_BYTES", 1 << 20)
    monkeypatch.setattr(decode_process, "SLOTS", 1)  # list() keeps every batch: the one slot stays held
    assert stream(True) == expected


def test_the_process_runs_at_idle_priority_and_ends_on_close(files, rd):
    config = rd.base_config(str(files), num_workers=0, decode_process=True, num_epochs=None)
    before = set(threading.enumerate())
    iterator = iter(build_dataset(config, ["click"]))
    next(iterator)
    worker = iterator._process._process
    assert worker.is_alive() and worker.name == "tml-reader-decode"
    if hasattr(os, "SCHED_IDLE"):
        assert os.sched_getscheduler(worker.pid) == os.SCHED_IDLE
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("tml-reader")]
    iterator.close()
    assert not worker.is_alive()
    with pytest.raises(StopIteration):
        next(iterator)


def test_a_killed_process_is_reported_with_its_exit_code(files, rd):
    config = rd.base_config(str(files), num_workers=0, decode_process=True, num_epochs=None)
    iterator = iter(build_dataset(config, ["click"]))
    next(iterator)
    os.kill(iterator._process._process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"decoding process ended without a result \(exit code -9"):
        for _ in range(10_000):  # the batches it made before it died come first
            next(iterator)


class _NeedsArguments(Exception):
    def __init__(self, what: str, where: int) -> None:
        super().__init__(f"{what} at {where}")


def _fails_unpicklably():
    yield 1
    raise _NeedsArguments("broken", 2)


def test_an_error_that_cannot_travel_arrives_as_text_with_its_traceback():
    items = DecodingProcess(_fails_unpicklably)
    assert next(items)[0] == 1
    with pytest.raises(RuntimeError, match=r"(?s)decoding process failed:.*_NeedsArguments: broken at 2"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)


def test_the_process_ends_when_its_consumer_dies():
    code = (
        "import itertools, os, sys\n"
        "from tml.reader.decode_process import DecodingProcess\n"
        "items = DecodingProcess(itertools.count)\n"
        "next(items)\n"
        "print(items._process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
