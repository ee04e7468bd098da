"""What feeding from the reader costs a CPU training step: one model, one process, three sources, alternated.

The same plain step (the model's forward and backward, `torch.optim.Adam(fused=True)` on the dense part,
the sharded tables' fused optimizer) is fed, in rotation and `--repeat` times each:
- `cycled`: 8 batches decoded before timing, cycled (the plain reference of bench_recap.py);
- `fresh`: as many distinct batches as a run takes, decoded before timing (is it the data's novelty?);
- `reader`: the live reader (tml.reader's background threads) over the same Parquet files.
It also prints the reader's CPU per batch while it decodes the `fresh` batches (first calls included).
`reader / cycled` below 1 is what the reader's threads take from the training step, beyond the data itself.
Data: bench_recap.py's files (written when missing).

    python benchmarks/bench_reader_contention.py [--config local] [--steps 280] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_recap  # the data and config helpers of the end-to-end benchmark

SIZES = {"local": (300_000, 16384, 1024), "prod": (12_288, 2048, 256)}  # rows, row group, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SIZES), default="local")
    parser.add_argument("--steps", type=int, default=280)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tml-bench-recap"))
    args = parser.parse_args()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))

    import torch
    import torchrec  # noqa: F401  (before the reader's KeyedJaggedTensor import: torchrec's import order)

    from tml.core.distributed import init_distributed
    from tml.projects.home.recap.build import build_sharded, task_names
    from tml.reader.dataset import build_dataset

    rows, row_group, batch_size = SIZES[args.config]
    path = os.path.join(bench_recap.ROOT, f"projects/home/recap/config/{args.config}.yaml")
    folder = bench_recap.write_data(path, args.work, rows, row_group)
    config = bench_recap._load(path, args.work)
    env = init_distributed("gloo", "cpu")
    torch.set_num_threads(args.threads)
    data = config.train_data.model_copy(
        update={"inputs": os.path.join(folder, "*.parquet"), "global_batch_size": batch_size}
    )
    dataset = build_dataset(data, task_names(config), 0, 1)
    iterator = iter(dataset)
    fresh = [next(iterator) for _ in range(args.steps)]
    iterator.close()
    reader_ms = dataset.cpu_seconds_per_batch() * 1e3

    torch.manual_seed(0)
    step = bench_recap.plain_step(config, build_sharded(config, env))

    def run(batches) -> float:
        start = time.perf_counter()
        for _, batch in zip(range(args.steps), batches, strict=False):
            step(batch)
        return args.steps * batch_size / (time.perf_counter() - start)

    def live():
        iterator = iter(dataset)
        yield from iterator
        iterator.close()

    sources = {"cycled": lambda: itertools.cycle(fresh[:8]), "fresh": lambda: iter(fresh), "reader": live}
    run(itertools.cycle(fresh[:8]))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for repeat in range(args.repeat):
        names = list(sources)
        for name in names[repeat % 3 :] + names[: repeat % 3]:  # rotated order
            rates[name].append(run(sources[name]()))
    print(f"{args.config}.yaml, batch {batch_size}, {args.threads} torch thread(s), {args.steps} steps x "
          f"{args.repeat}; the reader, decoding the fresh batches: {reader_ms:.2f} ms of CPU per batch")  # fmt: skip
    for name, values in rates.items():
        ratios = [value / base for value, base in zip(values, rates["cycled"], strict=True)]
        print(f"{name:7s} {statistics.median(values):9,.0f} ex/s ({min(values):,.0f}-{max(values):,.0f})  "
              f"/ cycled {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
