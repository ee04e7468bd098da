"""Can the reader feed the production model? Reader rows/s vs the training step's consumption rate, prod.yaml.

Writes synthetic data in prod.yaml's schema (6000 continuous, 512 binary, 320 discrete, three 200-d vectors,
truncated to 2117 / 59 on read), then measures in one process: (a) the reader's rows/s over it with prod.yaml's
train_data section, (b) examples/s of prod.yaml's model trained by the core loop on those batches (fp32 and
bf16). Ratio > 1 means the reader is not what a CPU training process waits on.

    python benchmarks/bench_reader_vs_training.py [--rows 16384] [--steps 6] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    from tml.core.config.loader import load_config
    from tml.core.distributed import init_distributed
    from tml.core.train_loop import LoopOptions, train
    from tml.projects.home.recap.build import build_recap_optimizer, build_sharded
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.data.synthetic import generate
    from tml.reader.dataset import build_dataset

    work = tempfile.mkdtemp(prefix="tml-bench-")
    env_vars = {"TML_DATA": work, "TML_RUNS": work}
    config = load_config(
        RecapConfig, os.path.join(ROOT, "projects/home/recap/config/prod.yaml"), env=env_vars
    )
    data = config.train_data.model_copy(
        update={"inputs": os.path.join(work, "train", "*.parquet"), "global_batch_size": args.batch_size}
    )
    start = time.perf_counter()
    generate(
        data, args.rows, os.path.join(work, "train"), num_files=2, rows_per_row_group=2048, progress=False
    )
    print(f"wrote {args.rows} prod-schema rows in {time.perf_counter() - start:.1f} s ({work})")

    tasks = list(config.model.tasks)
    dataset = build_dataset(data, tasks, num_epochs=1, shuffle=False)
    start, rows, batches = time.perf_counter(), 0, []
    for batch in dataset:
        rows += batch.batch_size
        if len(batches) < args.steps + 2:
            batches.append(batch)
    reader = rows / (time.perf_counter() - start)
    print(f"reader: {reader:,.0f} rows/s")

    env = init_distributed("gloo", "cpu")
    for bf16 in (False, True):
        sharded = build_sharded(config, env)
        optimizer, scheduler = build_recap_optimizer(config, sharded)
        warm = LoopOptions(num_train_steps=2, train_log_every_n=10**9, bf16=bf16)
        train(sharded.module, [optimizer], scheduler, batches[:2], env, warm)
        options = LoopOptions(num_train_steps=2 + args.steps, train_log_every_n=10**9, bf16=bf16)
        start = time.perf_counter()
        train(sharded.module, [optimizer], scheduler, batches[2:], env, options, start_step=2)
        consumed = args.steps * args.batch_size / (time.perf_counter() - start)
        name = "bf16" if bf16 else "fp32"
        print(f"training {name}: {consumed:,.0f} examples/s  -> reader / training = {reader / consumed:.1f}x")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
