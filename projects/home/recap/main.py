"""tml-recap: train | evaluate | predict | summary | generate-data | compute-stats.

tml-recap train --config projects/home/recap/config/local.yaml training.num_train_steps=100
torchrun --nproc_per_node=2 -m tml.projects.home.recap.main train --config X.yaml
"""

from __future__ import annotations

import argparse
import os

import torch

from tml.core.cli import add_debug_flag, user_errors_as_one_line
from tml.core.config.loader import ConfigError, load_config, save_config
from tml.core.distributed import DistEnv, configure_cpu_threads, init_distributed, run_distributed
from tml.ml_logging.log import get_logger, setup_logging
from tml.projects.home.recap.config import RecapConfig

logger = get_logger(__name__)


def _runtime(config: RecapConfig) -> DistEnv:
    t = config.training
    env = init_distributed(t.backend, t.device, t.collective_timeout_s)
    setup_logging(env.rank)
    threads = configure_cpu_threads(t.num_threads)
    logger.info("torch CPU threads per process: %d", threads)
    torch.manual_seed(t.seed)
    return env


def _bf16(config: RecapConfig, env: DistEnv) -> bool:
    mode = config.training.mixed_precision
    return mode == "bf16" or (mode == "auto" and env.device.type == "cuda")


def train(config: RecapConfig) -> None:
    from tml.core.checkpoint import Checkpointer, warm_start
    from tml.core.train_loop import LoopOptions
    from tml.core.train_loop import train as train_loop
    from tml.ml_logging.metrics import MetricLogger
    from tml.projects.home.recap import build
    from tml.projects.home.recap.evaluate import validate

    env = _runtime(config)
    t = config.training
    if env.rank == 0:
        save_config(config, os.path.join(t.save_dir, "config.yaml"))
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_recap_optimizer(config, sharded)
    table_optimizers = {f"table/{name}": opt for name, opt in sharded.table_optimizers.items()}
    checkpointer = Checkpointer(
        t.save_dir,
        sharded.module,
        {"dense": optimizer, **table_optimizers},
        scheduler,
        env,
        t.checkpoint_every_n,
        t.checkpoint_max_to_keep,
    )
    checkpointer.install_signal_handlers()
    dataset = build.build_train_data(config, env)
    start_step, batches_trained = 0, 0
    restored = checkpointer.restore_latest()
    if restored is not None:
        start_step, extra = restored
        batches_trained = extra.get("batches_yielded", 0)
        dataset.load_state_dict({"batches_yielded": batches_trained})
        logger.info("resumed from step %d of %s", start_step, t.save_dir)
    elif t.initial_checkpoint_dir is not None:
        fresh = warm_start(sharded.module, t.initial_checkpoint_dir)
        logger.info("warm start from %s; freshly initialised: %s", t.initial_checkpoint_dir, fresh or "none")
    metric_logger = MetricLogger(t.save_dir, env.rank)
    bf16 = _bf16(config, env)

    def evaluate(step: int) -> None:
        validate(config, sharded.module, env, metric_logger, step, bf16)

    options = LoopOptions(
        num_train_steps=t.num_train_steps,
        gradient_accumulation=t.gradient_accumulation,
        train_log_every_n=t.train_log_every_n,
        eval_every_n=t.eval_every_n,
        clip_grad_norm=config.optimizer.clip_grad_norm,
        bf16=bf16,
    )
    result = train_loop(
        sharded.module,
        [optimizer, *table_optimizers.values()],
        scheduler,
        dataset,
        env,
        options,
        metric_logger,
        checkpointer,
        evaluate if config.validation_data else None,
        start_step,
        batches_trained,
    )
    if checkpointer.latest_step() != result.step:
        checkpointer.save(result.step, {"batches_yielded": result.batches_trained})
    if config.validation_data and not (t.eval_every_n and result.step % t.eval_every_n == 0):
        evaluate(result.step)
    metric_logger.close()
    logger.info(
        "training done at step %d; checkpoints in %s", result.step, os.path.join(t.save_dir, "checkpoints")
    )


def _load_weights(config: RecapConfig, env: DistEnv, checkpoint: str | None):
    from tml.core.checkpoint import Checkpointer, resolve_checkpoint
    from tml.projects.home.recap import build

    sharded = build.build_sharded(config, env)
    path = resolve_checkpoint(checkpoint or os.path.join(config.training.save_dir, "checkpoints"))
    Checkpointer(config.training.save_dir, sharded.module, {}, None, env).load(path)
    logger.info("loaded weights from %s", path)
    return sharded, path


def evaluate(config: RecapConfig, checkpoint: str | None) -> None:
    from tml.ml_logging.metrics import MetricLogger
    from tml.projects.home.recap.evaluate import print_table, validate

    if not config.validation_data:
        raise ConfigError("evaluate: the config has no validation_data partitions to evaluate")
    env = _runtime(config)
    sharded, path = _load_weights(config, env, checkpoint)
    step = int(os.path.basename(path).removeprefix("step-")) if "step-" in path else 0
    metric_logger = MetricLogger(config.training.save_dir, env.rank, console=False)
    results = validate(config, sharded.module, env, metric_logger, step, _bf16(config, env))
    metric_logger.close()
    if env.rank == 0:
        print(print_table(results))


def predict(config: RecapConfig, checkpoint: str | None, inputs: str, output: str) -> None:
    from tml.projects.home.recap.predict import write_predictions

    env = _runtime(config)
    sharded, _ = _load_weights(config, env, checkpoint)
    write_predictions(config, sharded.module, env, inputs, output)


def summary(config: RecapConfig) -> None:
    from tml.core.model_summary import summarize
    from tml.projects.home.recap.build import build_train_module

    print(summarize(build_train_module(config).model))


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
        if mode == "predict":
            p.add_argument("--input", required=True, help="Parquet glob or fsspec URL to score")
            p.add_argument("--output", required=True, help="output folder (one part file per rank)")
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
        run_distributed(lambda: evaluate(config, args.checkpoint))
    elif args.mode == "predict":
        run_distributed(lambda: predict(config, args.checkpoint, args.input, args.output))
    elif args.mode == "summary":
        summary(config)
    elif args.mode == "generate-data":
        generate_data(config, args.num_examples, args.output, args.seed, args.validation_fraction)
    elif args.mode == "compute-stats":
        compute_stats(config, args.output)


if __name__ == "__main__":
    cli()
