"""Serving speed: `tml-recap serve` under a local load generator, next to calling the artifact in-process.

For each config (default local.yaml and prod.yaml's dense production model; untrained weights, which do not
change the speed), the model is exported once under --work (`--compile auto`: AOTInductor, whose compile
time is printed, or `none`: the exported program), a request of --records rows is drawn at random in the
artifact's schema, and these variants run:

- `in-process`: the artifact called in this process, one request after the other: decode the Arrow table
  with the reader's ranking decoder, then the program (what `tml-recap score` does per batch).
- `json c=N` / `arrow c=N`: N concurrent clients (httpx, one asyncio loop) POST the request to a
  `tml-recap serve` subprocess (default batching: --max-batch-records 1024, --max-wait-ms 2) until
  --requests requests are answered.

Per variant: p50 / p99 latency of a request, records/s, and for the service the mean records per model
call (from its /metrics: dynamic batching at work). Variants run in turn, in a rotated order each repeat,
so drift on a shared machine cancels; printed are medians with the range over repeats and the serving
overhead ratio (in-process records/s over the variant's). Client and server share this machine's cores.

    python benchmarks/bench_serving.py [--configs local prod] [--concurrency 1 8 32] [--formats json arrow]
        [--records 16] [--requests 200] [--repeat 3] [--compile auto] [--work /tmp/tml-bench-serving]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARROW = "application/vnd.apache.arrow.stream"


def export(name: str, work: str, compile_mode: str) -> str:
    """An artifact of `name`'s model with fresh weights (tables uniform in +-0.01)."""
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.serving.export import build_serving, write_artifact

    config = load_config(RecapConfig, os.path.join(ROOT, "projects/home/recap/config", f"{name}.yaml"), [])
    torch.manual_seed(0)
    serving = build_serving(config)
    for parameter in serving.parameters():
        if parameter.dim() == 2 and parameter.shape[0] > 1000:  # embedding tables, left uninitialised
            torch.nn.init.uniform_(parameter, -0.01, 0.01)
    path = os.path.join(work, name)
    shutil.rmtree(path, ignore_errors=True)
    return write_artifact(
        config, serving, path, {"path": None, "step": None, "weights": "untrained"}, compile_mode
    )


def request_table(inputs: dict, rows: int, seed: int = 0) -> pa.Table:
    """`rows` random rows with the columns the artifact reads."""
    rng = np.random.default_rng(seed)
    columns = {}
    for d in inputs["dense"]:
        draw = (
            (lambda n: rng.integers(0, 3, n)) if d["dtype"] == "int64" else (lambda n: rng.standard_normal(n))
        )
        if d["is_list"]:
            columns[d["columns"][0]] = pa.array(list(draw((rows, d["length"]))))
        else:
            for column in d["columns"]:
                columns[column] = pa.array(draw(rows))
    for s in inputs["sparse"]:
        columns[s["column"]] = pa.array(rng.integers(0, s["rows"], rows))
    return pa.table(columns)


def bodies(table: pa.Table) -> dict[str, tuple[bytes, str]]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    records = json.dumps({"records": table.to_pylist()}, default=float).encode()
    return {"json": (records, "application/json"), "arrow": (sink.getvalue().to_pybytes(), ARROW)}


def in_process(artifact, plan, table: pa.Table, requests: int) -> dict:
    from tml.projects.home.recap.serving.schema import decode_rows, program_inputs

    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        artifact(*program_inputs(decode_rows(table, "bench", plan), plan))
        latencies.append(time.perf_counter() - t)
    return {"latencies": latencies, "seconds": time.perf_counter() - start, "batch": None}


class Server:
    def __init__(self, artifact: str, records: int) -> None:
        command = [sys.executable, "-m", "tml.projects.home.recap.main", "serve", "--artifact", artifact,
                   "--port", "0", "--max-request-records", str(records)]  # fmt: skip
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.url = self._wait(300.0)

    def _wait(self, timeout: float) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            found = [re.search(r"on (http://[\d.]+:\d+)", line) for line in list(self.lines)]
            url = next((m.group(1) for m in found if m), None)
            if url is not None:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise TimeoutError("server not ready:\n" + "".join(self.lines))

    def batch_stats(self) -> tuple[float, float]:
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = float(re.search(r"^tml_serve_batch_records_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^tml_serve_batch_records_count (\S+)$", text, re.M).group(1))
        return total, count

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def load(server: Server, body: tuple[bytes, str], concurrency: int, requests: int) -> dict:
    import httpx

    content, media = body
    latencies: list[float] = []
    remaining = [requests]

    async def client(http) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            t = time.perf_counter()
            response = await http.post(
                f"{server.url}/predict", content=content, headers={"content-type": media}
            )
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # Without TCP_NODELAY the request body (written after the headers) waits for the server's delayed ACK.
        nodelay = httpx.AsyncHTTPTransport(
            limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        async with httpx.AsyncClient(timeout=120, transport=nodelay) as http:
            await client(http)  # one warm request per connection pool before timing
            remaining[0] = requests
            latencies.clear()
            start = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
            return time.perf_counter() - start

    before = server.batch_stats()
    seconds = asyncio.run(main())
    after = server.batch_stats()
    batch = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
    return {"latencies": latencies, "seconds": seconds, "batch": batch}


def summary(runs: list[dict], records: int) -> dict:
    p50 = [statistics.median(r["latencies"]) * 1000 for r in runs]
    p99 = [float(np.percentile(r["latencies"], 99)) * 1000 for r in runs]
    rate = [len(r["latencies"]) * records / r["seconds"] for r in runs]
    batch = [r["batch"] for r in runs if r["batch"] is not None]
    return {"p50": p50, "p99": p99, "rate": rate, "batch": batch}


def cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def bench(name: str, args) -> None:
    from tml.projects.home.recap.serving.artifact import load_artifact
    from tml.projects.home.recap.serving.schema import decode_plan

    path = export(name, args.work, args.compile)
    with open(os.path.join(path, "artifact.json")) as f:
        meta = json.load(f)
    table = request_table(meta["inputs"], args.records)
    plan = decode_plan(meta["inputs"], with_ids=False)
    artifact = load_artifact(path)
    payloads = bodies(table)
    server = Server(path, args.records)
    variants = ["in-process"] + [f"{f} c={c}" for f in args.formats for c in args.concurrency]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for repeat in range(args.repeat):
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
            for variant in order:
                if variant == "in-process":
                    results[variant].append(in_process(artifact, plan, table, args.requests))
                else:
                    fmt, concurrency = variant.split(" c=")
                    results[variant].append(load(server, payloads[fmt], int(concurrency), args.requests))
    finally:
        server.stop()
    base = statistics.median(summary(results["in-process"], args.records)["rate"])
    print(f"\n### {name}.yaml: runtime {artifact.runtime}, export {meta['export_seconds']} s"
          + (f", AOTInductor compile {meta['compile_seconds']} s" if meta["compile_seconds"] else "")
          + f"; {args.records} records/request, {args.requests} requests per run, {args.repeat} repeats; "
          f"JSON body {len(payloads['json'][0]) / 1024:.0f} KiB, Arrow {len(payloads['arrow'][0]) / 1024:.0f} KiB\n")  # fmt: skip
    print("| variant | p50 ms | p99 ms | records/s | in-process / variant | records per model call |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        s = summary(results[variant], args.records)
        ratio = [base / r for r in s["rate"]]
        print(f"| {variant} | {cell(s['p50'], 2)} | {cell(s['p99'], 2)} | {cell(s['rate'], 0)} | "
              f"{cell(ratio, 2)} | {cell(s['batch'], 1)} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["local", "prod"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--formats", nargs="+", choices=["json", "arrow"], default=["json", "arrow"])
    parser.add_argument("--records", type=int, default=16, help="rows per request")
    parser.add_argument("--requests", type=int, default=200, help="requests per variant and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", choices=["none", "auto", "aoti"], default="auto")
    parser.add_argument("--work", default="/tmp/tml-bench-serving")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    from tml.core.distributed import configure_cpu_threads

    configure_cpu_threads(
        None, reserved=1
    )  # what `tml-recap serve` does, for a like-for-like in-process figure
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    for name in args.configs:
        bench(name, args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
