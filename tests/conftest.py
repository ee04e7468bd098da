"""Shared test helpers: launch a function on N local ranks (gloo, CPU) like torchrun would.

`run_ranks(fn, world_size, *args)` starts one fresh Python process per rank with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, loads `fn`'s test file by path (test modules are imported
with --import-mode=importlib and cannot be pickled by name), calls `fn(*args)` and returns every
rank's return value (picklable), rank order. A failing rank raises with its stderr; a hang times out
with every still-running rank's Python stacks (faulthandler, on SIGUSR1) and output.

Example:
    def _check(tmp):              # module level in a test file
        env = init_distributed()  # reads the torchrun-style environment
        return env.rank

    def test_two_ranks(run_ranks, tmp_path):
        assert run_ranks(_check, 2, str(tmp_path)) == [0, 1]
"""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

_CHILD = """
import faulthandler, importlib.util, os, pickle, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hang's report: conftest's _dump_stacks
path, name, args_file, out_file = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("_rank_test_module", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with open(args_file, "rb") as f:
    args = pickle.load(f)
result = getattr(module, name)(*args)
with open(out_file, "wb") as f:
    pickle.dump(result, f)
print("[test child] result written", file=sys.stderr, flush=True)
# As the entry points do (tml.core.distributed.run_distributed): a process group left to interpreter
# teardown can abort the process ("terminate called without an active exception").
if "torch.distributed" in sys.modules:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
# The result is written: skip the interpreter's teardown. A 2-rank child that trained a dozen sharded
# models aborted once in CI ("terminate called without an active exception", no Python traceback, after
# its last model was sharded); what a test checks is its function's result, and the entry points' own
# exit is tested through their commands. The marker line above tells, should it recur, which side it was.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def free_port() -> int:
    """A TCP port free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(fn, world_size: int, *args, timeout: float = 300.0, extra_env: dict | None = None):
    """Run module-level `fn(*args)` on `world_size` fresh processes; return their results.

    The port is free when picked but another process may take it before rank 0's store binds it; such a
    launch is retried on a new port (twice at most). Any other failure raises at once.
    """
    for attempt in range(3):
        try:
            return _launch_once(fn, world_size, args, timeout, extra_env)
        except _PortTaken:
            if attempt == 2:
                raise


class _PortTaken(AssertionError):
    pass


def _launch_once(fn, world_size: int, args: tuple, timeout: float, extra_env: dict | None):
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args_file = os.path.join(tmp, "args.pkl")
        with open(args_file, "wb") as f:
            pickle.dump(args, f)
        procs, log_files = [], []
        for rank in range(world_size):
            env = {
                **os.environ,
                **(extra_env or {}),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            out = os.path.join(tmp, f"out{rank}.pkl")
            cmd = [sys.executable, "-c", _CHILD, inspect.getfile(fn), fn.__name__, args_file, out]
            log_files.append(open(os.path.join(tmp, f"log{rank}.txt"), "wb"))  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, env=env, stdout=log_files[-1], stderr=subprocess.STDOUT))
        try:
            _wait(procs, timeout)
        except TimeoutError as error:
            _dump_stacks(procs)
            logs = [_read(os.path.join(tmp, f"log{rank}.txt")) for rank in range(world_size)]
            tails = "\n".join(_report(r, procs[r], logs[r], 6000) for r in range(world_size))
            raise TimeoutError(f"{error}:\n{tails}") from None
        finally:
            for proc, log_file in zip(procs, log_files, strict=True):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log_file.close()
        logs = [_read(os.path.join(tmp, f"log{rank}.txt")) for rank in range(world_size)]
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            tails = "\n".join(_report(r, procs[r], logs[r], 4000) for r in failed)
            taken = any(
                "EADDRINUSE" in logs[r] or "address already in use" in logs[r].lower() for r in failed
            )
            raise (_PortTaken if taken else AssertionError)(f"ranks {failed} failed:\n{tails}")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"out{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def _report(rank: int, proc: subprocess.Popen, log: str, tail: int) -> str:
    """A rank's state (running or its exit code) and the last `tail` characters of its output."""
    state = "running" if proc.poll() is None else f"exit {proc.returncode}"
    return f"--- rank {rank} ({state}) ---\n{log[-tail:]}"


def _dump_stacks(procs: list[subprocess.Popen], wait: float = 3.0) -> None:
    """Ask every running rank for its threads' Python stacks (written to its log), and give it `wait`
    seconds to write them."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
    time.sleep(wait)


def _wait(procs: list[subprocess.Popen], timeout: float, grace: float = 3.0) -> None:
    """Wait for every process; once one fails, the others get `grace` seconds (they may be blocked on the
    failed one) before the caller kills them. Raises TimeoutError after `timeout`."""
    start, failed_at = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if failed_at is not None and now - failed_at > grace:
            return
        if now - start > timeout:
            raise TimeoutError(f"ranks still running after {timeout} s")
        time.sleep(0.05)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_alone(fn, *args, timeout: float = 900.0, cwd: str | None = None):
    """Run module-level `fn(*args)` in one fresh process outside any torchrun environment (no RANK,
    WORLD_SIZE, MASTER_* variables: as a user runs a command) and return its result. Commands set up and
    tear down a process group, seeds, threads and signal handlers, which must not leak into the test
    runner. A failure raises with the process's output."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    with tempfile.TemporaryDirectory() as tmp:
        args_file, out = os.path.join(tmp, "args.pkl"), os.path.join(tmp, "out.pkl")
        with open(args_file, "wb") as f:
            pickle.dump(args, f)
        cmd = [sys.executable, "-c", _CHILD, inspect.getfile(fn), fn.__name__, args_file, out]
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
        with open(out, "rb") as f:
            return pickle.load(f)


@pytest.fixture
def run_alone():
    """The `launch_alone` helper as a fixture."""
    return launch_alone


@pytest.fixture
def run_ranks():
    """The `launch_ranks` helper as a fixture (test modules cannot import conftest by name)."""
    return launch_ranks


@pytest.fixture
def tcp_port_factory():
    """`free_port` as a fixture: call it for each port a test needs."""
    return free_port
