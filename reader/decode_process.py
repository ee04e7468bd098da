"""A generator run in a forked process at idle priority, its items' tensors handed back in shared memory.

The reader's windows (decoded, joined, shuffled: tml.reader.pipeline) can be made in a separate process so
that the training process only cuts batches from them. On a 2-core machine the training's OpenMP threads
then own both cores, and the decoding process, scheduled as SCHED_IDLE, runs in the gaps they leave between
parallel regions, without sharing the training's GIL or allocator. It needs torch's OpenMP threads to
sleep soon when idle (tml.core.cores): at libgomp's default spin they fill those gaps and the process
starves. It is an option, not a default: the short spin it needs costs the training step by itself (up to 8%
of tml's loop on 2 vCPUs), and end to end it was 6% behind to 2% ahead of decoding in the training thread
for an input-bound model and 5-7% behind for a compute-bound one (benchmarks/RESULTS.md, "End to end",
2026-12-04).

Before forking, the consumer maps SLOTS shared-memory slots of SLOT_BYTES each (anonymous shared mappings,
so both processes see them; pages are committed only when first written). The process pickles each item
with its tensors copied into a free slot (only their offsets, dtypes and shapes go through the pipe), and the
consumer rebuilds them as views of that slot: no copy, and no page faults after a slot's first use (fresh
shared memory per item, as torch.multiprocessing's queues make, cost the consumer ~0.5 ms of page faults
and descriptor passing per batch, most of what decoding in the process saves). A slot goes back to the
process when the consumer's last view of it is freed. When no slot is free and the consumer has taken every
item sent (it holds all the slots and waits for more), or an item does not fit in a slot, the item is sent
whole through the pipe instead: slower, never stuck.

The process is forked (it inherits the generator's arguments, nothing is pickled there), runs torch's ops on
one thread, ignores SIGINT (the training process decides when to stop) and exits when the consumer closes it
or dies. An exception in the process reaches the consumer as the same exception where it can be pickled (the
reader's DataError names the file and row group), else as a RuntimeError holding the process's traceback; a
process that dies without one (killed, out of memory) is reported with its exit code.

Example:
    items = DecodingProcess(lambda: iter(range(3)))
    [item for item, cpu_seconds in items]  # [0, 1, 2]
    items.close()
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tml.reader.torch_threads import use_one_torch_thread

SLOTS = 4
SLOT_BYTES = 256 << 20  # address space; only the pages a window writes are committed
_ALIGN = 64
_POLL_S = 0.1


class _TooBig(Exception):
    pass


class _Orphaned(Exception):
    pass


class _SlotPickler(pickle.Pickler):
    """Pickles an item with its tensors' bytes written into `slot` (only where they are goes in the pickle)."""

    def __init__(self, file, slot: mmap.mmap) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.slot, self.used = slot, 0

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        flat = obj.detach().contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + size > len(self.slot):
            raise _TooBig
        if size:
            target = torch.frombuffer(self.slot, dtype=torch.uint8, count=size, offset=start)
            target.view(flat.dtype).copy_(flat)
        self.used = start + size
        return start, obj.dtype, tuple(obj.shape)


class _SlotUnpickler(pickle.Unpickler):
    """Rebuilds the tensors of a _SlotPickler pickle as views of `base` (a byte tensor over the slot)."""

    def __init__(self, file, base: torch.Tensor) -> None:
        super().__init__(file)
        self.base = base

    def persistent_load(self, pid: Any) -> torch.Tensor:
        start, dtype, shape = pid
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self.base[start : start + size].view(dtype).view(shape)


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError with its traceback as text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        text = "".join(traceback.format_exception(error))
        return RuntimeError(f"the reader's decoding process failed:\n{text}")


def _idle_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # not Linux: the lowest priority there is
        os.nice(19)


def _serve(produce: Callable[[], Iterator[Any]], slots: list[mmap.mmap], items, back, parent: int) -> None:
    """The forked process: each item of `produce()` sent with the CPU seconds this process spent on it (the
    consumer meters the reader's CPU), then the end; slots come back through `back`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _idle_priority()
    use_one_torch_thread()
    free, sent, taken = set(range(len(slots))), 0, 0

    def hear(timeout: float) -> None:
        nonlocal taken
        while back.poll(timeout):
            kind, index = back.recv()
            if kind == "free":
                free.add(index)
            else:
                taken += 1
            timeout = 0

    def slot() -> int | None:
        hear(0)
        while not free:
            if taken == sent:  # the consumer holds every slot and waits for this item
                return None
            if os.getppid() != parent:
                raise _Orphaned
            hear(_POLL_S)
        return free.pop()

    def send(item: Any) -> None:
        nonlocal sent
        index = slot()
        if index is not None:
            buffer = io.BytesIO()
            try:
                _SlotPickler(buffer, slots[index]).dump(item)
            except _TooBig:
                free.add(index)
                index = None
        payload = buffer.getvalue() if index is not None else pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        items.send(("item", index, payload))
        sent += 1

    try:
        start = time.process_time()
        for item in produce():
            now = time.process_time()
            send((item, now - start))
            start = now
        items.send(("end", None, None))
    except (_Orphaned, BrokenPipeError):
        return
    except BaseException as error:
        items.send(("failed", None, _portable(error)))
    # Stay until the consumer closes this process (or is gone): it may still be reading.
    while os.getppid() == parent:
        time.sleep(_POLL_S)


class DecodingProcess:
    """Iterator of (item, CPU seconds) made by `produce()` in a forked idle-priority process; `close()` (or
    GC) ends that process."""

    def __init__(self, produce: Callable[[], Iterator[Any]]) -> None:
        context = multiprocessing.get_context("fork")
        self._slots = [mmap.mmap(-1, SLOT_BYTES) for _ in range(SLOTS)]
        self._items, items = context.Pipe(duplex=False)
        back, self._back = context.Pipe(duplex=False)
        self._lock = threading.Lock()  # slots are given back by whichever thread frees their last view
        self._process = context.Process(
            target=_serve,
            args=(produce, self._slots, items, back, os.getpid()),
            name="tml-reader-decode",
            daemon=True,
        )
        with warnings.catch_warnings():  # Python >= 3.12 warns about forking a threaded process: the
            warnings.simplefilter("ignore", DeprecationWarning)  # child takes no lock another thread held
            self._process.start()
        items.close()  # the process's ends: its death closes the pipe here
        back.close()
        self._done = False

    def __iter__(self) -> DecodingProcess:
        return self

    def __next__(self) -> tuple[Any, float]:
        if self._done:
            raise StopIteration
        try:
            kind, index, payload = self._items.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if kind == "end":
            self.close()
            raise StopIteration
        if kind == "failed":
            self.close()
            raise payload
        self._tell(("taken", None))
        if index is None:
            return pickle.loads(payload)
        view = np.frombuffer(self._slots[index], dtype=np.uint8)  # the views' storage keeps it alive
        weakref.finalize(view, self._tell, ("free", index))
        return _SlotUnpickler(io.BytesIO(payload), torch.from_numpy(view)).load()

    def _tell(self, message: tuple) -> None:
        with self._lock:
            if self._done:
                return
            with contextlib.suppress(OSError):  # the process is gone: nothing waits for the slot
                self._back.send(message)

    def _died(self) -> RuntimeError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        self.close()
        return RuntimeError(
            f"the reader's decoding process ended without a result (exit code {code}; a negative code is "
            "the signal that killed it, -9 often the out-of-memory killer)"
        )

    def close(self) -> None:
        """End the process (it holds nothing the consumer needs); the slots go when their last view does."""
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)
        self._items.close()
        self._back.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True) and sys is not None:
            self.close()
