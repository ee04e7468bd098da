"""Evaluation of every `validation_data` partition: per task and per segment metrics, logged and tabulated."""

from __future__ import annotations

import torch

from tml.core.distributed import DistEnv
from tml.core.eval_loop import evaluate
from tml.ml_logging.console import eval_tables
from tml.projects.home.recap.build import build_metrics, build_validation_data
from tml.projects.home.recap.config import RecapConfig


def validate(config: RecapConfig, module: torch.nn.Module, env: DistEnv, bf16: bool) -> dict[str, float]:
    """Evaluate each partition: `eval/<partition>/[<segment>/]<task>/<metric>` (reduced over ranks)."""
    steps = config.training.num_eval_steps
    steps = None if steps is None or steps < 0 else steps
    results: dict[str, float] = {}
    for name, data in config.validation_data.items():
        metrics = build_metrics(config, env.device)
        values = evaluate(
            module,
            build_validation_data(data, config, env),
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
