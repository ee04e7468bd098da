"""tml-recap: train | evaluate | predict | summary | generate-data | compute-stats | export | serve | score | calibrate | plan | calibrate-discretizer.

tml-recap train --config projects/home/recap/config/local.yaml training.num_train_steps=100
torchrun --nproc_per_node=2 -m tml.projects.home.recap.main train --config X.yaml
"""

from __future__ import annotations

import argparse

from tml.core.cli import add_debug_flag, user_errors_as_one_line
from tml.core.config.loader import load_config
from tml.core.distributed import run_distributed
from tml.ml_logging.log import get_logger, setup_logging
from tml.projects.home.recap import discretizer_calibration as discretizer_modes
from tml.projects.home.recap import platform_cli as platform_modes
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.serving import cli as serving

logger = get_logger(__name__)


def train(config: RecapConfig) -> None:
    from tml.core import run
    from tml.projects.home.recap import build
    from tml.projects.home.recap.evaluate import validate
    from tml.reader.batch import RecapBatch

    env = run.start(config.training)
    train_data = build.build_train_data(config, env)
    # Built before the model, so that a partition's missing files or columns fail now, not at the first
    # evaluation hours later.
    validation = build.build_validation_data(config, env)
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_recap_optimizer(config, sharded)
    bf16 = run.use_bf16(config.training, env)
    evaluate = (lambda module, step: validate(config, module, env, bf16, validation)) if validation else None
    job = run.TrainJob(
        config,
        config.training,
        sharded,
        optimizer,
        scheduler,
        train_data,
        RecapBatch,
        evaluate,
    )
    run.fit(job, env)


def summary(config: RecapConfig) -> None:
    from tml.core.model_summary import summarize
    from tml.projects.home.recap.build import build_train_module

    print(summarize(build_train_module(config, embedding_device="meta").model))


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


_MODES = {
    "train": "train (resumes from save_dir's latest checkpoint)",
    "evaluate": "evaluate a checkpoint on every validation_data partition",
    "predict": "Parquet in, Parquet out: ids, per-task probabilities and the ranking score",
    "summary": "print the model's structure and parameter counts (no data needed)",
    "generate-data": "write synthetic Parquet data in the config's schema",
    "compute-stats": "compute z-score statistics of the continuous features from train_data",
    **serving.MODES,
    **platform_modes.MODES,
    **discretizer_modes.MODES,
}
_ARGS = {  # mode -> (flags, argparse keywords)
    "evaluate": [("--checkpoint", {"help": "a step-N folder or a run folder (default: save_dir's latest)"}),
                 ("--output", {"help": "metrics JSON file (default: <save_dir>/evaluate/step-N.json)"})],
    "predict": [("--checkpoint", {"help": "a step-N folder or a run folder (default: save_dir's latest)"}),
                ("--input", {"required": True, "help": "Parquet glob or fsspec URL to score"}),
                ("--output", {"required": True, "help": "output folder (one part file per rank)"}),
                ("--overwrite", {"action": "store_true", "help": "replace part files already in --output"})],
    "generate-data": [("--num-examples", {"type": int, "required": True, "help": "training examples to draw"}),
                      ("--output", {"required": True, "help": "folder; gets train/ and one per partition"}),
                      ("--seed", {"type": int, "default": 0}),
                      ("--validation-fraction", {"type": _fraction, "default": 0.2,
                                                 "help": "rows per validation partition / --num-examples"})],
    "compute-stats": [("--output", {"help": "stats file (default: z_score_log_config.analysis_path)"})],
    **serving.ARGS,
    **platform_modes.ARGS,
    **discretizer_modes.ARGS,
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml-recap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in _MODES.items():
        p = sub.add_parser(mode, help=help_text)
        if mode not in serving.ARTIFACT_MODES:  # serve and score read the artifact's own config
            p.add_argument("--config", required=True, help="YAML config (local path or fsspec URL)")
            p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
        add_debug_flag(p)
        for flag, keywords in _ARGS.get(mode, []):
            p.add_argument(flag, **keywords)
    return parser


def cli(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors_as_one_line("tml-recap", args.debug):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    from tml.projects.home.recap import evaluate, predict
    from tml.projects.home.recap.data import synthetic
    from tml.projects.home.recap.model import stats

    if args.mode in serving.ARTIFACT_MODES:
        return serving.run_mode(args)
    config = load_config(RecapConfig, args.config, args.overrides)
    if args.mode == "train":
        run_distributed(lambda: train(config))
    elif args.mode == "evaluate":
        run_distributed(lambda: evaluate.evaluate_checkpoint(config, args.checkpoint, args.output))
    elif args.mode == "predict":
        run_distributed(
            lambda: predict.predict_checkpoint(
                config, args.checkpoint, args.input, args.output, args.overwrite
            )
        )
    elif args.mode == "summary":
        summary(config)
    elif args.mode == "generate-data":
        setup_logging(0)
        synthetic.generate_data(config, args.num_examples, args.output, args.seed, args.validation_fraction)
    elif args.mode == "compute-stats":
        setup_logging(0)
        stats.compute_stats_file(config, args.output)
    elif args.mode == "export":
        serving.run_mode(args, config)
    elif args.mode in platform_modes.MODES:
        platform_modes.run_mode(args, config)
    elif args.mode in discretizer_modes.MODES:
        discretizer_modes.run_mode(args, config)


if __name__ == "__main__":
    cli()
