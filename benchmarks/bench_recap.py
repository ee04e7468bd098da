"""Recap training throughput and peak memory: tml's loop vs a plain PyTorch loop over the same model.

For a recap config (default local.yaml and prod.yaml), each variant runs in its own process(es) on the same
random in-memory batches of the config's shapes: a plain loop (the unsharded train module, torch Adam with its
defaults over every parameter, DDP when there are several processes) and tml's path (build_sharded +
build_recap_optimizer + core train loop), in fp32 and bf16 autocast, on 1 and 2 processes (torchrun; the
global batch is split between them). Printed: global examples/s, ratio core/plain, the largest per-process
peak RSS and its ratio.

    python benchmarks/bench_recap.py [--configs local prod] [--procs 1 2] [--steps 30] [--batch-size 512] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"TML_DATA": "/nonexistent", "TML_RUNS": "/tmp/tml-bench-recap"}


def _batches(config, steps: int, size: int):
    from tml.reader.batch import RecapBatch
    from tml.reader.config import dense_widths

    gen = torch.Generator().manual_seed(0)
    data, tasks = config.train_data, len(config.model.tasks)
    out = []
    for _ in range(steps):
        dense = {}
        for name, width in dense_widths(data).items():
            if name == "discrete":
                dense[name] = torch.randint(0, 100, (size, width), generator=gen)
            elif name == "binary":
                dense[name] = (torch.rand(size, width, generator=gen) < 0.2).float()
            else:
                dense[name] = torch.randn(size, width, generator=gen)
        sparse = None
        if data.sparse_features:
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

            keys = [f.name for f in data.sparse_features]
            lengths = torch.ones(len(keys) * size, dtype=torch.int64)
            values = torch.randint(0, 1000, (len(keys) * size,), generator=gen)
            sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        labels = (torch.rand(size, tasks, generator=gen) < 0.05).float()
        out.append(RecapBatch(dense=dense, labels=labels, weights=torch.ones_like(labels), sparse=sparse))
    return out


def run_one(config_path: str, mode: str, bf16: bool, steps: int, size: int) -> dict:
    from tml.core.config.loader import load_config
    from tml.core.distributed import init_distributed
    from tml.projects.home.recap.config import RecapConfig

    config = load_config(RecapConfig, config_path, env=ENV)
    env = init_distributed("gloo", "cpu")
    batches = _batches(config, steps + 3, size // env.world_size)
    torch.manual_seed(0)
    if mode == "plain":
        from tml.projects.home.recap.build import build_train_module

        module = build_train_module(config)
        if env.world_size > 1:
            module = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

        def step(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = module(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for batch in batches[:3]:
            step(batch)
        start = time.perf_counter()
        for batch in batches[3:]:
            step(batch)
    else:
        from tml.core.train_loop import LoopOptions, train
        from tml.projects.home.recap.build import build_recap_optimizer, build_sharded

        sharded = build_sharded(config, env)
        optimizer, scheduler = build_recap_optimizer(config, sharded)
        optimizers = [optimizer, *sharded.table_optimizers.values()]
        options = LoopOptions(num_train_steps=3, train_log_every_n=10**9, bf16=bf16)
        train(sharded.module, optimizers, scheduler, batches[:3], env, options)
        options = LoopOptions(num_train_steps=3 + steps, train_log_every_n=10**9, bf16=bf16)
        start = time.perf_counter()
        train(sharded.module, optimizers, scheduler, batches[3:], env, options, start_step=3)
    seconds = time.perf_counter() - start
    figures = torch.tensor([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    torch.distributed.all_reduce(figures, op=torch.distributed.ReduceOp.MAX)  # the slowest, the largest
    return {"examples_per_s": steps * size / figures[0].item(), "peak_rss_mb": figures[1].item()}


def _launch(path: str, mode: str, bf16: str, procs: int, steps: int, batch_size: int) -> dict:
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [
        *launcher,
        __file__,
        "--one",
        path,
        mode,
        bf16,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
    ]
    # Every process gets an equal share of the cores (torchrun's default is one thread each).
    threads = str(max(1, (os.cpu_count() or 1) // procs))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": threads}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["local", "prod"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--repeat", type=int, default=1, help="alternate plain/core runs this often; print medians"
    )
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "BF16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        config, mode, bf16 = args.one
        result = run_one(config, mode, bf16 == "1", args.steps, args.batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    print(f"{args.steps} steps x {args.batch_size} examples (global batch), {os.cpu_count()} CPU cores")
    for name in args.configs:
        path = os.path.join(ROOT, "projects/home/recap/config", f"{name}.yaml")
        for procs, bf16 in [(p, b) for p in args.procs for b in ("0", "1")]:
            runs = {"plain": [], "core": []}
            for _ in range(args.repeat):
                for mode in runs:
                    runs[mode].append(_launch(path, mode, bf16, procs, args.steps, args.batch_size))
            ratios = [c["examples_per_s"] / p["examples_per_s"] for p, c in zip(*runs.values(), strict=True)]
            results = {mode: _median_run(values) for mode, values in runs.items()}
            p, c = results["plain"], results["core"]
            print(
                f"{name:6s} {procs} proc {'bf16' if bf16 == '1' else 'fp32'}: "
                f"plain {p['examples_per_s']:9,.0f} ex/s  "
                f"core {c['examples_per_s']:9,.0f} ex/s  ratio {statistics.median(ratios):.2f}"
                f" (runs {min(ratios):.2f}-{max(ratios):.2f})  |  "
                f"peak RSS plain {p['peak_rss_mb']:,.0f} MB  core {c['peak_rss_mb']:,.0f} MB  "
                f"ratio {c['peak_rss_mb'] / p['peak_rss_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
