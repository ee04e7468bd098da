"""Evaluation of every `validation_data` partition: per task and per segment metrics, logged and tabulated."""

from __future__ import annotations

import json
import os

import torch

from tml.core.config.loader import ConfigError
from tml.core.distributed import DistEnv
from tml.core.eval_loop import evaluate
from tml.ml_logging.console import eval_tables
from tml.ml_logging.log import get_logger
from tml.projects.home.recap.build import build_metrics, build_validation_data
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.reliability import CalibrationReport, write_diagrams
from tml.reader.dataset import ParquetDataset

logger = get_logger(__name__)


def validate(
    config: RecapConfig,
    module: torch.nn.Module,
    env: DistEnv,
    bf16: bool,
    datasets: dict[str, ParquetDataset],
    reports: dict | None = None,
    knots: dict | None = None,
) -> dict[str, float]:
    """Evaluate each partition (`datasets`, from build_validation_data: one new pass each):
    `eval/<partition>/[<segment>/]<task>/<metric>` (reduced over ranks). With `reports` (a dict), each
    partition's `reliability.CalibrationReport` lands there, and with `knots` (a fitted isotonic map) the
    metrics of the calibrated probabilities are added as `.../<task>/isotonic_<metric>`."""
    steps = config.training.num_eval_steps
    steps = None if steps is None or steps < 0 else steps
    results: dict[str, float] = {}
    for name, data in config.validation_data.items():
        metrics = build_metrics(config, env.device)
        if reports is not None:
            metrics = reports[name] = CalibrationReport(metrics, config, knots, env.device)
        values = evaluate(
            module,
            datasets[name],
            metrics,
            steps,
            env,
            bf16=bf16,
            desc=f"eval/{name}",
            log_every_n=config.training.eval_log_every_n,
        )
        keep = set(data.evaluation_tasks)
        for key, value in values.items():
            task = key.split("/")[-2]
            if not keep or task in keep:
                results[f"eval/{name}/{key}"] = value
    return results


def print_table(results: dict[str, float]) -> str:
    """One table per partition: a row per task and segment, a column per metric."""
    return eval_tables(results)


def evaluate_checkpoint(config: RecapConfig, checkpoint: str | None, output: str | None) -> dict[str, float]:
    """`tml-recap evaluate`: every partition on a checkpoint; writes `<save_dir>/evaluate/step-N.json` (or
    `output`) and a reliability diagram per partition and task beside it, and prints the table on rank 0.
    With the checkpoint's calibration file, the isotonic-calibrated metrics are reported too."""
    from tml.core.checkpoint import resolve_checkpoint
    from tml.core.run import use_bf16
    from tml.projects.home.recap.build import build_for_inference
    from tml.projects.home.recap.calibration import checkpoint_calibration

    if not config.validation_data:
        raise ConfigError("evaluate: the config has no validation_data partitions to evaluate")
    checkpoint = resolve_checkpoint(checkpoint or config.training.save_dir)
    env, sharded, step = build_for_inference(config, checkpoint)
    found = checkpoint_calibration(config, sharded.module, checkpoint)
    datasets = build_validation_data(config, env)
    reports: dict[str, CalibrationReport] = {}
    bf16 = use_bf16(config.training, env)
    results = validate(config, sharded.module, env, bf16, datasets, reports, found and found[0])
    if env.is_main:
        path = output or os.path.join(config.training.save_dir, "evaluate", f"step-{step}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"step": step, **results}, f, indent=1)
        diagrams = write_diagrams(reports, list(config.model.tasks), path.removesuffix(".json"))
        print(print_table(results))
        logger.info(
            "evaluation of step %d written to %s (and %d reliability diagrams)", step, path, len(diagrams)
        )
        if found:
            logger.info("isotonic_* columns: the probabilities calibrated by %s", found[1])
    return results
