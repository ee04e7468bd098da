"""Dynamic batching and request parsing, in process: what arrives together is scored together, within the
size bound; a failing request fails alone; every bad body is a RequestError naming the field."""

import asyncio
import json

import pyarrow as pa
import pytest
import torch

from tml.projects.home.recap.serving.batcher import DynamicBatcher
from tml.projects.home.recap.serving.requests import (
    ARROW,
    JSON,
    RequestError,
    body_format,
    parse_body,
    parse_tasks,
)
from tml.reader.chunk import TensorChunk

pytestmark = pytest.mark.unit


def _chunk(values):
    return TensorChunk(len(values), {"x": torch.tensor(values, dtype=torch.float32)})


def _run_batches(chunks, max_batch, calls, fail_on=None):
    def run(chunk):
        rows = chunk.tensors["x"]
        calls.append(rows.tolist())
        if fail_on is not None and fail_on in rows.tolist():
            raise RuntimeError("bad row")
        return {"double": rows * 2}

    async def main():
        # A long wait: the batch closes on size or on stop, never on the clock, so the test cannot race.
        batcher = DynamicBatcher(run, max_batch_records=max_batch, max_wait_ms=60_000)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(chunk)) for chunk in chunks]
        await asyncio.sleep(0)
        stopping = asyncio.create_task(batcher.stop())
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await stopping
        return results

    return asyncio.run(main())


def test_requests_that_arrive_together_share_one_model_call_within_the_size_bound():
    calls = []
    results = _run_batches([_chunk([1.0, 2.0]), _chunk([3.0]), _chunk([4.0, 5.0]), _chunk([6.0])], 4, calls)
    assert calls == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]  # [4, 5] would overflow the first batch of 4
    assert [r["double"].tolist() for r in results] == [[2.0, 4.0], [6.0], [8.0, 10.0], [12.0]]


def test_a_failing_request_fails_alone():
    calls = []
    results = _run_batches([_chunk([1.0]), _chunk([-1.0]), _chunk([3.0])], 8, calls, fail_on=-1.0)
    assert calls[0] == [1.0, -1.0, 3.0]  # the batch, then each request alone
    assert results[0]["double"].tolist() == [2.0] and results[2]["double"].tolist() == [6.0]
    assert isinstance(results[1], RuntimeError)


def test_the_clock_closes_a_batch():
    calls = []

    async def main():
        batcher = DynamicBatcher(
            lambda c: calls.append(c.num_rows) or {"y": c.tensors["x"]}, 100, max_wait_ms=1.0
        )
        batcher.start()
        first = await batcher.submit(_chunk([1.0]))  # alone: answered after the wait, without company
        await batcher.stop()
        return first

    assert asyncio.run(main())["y"].tolist() == [1.0] and calls == [1]


COLUMNS = ["continuous", "meta.author_id"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"records": [', 400, "not valid JSON"),
        (b'[{"continuous": [1]}]', 400, '"records"'),
        (b'{"records": [1, 2]}', 400, r"records\[0\] is int"),
        (b'{"records": []}', 422, "no records"),
        (
            json.dumps({"records": [{"continuous": [1.0]}] * 5}).encode(),
            413,
            "5 records in one request, at most 4",
        ),
        (b'{"records": [{"continuous": [1, "x"]}]}', 422, "column 'continuous'"),
    ],
)
def test_bad_json_bodies_name_the_problem(body, status, message):
    with pytest.raises(RequestError, match=message) as error:
        parse_body(body, JSON, COLUMNS, max_records=4)
    assert error.value.status == status


def test_json_and_arrow_bodies_give_the_same_table():
    records = [
        {"continuous": [1.0, 2.0], "meta.author_id": 7, "ignored": "x"},
        {"continuous": [3.0, 4.0], "meta.author_id": 8},
    ]
    from_json = parse_body(json.dumps({"records": records}).encode(), JSON, COLUMNS, 10)
    table = pa.table({"continuous": [[1.0, 2.0], [3.0, 4.0]], "meta.author_id": [7, 8]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    from_arrow = parse_body(sink.getvalue().to_pybytes(), ARROW, COLUMNS, 10)
    assert from_json.equals(from_arrow)
    with pytest.raises(RequestError, match="not an Arrow IPC stream"):
        parse_body(b"garbage", ARROW, COLUMNS, 10)


def test_content_types_and_tasks():
    assert body_format("application/json; charset=utf-8") == JSON and body_format(None) == JSON
    with pytest.raises(RequestError, match="Content-Type 'text/csv'") as error:
        body_format("text/csv")
    assert error.value.status == 415
    assert parse_tasks("b", ["a", "b"], "ranker") == ["b"] and parse_tasks(None, ["a"], "ranker") == ["a"]
    with pytest.raises(RequestError, match=r"unknown task\(s\) \['c'\]"):
        parse_tasks("a,c", ["a", "b"], "ranker")
    with pytest.raises(RequestError, match="has no tasks"):
        parse_tasks("a", [], "embeddings")


def test_drain_answers_a_request_waiting_for_company():
    async def main():
        batcher = DynamicBatcher(lambda c: {"y": c.tensors["x"]}, 100, max_wait_ms=600_000)
        batcher.start()
        waiting = asyncio.create_task(batcher.submit(_chunk([1.0])))
        while batcher.depth == 0:
            await asyncio.sleep(0)
        batcher.drain()  # what SIGTERM does
        result = await waiting
        await batcher.stop()
        return result, batcher.depth

    result, depth = asyncio.run(main())
    assert result["y"].tolist() == [1.0] and depth == 0
