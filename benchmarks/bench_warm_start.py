"""How many examples does a warm-started model need to reach the quality of a model trained from scratch?

    .venv/bin/python benchmarks/bench_warm_start.py [--seeds 0 1 2] [--rows 200000] [--steps 800] [--evals 20]

The models are those of `config/examples/warm_start_base.yaml` (two tasks, the user embedding) and
`warm_start.yaml` (a third task and the author embedding). Per seed, the synthetic generator of that seed
(one label function) draws "day 1" and "day 2" (`--rows` each, other rows of the same distribution) and a
validation set. Day 1 trains the base model from scratch. Then, on day 2, for two changes of the model:

- `same model`: the base model again, cold (from scratch) and warm (from day 1's weights);
- `add task + feature`: warm_start.yaml's model, cold and warm (shared tensors from day 1; the new tower, the
  new LayerNorm and the backbone's first layer, which reads 8 more columns, start fresh);

each for `--steps` steps of 256 (about one pass over day 2) with the same schedule, evaluated `--evals`
times on the validation set through the run lifecycle (`tml-recap train`, `training.initial_checkpoint_dir`).
Quality is the mean AUROC over the day-2 model's tasks. Reported: the cold model's final quality, the warm
model's at its first evaluation and at the end, and the examples the warm model needs to reach the cold
model's final quality, as a fraction of the cold model's examples (for `same model`, step 0 is day 1's
final evaluation). Results: benchmarks/RESULTS.md ("Warm start").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from tml.core.config.loader import load_config
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.data.synthetic import generate
from tml.projects.home.recap.main import train

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "projects/home/recap/config/examples")
BATCH = 256


def quality_curve(save_dir: str, tasks: list[str]) -> list[tuple[int, float]]:
    """(step, mean AUROC over `tasks`) of every evaluation in the run's metrics.jsonl."""
    curve = []
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            keys = [f"eval/valid/{task}/auroc" for task in tasks]
            if all(key in record for key in keys):
                curve.append((record["step"], sum(record[key] for key in keys) / len(keys)))
    return curve


def run(example: str, work: str, name: str, day: str, seed: int, args, initial: str | None = None) -> str:
    save_dir = os.path.join(work, name)
    overrides = [
        f"training.save_dir={save_dir}",
        f"training.initial_checkpoint_dir={initial if initial else 'null'}",
        f"training.seed={seed}",
        f"training.num_train_steps={args.steps}",
        f"training.checkpoint_every_n={args.steps}",
        f"training.train_log_every_n={args.steps}",
        f"training.eval_every_n={args.steps // args.evals}",
        f"train_data.inputs={work}/{day}/*.parquet",
        f"train_data.global_batch_size={BATCH}",
        f"train_data.shuffle.seed={seed}",
        f"validation_data.valid.inputs={work}/valid/*.parquet",
        "validation_data.valid.global_batch_size=4096",
        f"optimizer.single_task_learning_rate.linear_ramp_to_cosine.final_num_steps={args.steps}",
    ]
    train(load_config(RecapConfig, os.path.join(EXAMPLES, example), overrides, env={}))
    return save_dir


def reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per day")
    parser.add_argument("--steps", type=int, default=800, help="steps of 256 per day")
    parser.add_argument("--evals", type=int, default=20, help="evaluations per day-2 run")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    work_root = args.work or tempfile.mkdtemp(prefix="bench_warm_start-")
    full = load_config(RecapConfig, os.path.join(EXAMPLES, "warm_start.yaml"), env={})
    rows = []
    for seed in args.seeds:
        work = os.path.join(work_root, f"seed{seed}")
        # The day-2 schema holds every column both models read; both days share the seed's label function.
        for day, split in (("day1", 0), ("day2", 2)):
            generate(
                full.train_data, args.rows, os.path.join(work, day), seed=seed, split=split, progress=False
            )
        generate(full.validation_data["valid"], args.rows // 4, os.path.join(work, "valid"), seed=seed, split=1,
                 progress=False, id_columns=full.train_data.id_columns)  # fmt: skip
        day1 = run("warm_start_base.yaml", work, "day1", "day1", seed, args)
        base_tasks = list(
            load_config(RecapConfig, os.path.join(EXAMPLES, "warm_start_base.yaml"), env={}).model.tasks
        )
        for variant, example, tasks in (
            ("same model", "warm_start_base.yaml", base_tasks),
            ("add task + feature", "warm_start.yaml", list(full.model.tasks)),
        ):
            tag = variant.split()[0]
            cold = quality_curve(run(example, work, f"cold_{tag}", "day2", seed, args), tasks)
            warm = quality_curve(run(example, work, f"warm_{tag}", "day2", seed, args, initial=day1), tasks)
            if variant == "same model":
                warm = [(0, quality_curve(day1, tasks)[-1][1]), *warm]
            target = cold[-1][1]
            step = reach(warm, target)
            rows.append((variant, seed, target, warm[0], warm[-1][1], step))
    print(
        f"\n{'variant':20} {'seed':>4} {'cold final':>10} {'warm first eval':>17} {'warm final':>10} {'examples to reach cold final':>30}"
    )
    for variant, seed, target, (first_step, first), final, step in rows:
        reached = "not reached" if step is None else f"{step * BATCH} ({step / args.steps:.0%})"
        print(
            f"{variant:20} {seed:>4} {target:>10.4f} {first:>10.4f} @{first_step:<5} {final:>10.4f} {reached:>30}"
        )
    for variant in dict.fromkeys(r[0] for r in rows):
        fractions = [r[5] / args.steps if r[5] is not None else None for r in rows if r[0] == variant]
        shown = [f"{f:.0%}" if f is not None else "never" for f in fractions]
        print(
            f"{variant}: warm start reaches the cold model's final mean AUROC after {', '.join(shown)} of its examples"
        )
    print(f"runs and data in {work_root}")


if __name__ == "__main__":
    main()
