"""Decoding row groups into batches, in background threads, in the consuming thread or in a separate process.

num_workers >= 1:  decode threads  ->  driver thread (windows, shuffling, batching)  ->  bounded queue  ->  consumer
num_workers = 0:   the consumer's next() decodes a window when it reaches it, then cuts its batches
decode_process:    a forked process makes the windows (tml.reader.decode_process), the consumer's next() cuts
All run the same two stages, windows (`_blocks`) then batches (`_cut`), so the stream is the same,
deterministic, every way: row groups are decoded in parallel (pyarrow releases the GIL) but consumed in plan order. What a row is stays the
decoder's business (tml.reader.decoder): the reader only reads its columns, calls `decode`, cuts, permutes
and joins chunks with their row operations and calls `to_batch`. At most about 2 x num_workers row groups
(one with num_workers = 0), one shuffle window and `prefetch_batches` batches are held at a time. An
exception reaches the consumer with the file named in its message. The threads reference neither the
iterator nor the dataset, so closing or dropping the iterator stops them; iterators still open at
interpreter exit are closed by an atexit hook (a daemon thread inside a torch op when the interpreter
finalizes can abort the process: "terminate called without an active exception"). Each reader thread runs
its torch ops on one OpenMP thread (tml.reader.torch_threads); inline, they run on the consumer's threads.
The CPU time spent decoding, shuffling and batching is summed in `Source.cpu` (the consumer's only while its
next() decodes): a training process sizes torch's threads by it (tml.core.cpu_threads).

Why decode in the consuming thread: on a machine with no core to spare (up to 2 cores per process, CPU
training) background threads take their CPU from torch's OpenMP threads, which then wait for each other at
every parallel region, and their Python work contends for the GIL: local.yaml trained at 0.82 of a plain
loop on in-memory batches with two decoding threads and at 0.89 decoding between steps, prod.yaml at 0.98
and 0.99 (benchmarks/RESULTS.md, "End to end"). `resolve_num_workers(None)` picks accordingly.

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
import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq
import torch

from tml.core.cores import cpu_share
from tml.reader.decode_process import DecodingProcess
from tml.reader.decoder import Chunk, DataError, Decoder, location
from tml.reader.fs import open_input
from tml.reader.sharding import EpochPlan, Unit, Window, window_permutation
from tml.reader.torch_threads import use_one_torch_thread

AUTO_INLINE_MAX_CORES = 2  # measured on 2 cores (benchmarks/RESULTS.md, "End to end"); not above
BACKGROUND_WORKERS = 2  # decoding threads where auto does not decode inline
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
    decode_process: bool = False
    cpu: CpuMeter = dataclasses.field(default_factory=CpuMeter)


def resolve_decoding(num_workers: int | None, decode_process: bool | None) -> tuple[int, bool]:
    """(decoding threads, whether a separate process decodes) for the reader's settings, None being auto.

    `decode_process` true: the process (only with no threads set). Otherwise a set `num_workers` wins, and
    auto is 0 (the training thread decodes between steps) in a process with at most 2 cores and no CUDA
    device (background threads would take their CPU from torch's OpenMP threads, which wait for each other
    at every parallel region), else BACKGROUND_WORKERS threads. Auto never picks the process: with the short
    OpenMP spin it needs it was not faster end to end (benchmarks/RESULTS.md, "End to end", 2026-12-04)."""
    if decode_process:
        if num_workers:
            raise ValueError(
                f"num_workers {num_workers} with decode_process: the decoding process decodes in one thread"
            )
        return 0, True
    if num_workers is not None:
        return num_workers, False
    inline = cpu_share() <= AUTO_INLINE_MAX_CORES and not torch.cuda.is_available()
    return (0 if inline else BACKGROUND_WORKERS), False


def decode_unit(source: Source, unit: Unit) -> tuple[Chunk, dict[str, int]]:
    """One unit's (chunk, counters), its CPU time added to `source.cpu` (decoding threads)."""
    start = time.thread_time()
    result = _decode(source, unit)
    source.cpu.add(time.thread_time() - start)
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


class _Deferred:
    """A unit decoded when its result is asked for, in the asking thread (num_workers = 0)."""

    def __init__(self, source: Source, unit: Unit) -> None:
        self.source, self.unit = source, unit

    def result(self, timeout: float | None = None) -> tuple[Chunk, dict[str, int]]:
        return _decode(self.source, self.unit)


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _result(future, stop: threading.Event) -> tuple[Chunk, dict] | None:
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


def _blocks(
    source: Source,
    start_epoch: int,
    skip_rows: int,
    submit: Callable[[Unit], Any],
    stop: threading.Event,
) -> Iterator[tuple[Chunk | None, dict[str, int]]]:
    """(block, counters) per window in stream order: its units decoded, joined, permuted and cut at the
    resume point; the counters are the decoder's and `rows_read`. (None, {}) ends an epoch. `submit(unit)`
    returns an object whose `result(timeout)` is the unit's (chunk, counters); up to 2 x num_workers units
    are submitted ahead of the window being made (none with num_workers = 0: each window is decoded when it
    is reached)."""
    pending: collections.deque = collections.deque()
    work = _windows(source, start_epoch, skip_rows)
    exhausted = False
    while not stop.is_set():
        in_flight = sum(len(futures) for _, _, futures in pending)
        while not exhausted and (not pending or in_flight < 2 * source.num_workers):
            window, drop = next(work, (_END, 0))
            if window is _END:
                exhausted = True
                break
            futures = [submit(unit) for unit in window.units] if window else []
            pending.append((window, drop, futures))
            in_flight += len(futures)
        if not pending:
            return
        window, drop, futures = pending.popleft()
        if window is None:
            yield None, {}
            continue
        chunks, counters = [], {"rows_read": 0}
        for future in futures:
            result = _result(future, stop)
            if result is None:
                return
            chunk, counts = result
            chunks.append(chunk)
            counters["rows_read"] += chunk.num_rows
            for key, count in counts.items():
                counters[key] = counters.get(key, 0) + count
        block = chunks[0].concat(chunks)
        permutation = window_permutation(window)
        if permutation is not None:
            block = block.take(torch.from_numpy(permutation))
        if drop:
            block = block.slice(drop, block.num_rows)
        yield block, counters


def _cut(source: Source, blocks: Iterator[tuple[Chunk | None, dict[str, int]]], stats: dict) -> Iterator[Any]:
    """The stream's batches, cut from `_blocks`' blocks in order (a rank's epoch ends with a smaller batch);
    each block's counters are added to `stats` and its rows to the CPU meter."""
    held: list[Chunk] = []
    held_rows = 0

    def cut(rows: int) -> Any:
        nonlocal held_rows
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
        return source.decoder.to_batch(parts[0].concat(parts))

    for block, counters in blocks:
        if block is None:  # end of an epoch: the rank's last, smaller batch
            if held_rows:
                yield cut(held_rows)
            continue
        for key, count in counters.items():
            stats[key] = stats.get(key, 0) + count
        source.cpu.add(0.0, counters["rows_read"])
        held.append(block)
        held_rows += block.num_rows
        while held_rows >= source.batch_size:
            yield cut(source.batch_size)


def _batches(
    source: Source,
    start_epoch: int,
    skip_rows: int,
    stats: dict,
    submit: Callable[[Unit], Any],
    stop: threading.Event,
) -> Iterator[Any]:
    """The stream's batches, windows made in this process (`_blocks`, `submit` as there)."""
    return _cut(source, _blocks(source, start_epoch, skip_rows, submit, stop), stats)


def _process_blocks(source: Source, start_epoch: int, skip_rows: int) -> Iterator[tuple[Chunk | None, dict]]:
    """`_blocks` as the decoding process makes them (each unit decoded when its window is reached)."""
    return _blocks(source, start_epoch, skip_rows, functools.partial(_Deferred, source), threading.Event())


def _metered(items: DecodingProcess, cpu: CpuMeter) -> Iterator[tuple[Chunk | None, dict[str, int]]]:
    """The decoding process's blocks, the CPU seconds it spent on each added to `cpu`."""
    for block, seconds in items:
        cpu.add(seconds)
        yield block


def _timed_next(batches: Iterator[Any], cpu: CpuMeter) -> Any:
    """next(batches) (_END at the end), its CPU time in this thread added to `cpu`."""
    start = time.thread_time()
    try:
        return next(batches, _END)
    finally:
        cpu.add(time.thread_time() - start)


def _drive(source: Source, start_epoch: int, skip_rows: int, out, stop, stats: dict) -> None:
    use_one_torch_thread()  # the reader's torch ops must not run OpenMP teams beside the training's
    pool = concurrent.futures.ThreadPoolExecutor(
        source.num_workers, thread_name_prefix="tml-reader-decode", initializer=use_one_torch_thread
    )
    try:
        batches = _batches(
            source, start_epoch, skip_rows, stats, lambda unit: pool.submit(decode_unit, source, unit), stop
        )
        while True:  # waiting on the decoding threads costs this thread no CPU time
            batch = _timed_next(batches, source.cpu)
            if not _put(out, batch, stop) or batch is _END:
                return
    except BaseException as error:
        _put(out, _Failure(error), stop)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # BatchIterators not closed yet


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN):
        iterator.close()


class BatchIterator:
    """Iterator of the decoder's batches, produced by background threads (num_workers >= 1), in the
    calling thread (num_workers = 0), or cut in the calling thread from windows a separate process makes
    (decode_process); `close()` (or GC) stops them."""

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
        self._thread: threading.Thread | None = None
        self._inline: Iterator[Any] | None = None
        self._cpu = source.cpu
        self._process: DecodingProcess | None = None
        if source.decode_process:
            self._process = DecodingProcess(
                functools.partial(_process_blocks, source, start_epoch, skip_rows)
            )
            self._inline = _cut(source, _metered(self._process, source.cpu), stats)
        elif source.num_workers == 0:
            submit = functools.partial(_Deferred, source)
            self._inline = _batches(source, start_epoch, skip_rows, stats, submit, self._stop)
        else:
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
        item = self._next_inline() if self._inline is not None else self._next_queued()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._on_batch()
        return item

    def _next_inline(self) -> Any:
        try:
            return _timed_next(self._inline, self._cpu)
        except BaseException:
            self.close()
            raise

    def _next_queued(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the reader's driver thread ended without a result") from None

    def close(self) -> None:
        """Stop the threads and drop the batches still queued."""
        self._done = True
        self._stop.set()
        _OPEN.discard(self)
        if self._inline is not None:
            self._inline.close()
        if self._process is not None:
            self._process.close()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        if not self._done:
            self.close()
