"""`tml-torchrun`: torchrun, with the same arguments, whose exit status on SIGTERM / SIGINT is the workers'.

torchrun treats a SIGTERM or SIGINT sent to torchrun itself (what a scheduler or Ctrl-C does) as a failure:
its handler raises `SignalException`, it forwards the signal to the workers, waits for them and then exits 1
with that exception's traceback, whatever the workers did. The workers of a tml run take that signal as a
request to stop (core/checkpoint.py): every rank saves a checkpoint at the next step and exits 0. Under plain
torchrun a routine preemption therefore reads as a crash.

This launcher runs torchrun's own agent in this process. The first SIGTERM / SIGINT it receives is forwarded to
its workers and the agent keeps watching them, so it finishes like any run: status 0 when every worker saved
and exited 0, torchrun's failure report otherwise. A second signal falls back to torchrun's handling (forward,
wait `--shutdown-timeout`, kill). A signal sent to one worker needs no launcher: the ranks agree to stop, save
and exit 0, and so does torchrun.

Example (any entry point torchrun takes):
    tml-torchrun --nproc_per_node=8 -m <project entry module> train --config X.yaml
    python -m tml.core.launch --nproc_per_node=2 -m <project entry module> train --config X.yaml
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence

FORWARDED = (signal.SIGTERM, signal.SIGINT)


def _forward_first_signal(context) -> None:
    """Replace torchrun's handlers (just installed by `context.start()`) by one that forwards the signal to the
    workers once and restores torchrun's handlers for any later signal."""
    from torch.distributed.elastic.multiprocessing import api

    def forward(signum: int, _frame) -> None:
        for sig in FORWARDED:
            signal.signal(sig, api._terminate_process_handler)
        name = signal.Signals(signum).name
        print(
            f"tml-torchrun: {name} forwarded to the workers; they save a checkpoint and stop (send it again to "
            "stop them without waiting)",
            file=sys.stderr,
            flush=True,
        )
        for pid in context.pids().values():
            with contextlib.suppress(ProcessLookupError):  # that worker has already exited
                os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)


def main(argv: Sequence[str] | None = None) -> None:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing import api

    start = api.PContext.start

    def start_and_forward(context) -> None:
        start(context)
        if threading.current_thread() is threading.main_thread():
            _forward_first_signal(context)

    api.PContext.start = start_and_forward
    try:
        run.main(list(sys.argv[1:] if argv is None else argv))
    finally:
        api.PContext.start = start


if __name__ == "__main__":
    main()
