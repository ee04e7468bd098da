"""Recap training speed and peak memory: what a user runs (`tml-recap train` from Parquet) against a plain loop.

For each recap config (default local.yaml, input-bound, and prod.yaml, compute-bound), synthetic Parquet data
in the config's schema is written once under --work, then these variants run, each in its own process(es):

- `plain`: a plain PyTorch loop on in-memory batches (the same rows, decoded once before timing): the same
  model with the same table kernel and table optimizer (torchrec's fused one, or none for models without
  tables), `torch.optim.Adam(fused=True)` over the dense parameters with the config's betas, DDP on 2
  processes. torch's default threads (all cores on one process; torchrun's 1 on two).
- `core`: tml's loop (`core.train_loop.train`, tml's optimizer and scheduler) on the same in-memory batches
  and threads: the loop's bookkeeping alone.
- `e2e`: `tml-recap train --config <config>` from the Parquet files as a subprocess (torchrun for 2
  processes), the default config plus only size overrides: inputs, global_batch_size, num_train_steps,
  save_dir, train_log_every_n (the measuring window) and no evaluation (`validation_data={}`,
  `training.eval_every_n=null`, `training.num_eval_steps=null`). Nothing about
  threads or compilation is set, unless --e2e-overrides adds it.
- `e2e-inline` / `e2e-background` / `e2e-process`: `e2e` with the training thread decoding between steps
  (`train_data.num_workers=0`) / with two background decoding threads (`train_data.num_workers=2`) / with
  a separate decoding process (`train_data.decode_process=true`, started with GOMP_SPINCOUNT=10000).
- `e2e-inline-short-spin`: `e2e-inline` started with GOMP_SPINCOUNT=10000: what the short OpenMP spin that
  the decoding process needs costs by itself.
- `e2e-lists`: `e2e` from a copy of the files with the vectors as lists (`tml-pq rewrite --vectors list`)
  instead of packed (tml.reader.vectors, what the generator writes): what packing gains.

Precision (--precision): `auto` (the default) runs every variant as tml's `training.mixed_precision: auto`
picks on this machine (bf16 autocast on a CPU with AMX, fp32 on others; e2e runs the config's own default),
so that all do the same work; `fp32` and `bf16` set it for all (e2e: `training.mixed_precision=none|bf16`).

Throughput is examples/s over the steps after the first measuring window (warm-up, compilation), globally.
Variants run in turn, in a rotated order each repeat so that drift on a shared machine cancels; printed are
the median examples/s with the range over repeats, ratios to `plain` of the same repeat (median and range),
the largest per-process peak RSS (VmHWM) and its ratio to `plain`, and the load average around the runs.

    python benchmarks/bench_recap.py [--configs local prod] [--procs 1 2] [--repeat 3] [--variants plain core e2e]
        [--precision auto] [--steps N] [--window N] [--batch-size N] [--e2e-overrides KEY=VALUE ...]
        [--label NAME] [--work /tmp/tml-bench-recap]

Example (the honest scaling figure on a 2-core box: 2 processes x 1 thread against 1 process x 1 thread):
    python benchmarks/bench_recap.py --procs 1 --variants plain e2e --plain-threads 1 \
        --e2e-overrides training.num_threads=1 --label "1 thread"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per config: rows written, rows per row group, global batch, steps, steps per measuring window.
# The first window holds the warm-up and tml's thread trial (core/cpu_threads.py: at least 29 steps and 8 s;
# launch_e2e checks that it ended there).
SIZES = {
    "local": {"rows": 300_000, "row_group": 16_384, "batch": 1024, "steps": 1800, "window": 600},
    "prod": {"rows": 12_288, "row_group": 2_048, "batch": 256, "steps": 150, "window": 50},
}
# The reader's ways of decoding (tml.reader.pipeline), whatever the default picks.
INLINE = ("train_data.num_workers=0", "train_data.decode_process=false")
READERS = {
    "e2e-inline": INLINE,
    "e2e-background": ("train_data.num_workers=2", "train_data.decode_process=false"),
    "e2e-process": ("train_data.decode_process=true",),
    "e2e-inline-short-spin": INLINE,
}
SHORT_SPIN = {"GOMP_SPINCOUNT": "10000"}  # as docs/reader.md says to start the decoding process
READER_ENV = {"e2e-process": SHORT_SPIN, "e2e-inline-short-spin": SHORT_SPIN}
NO_EVALUATION = ["validation_data={}", "training.eval_every_n=null", "training.num_eval_steps=null"]
_SHIM = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def config_path(name: str) -> str:
    return (
        name if name.endswith(".yaml") else os.path.join(ROOT, "projects/home/recap/config", f"{name}.yaml")
    )


def _env(work: str) -> dict[str, str]:
    return {"TML_DATA": os.path.join(work, "data"), "TML_RUNS": os.path.join(work, "runs")}


def bench_config(path: str, work: str):
    """The RecapConfig at `path` as the benchmarks run it: no evaluation, data and runs under `work`."""
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig

    return load_config(RecapConfig, path, NO_EVALUATION, env=_env(work))


def write_data(path: str, work: str, rows: int, row_group: int) -> str:
    """The config's schema as Parquet, every drawn row kept (the rates only shape the labels' base rates)."""
    from tml.projects.home.recap.data.synthetic import generate
    from tml.reader.layout import COMPRESSION

    name = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(work, "data", f"{name}-{rows}-{row_group}-{COMPRESSION}-where-halved-packed")
    if os.path.exists(os.path.join(folder, "oracle_auc.json")):
        return folder
    data = bench_config(path, work).train_data
    tasks = {t: r.model_copy(update={"neg_downsampling_rate": 1.0}) for t, r in data.tasks.items()}
    generate(
        data.model_copy(update={"tasks": tasks}),
        rows,
        folder,
        num_files=2,
        rows_per_row_group=row_group,
        progress=False,
    )
    return folder


def list_copy(folder: str) -> str:
    """`folder`'s files with the vectors as lists (written once, beside it)."""
    from tml.tools.pq import cmd_rewrite

    lists = f"{folder}-lists"
    if not os.path.exists(os.path.join(lists, "done")):
        cmd_rewrite([folder], lists, overwrite=True, vectors="list")
        open(os.path.join(lists, "done"), "w").close()
    return lists


def wants_bf16(precision: str) -> bool:
    """Whether `--precision` means bf16 autocast here (`auto`: what tml's auto picks on this CPU)."""
    from tml.core.run import cpu_has_amx

    return cpu_has_amx() if precision == "auto" else precision == "bf16"


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plain_step(config, sharded, bf16: bool = False) -> Callable:
    """The plain reference's training step on a batch: the sharded model's forward and backward (its tables
    update in their fused optimizer) and `torch.optim.Adam(fused=True)` on the dense parameters."""
    import torch

    module, adam = sharded.module, config.optimizer.adam
    params = [p for _, p in sharded.dense_named_parameters()]
    optimizer = torch.optim.Adam(
        params, lr=1e-4, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon, fused=True
    )

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def run_in_memory(args) -> dict:
    """One `plain` or `core` run in this process (a rank of torchrun when several)."""
    import torch
    import torchrec  # noqa: F401  (before the reader's KeyedJaggedTensor import: torchrec's import order)

    from tml.core.distributed import init_distributed
    from tml.projects.home.recap.build import build_sharded, task_names
    from tml.reader.dataset import build_dataset

    config = bench_config(args.one[0], args.work)
    env = init_distributed("gloo", "cpu")
    data = config.train_data.model_copy(
        update={"inputs": os.path.join(args.one[2], "*.parquet"), "global_batch_size": args.batch_size}
    )
    iterator = iter(build_dataset(data, task_names(config), env.rank, env.world_size))
    batches = [next(iterator) for _ in range(8)]  # cycled: in memory, like a plain benchmark's tensors
    iterator.close()
    bf16 = wants_bf16(args.precision)
    torch.manual_seed(0)
    sharded = build_sharded(config, env)
    warm, steps = args.window, args.steps
    if args.one[1] == "plain":
        step = plain_step(config, sharded, bf16)
        for i in range(warm):
            step(batches[i % len(batches)])
        start = time.perf_counter()
        for i in range(warm, steps):
            step(batches[i % len(batches)])
    else:
        train = core_trainer(config, sharded, env, bf16)

        def cycle(first: int, last: int):
            return (batches[i % len(batches)] for i in range(first, last))

        train(cycle(0, warm), warm)
        start = time.perf_counter()
        train(cycle(warm, steps), steps - warm)
    seconds = time.perf_counter() - start
    figures = torch.tensor([seconds, _peak_rss_mb()])
    torch.distributed.all_reduce(figures, op=torch.distributed.ReduceOp.MAX)  # the slowest, the largest
    return {
        "examples_per_s": (steps - warm) * args.batch_size / figures[0].item(),
        "peak_rss_mb": figures[1].item(),
    }


def core_trainer(config, sharded, env, bf16: bool = False):
    """train(batches, steps): `steps` steps of tml's training loop (its pipeline, the config's optimizers, no
    logging) on `batches`, each call continuing the previous one's step count."""
    from tml.core.state import LoopState
    from tml.core.train_loop import LoopOptions, train
    from tml.projects.home.recap.build import build_recap_optimizer
    from tml.reader.batch import RecapBatch

    optimizer, scheduler = build_recap_optimizer(config, sharded)
    optimizers = [optimizer, *sharded.table_optimizers.values()]
    state = LoopState()

    def run(batches, steps: int) -> None:
        options = LoopOptions(
            num_train_steps=state.step + steps, train_log_every_n=10**9, bf16=bf16, batch_type=RecapBatch
        )
        train(sharded.module, optimizers, scheduler, batches, env, options, state=state)

    return run


def _launcher(procs: int, env: dict[str, str]) -> list[str]:
    """The shim that reports its children's peak RSS, then torchrun for several processes."""
    shim = [sys.executable, "-c", _SHIM]
    if procs == 1:
        return shim
    env.pop("OMP_NUM_THREADS", None)  # torchrun's own default (1 thread per process) applies
    return [*shim, sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]


def launch_in_memory(args, path: str, folder: str, mode: str, procs: int) -> dict:
    env = {**os.environ, **_env(args.work)}
    env.pop("OMP_NUM_THREADS", None)
    if args.plain_threads and procs == 1:
        env["OMP_NUM_THREADS"] = str(args.plain_threads)
    sizes = ["--steps", str(args.steps), "--window", str(args.window), "--batch-size", str(args.batch_size)]
    script = [__file__] if procs > 1 else [sys.executable, __file__]
    cmd = [*_launcher(procs, env), *script, "--one", path, mode, folder, "--work", args.work,
           "--precision", args.precision, *sizes]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def launch_e2e(
    args, path: str, folder: str, procs: int, extra: tuple = (), extra_env: dict | None = None
) -> dict:
    """`tml-recap train` from the Parquet files; examples/s of the windows after the first."""
    env = {**os.environ, **_env(args.work), **(extra_env or {})}
    env.pop("OMP_NUM_THREADS", None)
    run_dir = os.path.join(args.work, "runs", f"e2e-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"train_data.inputs={os.path.join(folder, '*.parquet')}",
        f"train_data.global_batch_size={args.batch_size}",
        f"training.num_train_steps={args.steps}",
        f"training.train_log_every_n={args.window}",
        f"training.save_dir={run_dir}",
        *NO_EVALUATION,
        *(
            {
                "auto": [],
                "fp32": ["training.mixed_precision=none"],
                "bf16": ["training.mixed_precision=bf16"],
            }[args.precision]
        ),
        *args.e2e_overrides,
        *extra,
    ]
    tml_recap = os.path.join(os.path.dirname(sys.executable), "tml-recap")
    entry = ["-m", "tml.projects.home.recap.main"] if procs > 1 else [tml_recap]
    cmd = [*_launcher(procs, env), *entry, "train", "--config", path, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"e2e run failed:\n{done.stderr[-4000:]}")
    decided = re.search(r"torch CPU threads: \d+ from step (\d+)", done.stderr)
    if decided and int(decided.group(1)) > args.window + 1:
        raise RuntimeError(
            f"e2e: the thread trial ended at step {decided.group(1)}, after the first window of {args.window} "
            "steps that the rates leave out: raise --window"
        )
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["train/examples_per_s"] for line in f if "train/examples_per_s" in line]
    shutil.rmtree(run_dir, ignore_errors=True)
    if len(rates) < 2:
        raise RuntimeError(f"e2e run logged {len(rates)} windows; need steps >= 2 x window")
    # Every window after the first holds `window` steps: their total time is the sum of examples / rate.
    steady = len(rates[1:]) / sum(1 / r for r in rates[1:])
    return {"examples_per_s": steady, "peak_rss_mb": _maxrss_mb(done.stderr)}


def _maxrss_mb(stderr: str) -> float:
    line = next(line for line in stderr.splitlines()[::-1] if line.startswith("MAXRSS_KIB"))
    return int(line.split()[1]) / 1024


def _range(values: list[float], fmt: str) -> str:
    median = format(statistics.median(values), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["local", "prod"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "core", "e2e"],
        choices=["plain", "core", "e2e", *READERS, "e2e-lists"],
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--steps", type=int, help="steps per run (default: per config, see SIZES)")
    parser.add_argument("--window", type=int, help="steps per measuring window; the first is warm-up")
    parser.add_argument("--batch-size", type=int, help="global batch (default: per config)")
    parser.add_argument("--plain-threads", type=int, help="OMP_NUM_THREADS of one-process plain/core runs")
    parser.add_argument("--e2e-overrides", nargs="*", default=[], help="extra config overrides of e2e runs")
    parser.add_argument("--label", default="", help="printed with each row")
    parser.add_argument(
        "--work", default="/tmp/tml-bench-recap", help="data (kept between runs) and run folders"
    )
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from tml.core.distributed import shutdown

        result = run_in_memory(args)
        shutdown()  # gloo's threads left running at interpreter exit can abort it (seen once in ~10 runs)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    precision = "bf16" if wants_bf16(args.precision) else "fp32"
    print(f"{os.cpu_count()} CPU cores, {precision} ({args.precision}), {args.repeat} repeats {args.label}")
    asked = {key: getattr(args, key) for key in ("steps", "window", "batch_size")}
    for name in args.configs:
        size = SIZES.get(os.path.splitext(os.path.basename(name))[0], SIZES["local"])
        args.steps = asked["steps"] or size["steps"]
        args.window = asked["window"] or size["window"]
        args.batch_size = asked["batch_size"] or size["batch"]
        path = config_path(name)
        folder = write_data(path, args.work, size["rows"], size["row_group"])
        for procs in args.procs:
            runs: dict[str, list[dict]] = {v: [] for v in args.variants}
            load_before = os.getloadavg()[0]
            for repeat in range(args.repeat):
                order = (
                    args.variants[repeat % len(args.variants) :]
                    + args.variants[: repeat % len(args.variants)]
                )
                for variant in order:
                    if variant == "e2e":
                        result = launch_e2e(args, path, folder, procs)
                    elif variant in READERS:
                        result = launch_e2e(
                            args,
                            path,
                            folder,
                            procs,
                            extra=READERS[variant],
                            extra_env=READER_ENV.get(variant),
                        )
                    elif variant == "e2e-lists":
                        result = launch_e2e(args, path, list_copy(folder), procs)
                    else:
                        result = launch_in_memory(args, path, folder, variant, procs)
                    runs[variant].append(result)
            load = f"load {load_before:.1f}-{os.getloadavg()[0]:.1f}"
            cells = []
            for variant, results in runs.items():
                rates = [r["examples_per_s"] for r in results]
                cell = f"{variant} {_range(rates, ',.0f')} ex/s"
                if "plain" in runs and variant != "plain":
                    ratios = [r / p["examples_per_s"] for r, p in zip(rates, runs["plain"], strict=True)]
                    rss = statistics.median(r["peak_rss_mb"] for r in results) / statistics.median(
                        p["peak_rss_mb"] for p in runs["plain"]
                    )
                    cell += f" = {_range(ratios, '.2f')}x, RSS {statistics.median(r['peak_rss_mb'] for r in results):,.0f} MB = {rss:.2f}x"
                else:
                    cell += f", RSS {statistics.median(r['peak_rss_mb'] for r in results):,.0f} MB"
                cells.append(cell)
            print(
                f"{os.path.basename(path)} {procs} proc {args.label}: " + " | ".join(cells) + f" | {load}",
                flush=True,
            )


if __name__ == "__main__":
    main()
