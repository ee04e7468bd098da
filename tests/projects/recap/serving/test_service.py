"""`tml-recap serve` as a user runs it: readiness, the same scores as `predict` over JSON and Arrow, every
bad request answered with a 4xx naming the field (and the service still answering), metrics, and SIGTERM
answering the request in flight before the process ends. Ports: the server binds port 0 and logs the one it got."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.reader.vectors import unpack_table

pytestmark = pytest.mark.slow
# The `serve` extra (pip install -e ".[serve]"; CI installs it).
httpx = pytest.importorskip("httpx")
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)
TASKS = [
    "recap.engagement.is_favorited",
    "recap.engagement.is_retweeted",
    "recap.engagement.is_replied",
    "recap.engagement.is_good_clicked_convo_desc_v2",
]


class Server:
    """A `tml-recap serve` process: its URL once ready; stop() sends SIGTERM and returns the return code."""

    def __init__(self, env: dict, *args: str, timeout: float = 180.0) -> None:
        command = [sys.executable, "-m", "tml.projects.home.recap.main", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.url = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines)
            if url is None:
                found = [re.search(r"on (http://127\.0\.0\.1:\d+)", line) for line in self.lines]
                url = next((m.group(1) for m in found if m), None)
            if url is not None:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready after {timeout} s:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(local_run):
    server = Server(local_run["env"], "--artifact", str(local_run["artifact"]), "--max-request-records", "64")
    yield server
    assert server.stop() == -signal.SIGTERM, "".join(server.lines)


def _rows(local_run, count=20):
    first = sorted(local_run["data"].glob("valid/*.parquet"))[0]
    return unpack_table(pq.read_table(first)).slice(0, count)  # vectors as JSON lists


def _post(url: str, records: list, query: str = "") -> httpx.Response:
    # json.dumps writes NaN (the synthetic rows have some) as Python's JSON does, which the service reads.
    body = json.dumps({"records": records}).encode()
    return httpx.post(
        f"{url}/predict{query}", content=body, headers={"content-type": "application/json"}, timeout=60
    )


def _expected(local_run, count=20):
    return pq.read_table(local_run["predictions"]).slice(0, count)  # predict writes the files in order


def test_json_requests_score_like_predict(server, local_run):
    rows, expected = _rows(local_run), _expected(local_run)
    response = _post(server.url, rows.to_pylist())
    assert response.status_code == 200, response.text
    body = response.json()
    np.testing.assert_allclose(body["score"], expected.column("score").to_numpy(), rtol=1e-5, atol=1e-5)
    for task in TASKS:
        got = body["probabilities"][task]
        np.testing.assert_allclose(got, expected.column(f"p/{task}").to_numpy(), rtol=1e-5, atol=1e-6)
    one = httpx.post(
        f"{server.url}/predict?tasks={TASKS[2]}", json={"records": rows.to_pylist()[:1]}, timeout=60
    )
    assert list(one.json()["probabilities"]) == [TASKS[2]]
    np.testing.assert_allclose(one.json()["score"], body["score"][:1], rtol=1e-5)


@pytest.mark.parametrize("vectors", ["lists", "packed"])
def test_arrow_requests_score_like_predict(server, local_run, vectors):
    rows, expected = _rows(local_run), _expected(local_run)
    if vectors == "packed":  # as read from tml's files: the service reads them like the reader
        rows = pq.read_table(sorted(local_run["data"].glob("valid/*.parquet"))[0]).slice(0, rows.num_rows)
        assert pa.types.is_fixed_size_binary(rows.schema.field("continuous").type)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    response = httpx.post(
        f"{server.url}/predict",
        content=sink.getvalue().to_pybytes(),
        headers={"content-type": "application/vnd.apache.arrow.stream"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    table = pa.ipc.open_stream(response.content).read_all()
    assert table.column_names == [f"p/{t}" for t in TASKS] + ["score"]
    for name in table.column_names:
        np.testing.assert_allclose(
            table.column(name).to_numpy(), expected.column(name).to_numpy(), rtol=1e-5, atol=1e-5
        )


def test_every_bad_request_gets_a_4xx_naming_the_field_and_the_service_goes_on(server, local_run):
    good = _rows(local_run, 2).to_pylist()
    short = [dict(good[0], continuous=good[0]["continuous"][:5])]
    text = [dict(good[0], binary=["yes"] * 16)]
    no_binary = [{k: v for k, v in r.items() if k != "binary"} for r in good]
    bad = [
        ("malformed JSON", b'{"records": [', {}, "", 400, "not valid JSON"),
        ("not an object", b"[1, 2]", {}, "", 400, '"records"'),
        ("missing feature", json.dumps({"records": no_binary}).encode(), {}, "", 422, "column 'binary'"),
        ("wrong type", json.dumps({"records": text}).encode(), {}, "", 422, "column 'binary'"),
        ("wrong length", json.dumps({"records": short}).encode(), {}, "", 422, "column 'continuous' row 0 holds 5 values, expected 64"),
        ("oversized", json.dumps({"records": good * 40}).encode(), {}, "", 413, "80 records in one request, at most 64"),
        ("unknown task", json.dumps({"records": good}).encode(), {}, "?tasks=nope", 422, "unknown task(s) ['nope']"),
        ("no records", b'{"records": []}', {}, "", 422, "no records"),
        ("unknown format", b"a,b", {"content-type": "text/csv"}, "", 415, "Content-Type 'text/csv'"),
        ("bad Arrow", b"not arrow", {"content-type": "application/vnd.apache.arrow.stream"}, "", 400, "Arrow IPC"),
    ]  # fmt: skip
    headers = {"content-type": "application/json"}
    for what, body, extra, query, status, message in bad:
        response = httpx.post(
            f"{server.url}/predict{query}", content=body, headers={**headers, **extra}, timeout=60
        )
        assert response.status_code == status, (what, response.text)
        assert message in response.json()["error"], (what, response.text)
        after = _post(server.url, good)
        assert after.status_code == 200 and len(after.json()["score"]) == 2, what
    assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in (
        'tml_serve_requests_total{format="json",status="422"}',
        'tml_serve_requests_total{format="json",status="413"}',
        'tml_serve_errors_total{kind="client"}',
        "tml_serve_request_seconds_count",
        "tml_serve_batch_records_count",
        "tml_serve_queue_depth 0.0",
    ):
        assert line in metrics, line
    assert "Traceback" not in "".join(server.lines)


def test_sigterm_answers_the_request_in_flight_then_stops(local_run):
    # A batch that would wait 10 minutes for company: only the drain on SIGTERM can answer it in time.
    server = Server(local_run["env"], "--artifact", str(local_run["artifact"]), "--max-wait-ms", "600000")
    try:
        result = {}
        rows = _rows(local_run, 3).to_pylist()
        thread = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{server.url}/predict", json={"records": rows}, timeout=120)
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while "tml_serve_queue_depth 1.0" not in httpx.get(f"{server.url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the request never reached the batcher"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert result["r"].status_code == 200 and len(result["r"].json()["score"]) == 3
    finally:
        code = server.stop()
    # uvicorn ends the process with the signal it caught once everything is answered (143 in a shell).
    assert code == -signal.SIGTERM, "".join(server.lines)
    assert any("drained; stopped" in line for line in server.lines)
