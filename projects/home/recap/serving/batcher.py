"""Dynamic batching: requests that arrive together are scored as one batch.

Each request's decoded rows (a TensorChunk) wait in a queue. The batcher takes the first waiting request,
then keeps adding requests until the batch holds `max_batch_records` rows or `max_wait_ms` have passed
since it took the first one (a request that would overflow the batch starts the next one), concatenates
their rows, runs the model once in its own thread (so the event loop keeps reading and decoding requests
meanwhile) and hands each request its own rows of the outputs. While the model runs, new requests queue
up, so under load batches grow by themselves; an idle service adds at most `max_wait_ms` to a request.
When a batch fails, its requests are retried one by one, so one request can never fail another.
`drain()` (on SIGTERM) closes the batch being gathered at once and stops waiting for company, so requests in
flight are answered without delay.

Example:
    batcher = DynamicBatcher(run, max_batch_records=1024, max_wait_ms=2.0)
    batcher.start()
    outputs = await batcher.submit(chunk)   # {name: tensor [rows of chunk, ...]}
    await batcher.stop()                     # after the queue is drained
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable

import torch

from tml.reader.chunk import TensorChunk

Outputs = dict[str, torch.Tensor]
_FLUSH = object()  # queued by drain(): close the batch being gathered now


@dataclasses.dataclass
class _Pending:
    chunk: TensorChunk
    future: asyncio.Future


class DynamicBatcher:
    """See the module docstring.

    Args:
        run: rows -> outputs (every output has the rows as its first dimension); runs in one worker thread.
        max_batch_records: rows per model call at most (a request may not exceed it).
        max_wait_ms: how long the first request of a batch waits for company.
        on_batch: called with the rows of every model call (metrics).
    """

    def __init__(
        self,
        run: Callable[[TensorChunk], Outputs],
        max_batch_records: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run = run
        self.max_batch_records = max_batch_records
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda rows: None)
        self._queue: asyncio.Queue = asyncio.Queue()  # _Pending, _FLUSH, or None (stop)
        self._held: _Pending | None = None
        self._waiting = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests submitted and not yet handed to the model."""
        return self._waiting

    def drain(self) -> None:
        """From now on, batch only what is already waiting (call in the event loop's thread)."""
        self.max_wait = 0.0
        self._queue.put_nowait(_FLUSH)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish every request already submitted, then stop."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown()

    async def submit(self, chunk: TensorChunk) -> Outputs:
        if chunk.num_rows > self.max_batch_records:
            raise ValueError(f"{chunk.num_rows} rows exceed the batch limit {self.max_batch_records}")
        future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        await self._queue.put(_Pending(chunk, future))
        return await future

    async def _next_batch(self) -> tuple[list[_Pending], bool]:
        """(requests of the next batch, whether stop was requested)."""
        loop = asyncio.get_running_loop()
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        while first is _FLUSH:
            first = await self._queue.get()
        if first is None:
            return [], True
        batch, rows = [first], first.chunk.num_rows
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch_records:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                return batch, True
            if item is _FLUSH:
                break
            if rows + item.chunk.num_rows > self.max_batch_records:
                self._held = item
                break
            batch.append(item)
            rows += item.chunk.num_rows
        return batch, False

    async def _score(self, batch: list[_Pending], retry: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if not retry:
            self._waiting -= len(batch)
        chunk = TensorChunk.concat([item.chunk for item in batch])
        self.on_batch(chunk.num_rows)
        try:
            outputs = await loop.run_in_executor(self._executor, self.run, chunk)
        except Exception as error:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            for item in batch:  # find the request that fails; the others still get their answer
                await self._score([item], retry=True)
            return
        start = 0
        for item in batch:
            rows = item.chunk.num_rows
            if not item.future.done():  # the client may have gone away
                item.future.set_result(
                    {name: tensor[start : start + rows] for name, tensor in outputs.items()}
                )
            start += rows

    async def _loop(self) -> None:
        stopping = False
        while not stopping or self._held is not None or not self._queue.empty():
            batch, stop = await self._next_batch()
            stopping = stopping or stop
            if batch:
                await self._score(batch)
            if stopping and self._held is None and self._queue.empty():
                break
