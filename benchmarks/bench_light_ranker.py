"""Scoring speed of the light ranker next to the heavy ranker: the exported artifact in-process and through
`tml-recap serve`.

Models: light_ranker.yaml (its discretizer calibrated on --rows rows of its own synthetic data), local.yaml
(the README's heavy ranker) and prod.yaml (the production architecture, 48M parameters); untrained
weights, which do not change the speed. Each is exported once under --work (`--compile auto`: AOTInductor,
its compile time printed). Requests are the light ranker's synthetic validation rows, and random rows in
the heavy rankers' schemas.

Per model and request size (--records: e.g. 16 for a request, 1000 for the candidates a light ranker
pre-filters), these variants run (benchmarks/bench_serving.py's, rotated over --repeat repeats, medians
and ranges printed):
- `in-process`: decode the Arrow rows with the reader's ranking decoder, then the program, one request
  after the other (what `tml-recap score` does per batch);
- `arrow c=N` / `json c=N`: N concurrent clients POST the rows to a `tml-recap serve` subprocess
  (--service-records sized requests only: a 1000-row JSON body of the production model is 130 MB).

    python benchmarks/bench_light_ranker.py [--records 16 1000] [--concurrency 1 8] [--formats arrow json]
        [--requests 100] [--repeat 3] [--rows 50000] [--compile auto] [--work /tmp/tml-bench-light-ranker]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import ROOT, Server, bodies, cell, export, in_process, load, request_table, summary

LIGHT = "light_ranker"


def prepare_light_ranker(work: str, rows: int) -> str:
    """Synthetic data and the discretizer's boundaries, where light_ranker.yaml reads them; the data folder."""
    env = {**os.environ, "TML_DATA": f"{work}/data", "TML_RUNS": f"{work}/runs"}
    config = os.path.join(ROOT, "projects/home/recap/config/light_ranker.yaml")
    recap = [sys.executable, "-m", "tml.projects.home.recap.main"]
    data = f"{work}/data/{LIGHT}"
    subprocess.run([*recap, "generate-data", "--config", config, "--num-examples", str(rows), "--output", data],
                   env=env, check=True, capture_output=True)  # fmt: skip
    subprocess.run([*recap, "calibrate-discretizer", "--config", config, "--overwrite"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    os.environ.update(TML_DATA=env["TML_DATA"], TML_RUNS=env["TML_RUNS"])  # export() loads the config
    return data


def parameters(path: str) -> int:
    program = torch.export.load(os.path.join(path, "program.pt2"))
    return sum(t.numel() for t in program.state_dict.values())


def bench(name: str, args, light_rows: pa.Table | None) -> list[str]:
    from tml.projects.home.recap.serving.artifact import load_artifact
    from tml.projects.home.recap.serving.schema import decode_plan

    path = export(name, args.work, args.compile)
    with open(os.path.join(path, "artifact.json")) as f:
        meta = json.load(f)
    plan = decode_plan(meta["inputs"], with_ids=False)
    artifact = load_artifact(path)
    tables = {n: request_table(meta["inputs"], n) if light_rows is None else light_rows.slice(0, n)
              for n in args.records}  # fmt: skip
    served = [n for n in args.records if n <= args.service_records]
    server = Server(path, max(served)) if served else None
    variants = [(n, "in-process") for n in args.records]
    variants += [(n, f"{fmt} c={c}") for n in served for fmt in args.formats for c in args.concurrency]
    results: dict = {v: [] for v in variants}
    try:
        for repeat in range(args.repeat):
            for records, variant in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
                table = tables[records]
                if variant == "in-process":
                    results[(records, variant)].append(in_process(artifact, plan, table, args.requests))
                else:
                    fmt, concurrency = variant.split(" c=")
                    body = bodies(table)[fmt]
                    results[(records, variant)].append(load(server, body, int(concurrency), args.requests))
    finally:
        if server is not None:
            server.stop()
    compile_note = f", AOTInductor compile {meta['compile_seconds']} s" if meta["compile_seconds"] else ""
    lines = [
        f"| **{name}.yaml** ({parameters(path):,} parameters; {artifact.runtime}{compile_note}) | | | | | |"
    ]
    for records, variant in variants:
        s = summary(results[(records, variant)], records)
        lines.append(
            f"| | {records} | {variant} | {cell(s['p50'], 2)} | {cell(s['p99'], 2)} | {cell(s['rate'], 0)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[LIGHT, "local", "prod"])
    parser.add_argument("--records", nargs="+", type=int, default=[16, 1000], help="rows per request")
    parser.add_argument("--service-records", type=int, default=16, help="largest request sent to the service")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--formats", nargs="+", choices=["json", "arrow"], default=["arrow", "json"])
    parser.add_argument("--requests", type=int, default=100, help="requests per variant and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--rows", type=int, default=50_000, help="synthetic rows to calibrate the light ranker on"
    )
    parser.add_argument("--compile", choices=["none", "auto", "aoti"], default="auto")
    parser.add_argument("--work", default="/tmp/tml-bench-light-ranker")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    from tml.core.distributed import configure_cpu_threads
    from tml.reader.vectors import unpack_table

    # What `tml-recap serve` does, for a like-for-like in-process figure.
    configure_cpu_threads(None, reserved=1)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    light_rows = None
    if LIGHT in args.configs:
        data = prepare_light_ranker(args.work, args.rows)
        light_rows = unpack_table(pq.read_table(f"{data}/valid/part-00000.parquet"))
        if light_rows.num_rows < max(args.records):
            raise SystemExit(
                f"--rows {args.rows} gives {light_rows.num_rows} rows per validation file: raise it"
            )
    print(f"\n{args.requests} requests per run, {args.repeat} repeats (median, range)\n")
    print("| model | records per request | variant | p50 ms | p99 ms | records/s |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        for line in bench(name, args, light_rows if name == LIGHT else None):
            print(line, flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
