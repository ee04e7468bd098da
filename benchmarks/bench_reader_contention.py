"""What feeding from the reader costs a CPU training step: one model, one process, several sources, alternated.

The same plain step (the model's forward and backward, `torch.optim.Adam(fused=True)` on the dense part,
the sharded tables' fused optimizer), or with `--loop tml` tml's training loop (tml.core.train_loop, its
pipeline and the config's optimizers, no logging), is fed, in rotation and `--repeat` times each:
- `cycled`: 8 batches decoded before timing, cycled (the plain reference of bench_recap.py);
- `fresh`: as many distinct batches as a run takes, decoded before timing (is it the data's novelty?);
- `reader`: the live reader (tml.reader's background threads, `num_workers: 2` whatever the default picks)
  over the same Parquet files;
- `inline`: the live reader decoding in the training thread between steps (`num_workers: 0`: what the
  default picks on a machine of at most 2 cores; `--sources` to include it);
- `idle`: the same with its threads scheduled as Linux's SCHED_IDLE (a prototype, not in tml.reader: they then
  run only on cores nothing else wants, so torch's OpenMP threads take theirs back at once; `--sources` to
  include it);
- `process`: the live reader decoding in its separate idle-priority process (`decode_process: true`,
  tml.reader.decode_process; `--sources` to include it; until 2026-12-03 a prototype of it).
`--precision` is bench_recap.py's (`auto`: bf16 autocast where tml's auto picks it, on CPUs with AMX).
`--omp-spin N` sets libgomp's GOMP_SPINCOUNT for this process (read once, when torch loads): how long
torch's idle OpenMP threads spin before they sleep and leave their core to others.
It also prints the reader's CPU per batch while it decodes the `fresh` batches (first calls included), and
per source the CPU per step of the main thread, of the process's other threads (torch's OpenMP workers) and
of the reader's threads (Linux's /proc/self/task).
`reader / cycled` below 1 is what the reader's threads take from the training step, beyond the data itself.
Data: bench_recap.py's files (written when missing).

    python benchmarks/bench_reader_contention.py [--config local] [--steps 280] [--repeat 3] [--threads 2]
        [--loop plain] [--sources cycled fresh reader inline idle process] [--precision auto] [--omp-spin N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_recap  # the data and config helpers of the end-to-end benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(bench_recap.SIZES), default="local")
    parser.add_argument("--steps", type=int, default=280)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    parser.add_argument(
        "--loop", choices=["plain", "tml"], default="plain", help="what trains on the batches"
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tml-bench-recap"))
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["cycled", "fresh", "reader"],
        choices=["cycled", "fresh", "reader", "inline", "idle", "process"],
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--omp-spin", type=int, help="GOMP_SPINCOUNT of this process (default: libgomp's)")
    args = parser.parse_args()
    if args.omp_spin is not None:
        os.environ["GOMP_SPINCOUNT"] = str(args.omp_spin)  # before torch loads libgomp, which reads it once
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

    size = bench_recap.SIZES[args.config]
    rows, row_group, batch_size = size["rows"], size["row_group"], size["batch"]
    path = bench_recap.config_path(args.config)
    folder = bench_recap.write_data(path, args.work, rows, row_group)
    config = bench_recap.bench_config(path, args.work)
    env = init_distributed("gloo", "cpu")
    torch.set_num_threads(args.threads)
    data = config.train_data.model_copy(
        # Background threads, whatever the default picks (on 2 cores it decodes in the training thread).
        update={
            "inputs": os.path.join(folder, "*.parquet"),
            "global_batch_size": batch_size,
            "num_workers": 2,
        }
    )
    dataset = build_dataset(data, task_names(config), 0, 1)
    in_process = build_dataset(
        data.model_copy(update={"num_workers": 0, "decode_process": True}), task_names(config), 0, 1
    )
    inline = build_dataset(data.model_copy(update={"num_workers": 0}), task_names(config), 0, 1)
    iterator = iter(dataset)
    fresh = [next(iterator) for _ in range(args.steps)]
    iterator.close()
    reader_ms = dataset.cpu_seconds_per_batch() * 1e3

    torch.manual_seed(0)
    trainer = plain_loop if args.loop == "plain" else bench_recap.core_trainer
    bf16 = bench_recap.wants_bf16(args.precision)
    train_on = trainer(config, build_sharded(config, env), env, bf16)

    def run(batches, cpu: list | None = None) -> float:
        before = thread_cpu()
        start = time.perf_counter()
        train_on(batches, args.steps)
        seconds = time.perf_counter() - start
        if cpu is not None:  # read before `batches` closes: the reader's threads are still alive
            cpu.append([value / args.steps * 1e3 for value in cpu_by_role(before, thread_cpu())])
        return args.steps * batch_size / seconds

    def live(idle: bool = False, dataset=dataset):
        with sched_idle_reader(idle):  # for the whole run: the threads start while it runs
            iterator = iter(dataset)
            yield from iterator
        iterator.close()

    sources = {
        "cycled": lambda: itertools.cycle(fresh[:8]),
        "fresh": lambda: iter(fresh),
        "reader": live,
        "inline": lambda: live(dataset=inline),
        "idle": lambda: live(idle=True),
        "process": lambda: live(dataset=in_process),
    }
    sources = {name: sources[name] for name in dict.fromkeys(["cycled", *args.sources])}
    run(itertools.cycle(fresh[:8]))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sources}
    cpu: dict[str, list[list[float]]] = {name: [] for name in sources}
    for repeat in range(args.repeat):
        names = list(sources)
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:  # rotated order
            rates[name].append(run(sources[name](), cpu[name]))
    spin = f", GOMP_SPINCOUNT {args.omp_spin}" if args.omp_spin is not None else ""
    print(f"{args.config}.yaml, batch {batch_size}, {args.loop} loop, {'bf16' if bf16 else 'fp32'}, {args.threads} torch thread(s){spin}, "
          f"{args.steps} steps x {args.repeat}; the reader, decoding the fresh batches: {reader_ms:.2f} ms of CPU per batch")  # fmt: skip
    for name, values in rates.items():
        ratios = [value / base for value, base in zip(values, rates["cycled"], strict=True)]
        print(f"{name:7s} {statistics.median(values):9,.0f} ex/s ({min(values):,.0f}-{max(values):,.0f})  "
              f"/ cycled {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})  "
              "CPU ms per step: " + ", ".join(
                  f"{role} {statistics.median(run[i] for run in cpu[name]):.2f}" for i, role in enumerate(ROLES)
              ))  # fmt: skip


ROLES = ("main", "other threads", "reader")  # other: torch's OpenMP workers (and idle gloo threads)


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id (Linux /proc)."""
    ticks, seconds = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended since the listing
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def cpu_by_role(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """CPU seconds between two `thread_cpu()` readings of the main thread, the others, and the reader's
    threads (named tml-reader-*; in the `process` source they are in the forked process, not counted)."""
    import threading

    reader = {t.native_id for t in threading.enumerate() if t.name.startswith("tml-reader")}
    used = [0.0, 0.0, 0.0]
    for tid, value in after.items():
        role = 0 if tid == os.getpid() else 2 if tid in reader else 1
        used[role] += value - before.get(tid, 0.0)
    return used


def plain_loop(config, sharded, env, bf16: bool = False):
    """train(batches, steps): bench_recap's plain step on each batch (under bf16 autocast if `bf16`)."""
    step = bench_recap.plain_step(config, sharded, bf16)

    def train(batches, steps: int) -> None:
        for _, batch in zip(range(steps), batches, strict=False):
            step(batch)

    return train


@contextlib.contextmanager
def sched_idle_reader(idle: bool):
    """While open, reader threads that start run under SCHED_IDLE (each thread's own policy, set where it
    sets its torch thread count; unprivileged, it cannot be undone: the threads end with their iterator)."""
    from tml.reader import pipeline

    original = pipeline.use_one_torch_thread

    def start() -> bool:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return original()

    if idle:
        pipeline.use_one_torch_thread = start
    try:
        yield
    finally:
        pipeline.use_one_torch_thread = original


if __name__ == "__main__":
    main()
