"""TwHIN training throughput (positive edges/s) on the bundled synthetic graph, 1 process vs 2 processes.

`tml-twhin train` of projects/twhin/config/local.yaml (batch 512 over all ranks, 32 in-batch + 32 global
negatives on both sides, row-wise user and table-wise tweet tables) against `tml-torchrun
--nproc_per_node=2 -m tml.projects.twhin.main train` of the same config, alternating, `--repeat` times.
Evaluation is switched off (`validation_data={}`) so the figure is training alone; edges/s is the
harmonic mean of the `train/examples_per_s` log windows after the first (warm-up).

    .venv/bin/python benchmarks/bench_twhin.py [--steps 600] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "projects/twhin/config/local.yaml")
BIN = os.path.dirname(sys.executable)


def train(procs: int, run: str, args) -> float:
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "TML_DATA": os.path.join(args.work, "data"), "TML_RUNS": args.work}
    env.pop("OMP_NUM_THREADS", None)  # 1 process: the config's thread choice; torchrun sets 1 per process
    launcher = (
        [f"{BIN}/tml-twhin"]
        if procs == 1
        else [
            f"{BIN}/tml-torchrun",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "tml.projects.twhin.main",
        ]
    )
    overrides = [
        f"training.save_dir={run}",
        f"training.num_train_steps={args.steps}",
        f"training.checkpoint_every_n={args.steps}",
        f"training.train_log_every_n={args.steps // 6}",
        "training.eval_every_n=null",
        "training.num_eval_steps=null",
        "validation_data={}",
    ]
    done = subprocess.run(
        [*launcher, "train", "--config", CONFIG, *overrides], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"{procs}-process run failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rates = [json.loads(line)["train/examples_per_s"] for line in f if "train/examples_per_s" in line]
    shutil.rmtree(run, ignore_errors=True)
    return len(rates[1:]) / sum(1 / r for r in rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--num-edges", type=int, default=400_000)
    parser.add_argument("--work", default="/tmp/tml-bench-twhin")
    args = parser.parse_args()
    data = os.path.join(args.work, "data", "twhin_local")
    if not os.path.exists(os.path.join(data, "train")):
        cmd = [f"{BIN}/tml-twhin", "generate-data", "--config", CONFIG, "--num-edges", str(args.num_edges)]
        subprocess.run([*cmd, "--output", data], check=True, capture_output=True)
    figures: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeat):
        for procs in (1, 2) if repeat % 2 == 0 else (2, 1):
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            rate = train(procs, os.path.join(args.work, "run"), args)
            figures[procs].append(rate)
            print(
                f"repeat {repeat}: {procs} process(es) {rate:.0f} edges/s (load average before {load})",
                flush=True,
            )
    ratios = [two / one for one, two in zip(figures[1], figures[2], strict=True)]
    print(f"\n{args.steps} steps of 512 edges, {args.repeat} alternating repeats: median (range)")
    for procs, rates in figures.items():
        print(f"  {procs} process(es): {np.median(rates):.0f} ({min(rates):.0f} - {max(rates):.0f}) edges/s")
    print(f"  2 / 1 processes: {np.median(ratios):.2f} ({min(ratios):.2f} - {max(ratios):.2f})")


if __name__ == "__main__":
    main()
