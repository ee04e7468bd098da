"""tml-recap: train | evaluate | predict | summary | generate-data | compute-stats.

tml-recap train --config projects/home/recap/config/local.yaml training.num_train_steps=100
torchrun --nproc_per_node=2 -m tml.projects.home.recap.main train --config X.yaml
"""

from __future__ import annotations

import argparse
import json
import os

from tml.core.cli import add_debug_flag, user_errors_as_one_line
from tml.core.config.loader import ConfigError, load_config
from tml.core.distributed import run_distributed
from tml.ml_logging.log import get_logger, setup_logging
from tml.projects.home.recap.config import RecapConfig

logger = get_logger(__name__)


def train(config: RecapConfig) -> None:
    from tml.core import run
    from tml.projects.home.recap import build
    from tml.projects.home.recap.evaluate import validate
    from tml.reader.batch import RecapBatch

    env = run.start(config.training)
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_recap_optimizer(config, sharded)
    bf16 = run.use_bf16(config.training, env)
    evaluate = (lambda module, step: validate(config, module, env, bf16)) if config.validation_data else None
    job = run.TrainJob(
        config,
        config.training,
        sharded,
        optimizer,
        scheduler,
        build.build_train_data(config, env),
        RecapBatch,
        evaluate,
        config.optimizer.clip_grad_norm,
    )
    run.fit(job, env)


def _load(config: RecapConfig, checkpoint: str | None):
    from tml.core import run
    from tml.core.checkpoint import load_weights
    from tml.projects.home.recap import build

    env = run.start(config.training)
    sharded = build.build_sharded(config, env)
    step = load_weights(sharded.module, checkpoint or config.training.save_dir)
    return env, sharded, step


def evaluate(config: RecapConfig, checkpoint: str | None, output: str | None) -> None:
    from tml.core.run import use_bf16
    from tml.projects.home.recap.evaluate import print_table, validate

    if not config.validation_data:
        raise ConfigError("evaluate: the config has no validation_data partitions to evaluate")
    env, sharded, step = _load(config, checkpoint)
    results = validate(config, sharded.module, env, use_bf16(config.training, env))
    if env.is_main:
        path = output or os.path.join(config.training.save_dir, "evaluate", f"step-{step}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"step": step, **results}, f, indent=1)
        print(print_table(results))
        logger.info("evaluation of step %d written to %s", step, path)


def predict(config: RecapConfig, checkpoint: str | None, inputs: str, output: str, overwrite: bool) -> None:
    from tml.projects.home.recap.predict import write_predictions

    env, sharded, _ = _load(config, checkpoint)
    write_predictions(config, sharded.module, env, inputs, output, overwrite)


def summary(config: RecapConfig) -> None:
    from tml.core.model_summary import summarize
    from tml.projects.home.recap.build import build_train_module

    print(summarize(build_train_module(config, embedding_device="meta").model))


def generate_data(
    config: RecapConfig, num_examples: int, output: str, seed: int, validation_fraction: float
) -> None:
    from tml.projects.home.recap.data.synthetic import generate

    setup_logging(0)
    # Every split shares the seed, hence the label function; `split` draws different rows.
    splits = [("train", config.train_data, num_examples)]
    for name, data in config.validation_data.items():
        splits.append((name, data, max(1, int(num_examples * validation_fraction))))
    for split, (name, data, count) in enumerate(splits):
        oracle = generate(data, count, os.path.join(output, name), seed=seed, split=split)
        logger.info(
            "%s: %d examples in %s; oracle AUC %s",
            name,
            count,
            os.path.join(output, name),
            {task.rsplit(".", 1)[-1]: round(auc, 3) for task, auc in oracle.items()},
        )


def compute_stats(config: RecapConfig, output: str | None) -> None:
    from tml.projects.home.recap.model import compute_continuous_stats, save_stats
    from tml.reader.dataset import build_dataset

    setup_logging(0)
    z = config.model.featurization_config.z_score_log_config
    path = output or (z.analysis_path if z is not None else None)
    if path is None:
        raise ConfigError("compute-stats: give --output or set model.featurization_config.z_score_log_config")
    data = build_dataset(config.train_data, [], num_epochs=1, shuffle=False)
    save_stats(compute_continuous_stats(data), path)
    logger.info("statistics of %s written to %s", config.train_data.inputs, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml-recap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    modes = {
        "train": "train (resumes from save_dir's latest checkpoint)",
        "evaluate": "evaluate a checkpoint on every validation_data partition",
        "predict": "Parquet in, Parquet out: ids, per-task probabilities and the ranking score",
        "summary": "print the model's structure and parameter counts (no data needed)",
        "generate-data": "write synthetic Parquet data in the config's schema",
        "compute-stats": "compute z-score statistics of the continuous features from train_data",
    }
    for mode, help_text in modes.items():
        p = sub.add_parser(mode, help=help_text)
        p.add_argument("--config", required=True, help="YAML config (local path or fsspec URL)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
        add_debug_flag(p)
        if mode in ("evaluate", "predict"):
            p.add_argument(
                "--checkpoint", help="a step-N folder or a run folder (default: save_dir's latest)"
            )
        if mode == "evaluate":
            p.add_argument("--output", help="metrics JSON file (default: <save_dir>/evaluate/step-N.json)")
        if mode == "predict":
            p.add_argument("--input", required=True, help="Parquet glob or fsspec URL to score")
            p.add_argument("--output", required=True, help="output folder (one part file per rank)")
            p.add_argument("--overwrite", action="store_true", help="replace part files already in --output")
        if mode == "generate-data":
            p.add_argument("--num-examples", type=int, required=True, help="training examples to write")
            p.add_argument("--output", required=True, help="folder; gets train/ and one folder per partition")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument(
                "--validation-fraction",
                type=float,
                default=0.2,
                help="examples per validation partition, as a fraction of --num-examples",
            )
        if mode == "compute-stats":
            p.add_argument("--output", help="stats file (default: z_score_log_config.analysis_path)")
    return parser


def cli(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors_as_one_line("tml-recap", args.debug):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    config = load_config(RecapConfig, args.config, args.overrides)
    if args.mode == "train":
        run_distributed(lambda: train(config))
    elif args.mode == "evaluate":
        run_distributed(lambda: evaluate(config, args.checkpoint, args.output))
    elif args.mode == "predict":
        run_distributed(lambda: predict(config, args.checkpoint, args.input, args.output, args.overwrite))
    elif args.mode == "summary":
        summary(config)
    elif args.mode == "generate-data":
        generate_data(config, args.num_examples, args.output, args.seed, args.validation_fraction)
    elif args.mode == "compute-stats":
        compute_stats(config, args.output)


if __name__ == "__main__":
    cli()
