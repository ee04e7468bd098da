"""Background decoding: a driver thread feeds row groups to decoding threads and cuts batches in order.

decode threads (num_workers)  ->  driver thread (windows, shuffling, batching)  ->  bounded queue  ->  consumer
Row groups are decoded in parallel (pyarrow releases the GIL) but consumed in plan order, so the stream is
deterministic. What a row is stays the decoder's business (tml.reader.decoder): the threads only read its
columns, call `decode`, cut, permute and join chunks with their row operations and call `to_batch`. At most about 2 x num_workers row groups, one shuffle window and `prefetch_batches` batches
are held at a time. An exception in any thread reaches the consumer, with the file named in its message.
The threads reference neither the iterator nor the dataset, so closing or dropping the iterator stops them;
iterators still open at interpreter exit are closed by an atexit hook (a daemon thread inside a torch op
when the interpreter finalizes can abort the process: "terminate called without an active exception").
Each reader thread runs its torch ops on one OpenMP thread (tml.reader.torch_threads).
The CPU time they use (decoding, shuffling, batching) is summed in `Source.cpu`: a training process sizes
torch's threads by it (tml.core.cpu_threads).

Example:
    it = BatchIterator(source, start_epoch=0, skip_rows=0, stats={}, on_batch=lambda: None)
    batch = next(it)
    it.close()
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq
import torch

from tml.reader.decoder import Chunk, DataError, Decoder, location
from tml.reader.fs import open_input
from tml.reader.sharding import EpochPlan, Unit, Window, window_permutation
from tml.reader.torch_threads import use_one_torch_thread

_END = object()
_POLL_S = 0.1


@dataclasses.dataclass
class _Failure:
    error: BaseException


class CpuMeter:
    """CPU seconds the reader's threads have used (each adds its own thread time) and rows decoded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds, self.rows = 0.0, 0

    def add(self, seconds: float, rows: int = 0) -> None:
        with self._lock:
            self.seconds += seconds
            self.rows += rows


@dataclasses.dataclass(frozen=True)
class Source:
    """What the threads need: files, their footers, the decoder and the epoch schedule (flat data)."""

    fs: object
    paths: tuple[str, ...]
    metadata: tuple[pq.FileMetaData | None, ...]
    decoder: Decoder
    batch_size: int
    num_epochs: int | None
    plan_epoch: Callable[[int], EpochPlan]
    num_workers: int
    prefetch_batches: int
    cpu: CpuMeter = dataclasses.field(default_factory=CpuMeter)


def decode_unit(source: Source, unit: Unit) -> tuple[Chunk, dict[str, int]]:
    start = time.thread_time()
    result = _decode(source, unit)
    source.cpu.add(time.thread_time() - start, result[0].num_rows)
    return result


def _decode(source: Source, unit: Unit) -> tuple[Chunk, dict[str, int]]:
    path = source.paths[unit.file]
    try:
        with open_input(source.fs, path) as handle:
            parquet = pq.ParquetFile(handle, metadata=source.metadata[unit.file])
            # Decoded in this thread: the reader's parallelism is num_workers row groups at a time (pyarrow's
            # own pool would add threads competing with them and with torch's, and hide their CPU time).
            table = parquet.read_row_group(
                unit.row_group, columns=source.decoder.columns(), use_threads=False
            )
        return source.decoder.decode(table, path, unit.row_group)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{location(path, unit.row_group)}: cannot decode: {error}") from error


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _result(future: concurrent.futures.Future, stop: threading.Event) -> tuple[Chunk, dict] | None:
    """The future's (chunk, counters), or None once `stop` is set (a long decode must not delay closing)."""
    while not stop.is_set():
        try:
            return future.result(timeout=_POLL_S)
        except TimeoutError:
            continue
    return None


def _windows(source: Source, start_epoch: int, skip_rows: int) -> Iterator[tuple[Window | None, int]]:
    """(window, rows to drop from its front) in stream order; (None, 0) marks the end of an epoch."""
    epoch = start_epoch
    while source.num_epochs is None or epoch < source.num_epochs:
        for window in source.plan_epoch(epoch).windows:
            if window.start_row + window.num_rows <= skip_rows:
                continue
            yield window, max(0, skip_rows - window.start_row)
        yield None, 0
        epoch, skip_rows = epoch + 1, 0


def _drive(source: Source, start_epoch: int, skip_rows: int, out, stop, stats: dict) -> None:
    use_one_torch_thread()  # the reader's torch ops must not run OpenMP teams beside the training's
    pool = concurrent.futures.ThreadPoolExecutor(
        source.num_workers, thread_name_prefix="tml-reader-decode", initializer=use_one_torch_thread
    )
    pending: collections.deque = collections.deque()
    held: list[Chunk] = []
    held_rows = 0
    clock = [time.thread_time()]  # this thread's CPU time; waiting on queues and futures adds none

    def count_cpu() -> None:
        now = time.thread_time()
        source.cpu.add(now - clock[0])
        clock[0] = now

    def emit(rows: int) -> bool:
        nonlocal held, held_rows
        count_cpu()
        parts, taken = [], 0
        while taken < rows:
            chunk = held[0]
            need = rows - taken
            if chunk.num_rows <= need:
                parts.append(held.pop(0))
                taken += chunk.num_rows
            else:
                parts.append(chunk.slice(0, need))
                held[0] = chunk.slice(need, chunk.num_rows)
                taken = rows
        held_rows -= rows
        return _put(out, source.decoder.to_batch(parts[0].concat(parts)), stop)

    try:
        work = _windows(source, start_epoch, skip_rows)
        exhausted = False
        while not stop.is_set():
            in_flight = sum(len(futures) for _, _, futures in pending)
            while not exhausted and (not pending or in_flight < 2 * source.num_workers):
                window, drop = next(work, (_END, 0))
                if window is _END:
                    exhausted = True
                    break
                futures = [pool.submit(decode_unit, source, unit) for unit in window.units] if window else []
                pending.append((window, drop, futures))
                in_flight += len(futures)
            if not pending:
                _put(out, _END, stop)
                return
            window, drop, futures = pending.popleft()
            if window is None:  # end of an epoch: the rank's last, smaller batch
                if held_rows and not emit(held_rows):
                    return
                continue
            chunks = []
            for future in futures:
                result = _result(future, stop)
                if result is None:
                    return
                chunk, counts = result
                chunks.append(chunk)
                stats["rows_read"] += chunk.num_rows
                for key, count in counts.items():
                    stats[key] = stats.get(key, 0) + count
            block = chunks[0].concat(chunks)
            permutation = window_permutation(window)
            if permutation is not None:
                block = block.take(torch.from_numpy(permutation))
            if drop:
                block = block.slice(drop, block.num_rows)
            held.append(block)
            held_rows += block.num_rows
            while held_rows >= source.batch_size:
                if not emit(source.batch_size):
                    return
    except BaseException as error:
        _put(out, _Failure(error), stop)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        count_cpu()


_OPEN: weakref.WeakSet = weakref.WeakSet()  # BatchIterators not closed yet


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN):
        iterator.close()


class BatchIterator:
    """Iterator of the decoder's batches produced by background threads; `close()` (or GC) stops them."""

    def __init__(
        self,
        source: Source,
        start_epoch: int,
        skip_rows: int,
        stats: dict,
        on_batch: Callable[[], None],
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=source.prefetch_batches)
        self._stop = threading.Event()
        self._on_batch = on_batch
        self._done = False
        self._thread = threading.Thread(
            target=_drive,
            args=(source, start_epoch, skip_rows, self._queue, self._stop, stats),
            name="tml-reader-driver",
            daemon=True,
        )
        self._thread.start()
        _OPEN.add(self)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the reader's driver thread ended without a result") from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._on_batch()
        return item

    def close(self) -> None:
        """Stop the threads and drop the batches still queued."""
        self._done = True
        self._stop.set()
        _OPEN.discard(self)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        if not self._done:
            self.close()
