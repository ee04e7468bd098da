"""The run lifecycle, once for every project: start the process, then resume or warm start, train with its
eval and checkpoint cadence, save and evaluate the last step.

A project builds its pieces with its own `build_*` functions and hands them over as a `TrainJob`; `fit`
does the rest. Before anything is written to `training.save_dir`, a resume is checked against the
checkpoint: a different model (config section or tensor shapes) or a different data plan is refused with
the setting named, so a wrong command never overwrites a run's `config.yaml`.

Example:
    env = start(config.training)
    sharded = build_sharded(config, env)
    optimizer, scheduler = build_optimizer(...)
    fit(TrainJob(config, config.training, sharded, optimizer, scheduler, dataset, MyBatch, evaluate), env)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pydantic
import torch
import yaml
from torch import nn

from tml.core.checkpoint import (
    Checkpointer,
    Preempted,
    complete_steps,
    load_weights,
    model_differences,
    resolve_checkpoint,
    warm_start,
)
from tml.core.compile import compile_dense
from tml.core.config.loader import ConfigError, save_config
from tml.core.config.training import TrainingConfig
from tml.core.cpu_threads import thread_tuner
from tml.core.distributed import DistEnv, configure_cpu_threads, init_distributed, seed_ranks
from tml.core.profiling import StepProfiler
from tml.core.sharding import ShardedModel
from tml.core.state import (
    DataState,
    FusedOptimizerState,
    LoopState,
    ModelState,
    OptimizerState,
    RngState,
    SchedulerState,
)
from tml.core.third_party import quiet_known_warnings
from tml.core.train_loop import LoopOptions, TrainResult, train
from tml.ml_logging.hparams import flatten_config, log_hparams
from tml.ml_logging.log import get_logger, setup_logging
from tml.ml_logging.metrics import MetricLogger
from tml.ml_logging.mlflow_sink import build_mlflow_sink
from tml.ml_logging.run_folder import final_metrics

logger = get_logger(__name__)


class ResumeError(ConfigError):
    """A run folder's checkpoint cannot continue with this config; nothing was written."""


def start(training: TrainingConfig) -> DistEnv:
    """Join the process group, set up logging and CPU threads, seed torch (the same on every rank, so
    every rank builds the same initial weights)."""
    quiet_known_warnings()
    env = init_distributed(training.backend, training.device, training.collective_timeout_s)
    setup_logging(env.rank)
    threads = configure_cpu_threads(training.num_threads)
    logger.info("torch CPU threads per process: %d", threads)
    torch.manual_seed(training.seed)
    return env


def use_bf16(training: TrainingConfig, env: DistEnv) -> bool:
    """Whether the forward runs under bf16 autocast (`training.mixed_precision`; auto: see its description)."""
    mode = training.mixed_precision
    if mode != "auto":
        return mode == "bf16"
    return env.device.type == "cuda" or (env.device.type == "cpu" and cpu_has_amx())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the matrix units bf16 matmuls use (Intel Xeon since Sapphire Rapids).

    Measured (benchmarks/RESULTS.md, "bf16 autocast on AMX"): bf16 trains prod.yaml 1.8x faster than fp32 on
    such a CPU, and was slower than fp32 on one with avx512_bf16 but no AMX, so auto picks bf16 only here.
    """
    detect = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent: assume no AMX
    return bool(detect and detect())


def use_compile(training: TrainingConfig) -> bool:
    """Whether `fit` compiles the dense parts (`training.compile`; auto is none: see its description)."""
    return training.compile == "dense"


@dataclasses.dataclass
class TrainJob:
    """What a project hands the lifecycle.

    Args:
        config: the project's whole config (saved as `<save_dir>/config.yaml`).
        training: its `training` section.
        sharded: the model from `shard_model`.
        optimizer / scheduler: the dense optimizer and its LR scheduler.
        train_data: iterable of batches with `state_dict(batches)` / `load_state_dict(state, all_states)`
            (tml.reader's datasets).
        batch_type: the batch class (registered with torchrec's pipelines).
        evaluate: (module, step) -> metrics {name: value}, logged by the lifecycle; None: no evaluation.
        model_section: the config key whose change makes a checkpoint unusable (compared on resume).
    """

    config: pydantic.BaseModel
    training: TrainingConfig
    sharded: ShardedModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_data: Any
    batch_type: type
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
    model_section: str = "model"


def check_save_dir(save_dir: str) -> None:
    if "://" in save_dir and not save_dir.startswith("file://"):
        raise ConfigError(
            f"training.save_dir {save_dir!r}: runs are written to a local or mounted folder (checkpoints are "
            "renamed into place, which object stores cannot do atomically); mount the bucket or write "
            "locally and copy the run folder afterwards"
        )


def _first_difference(saved: Any, current: Any, key: str) -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in [*saved, *(k for k in current if k not in saved)]:
            found = _first_difference(saved.get(name), current.get(name), f"{key}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            found = _first_difference(a, b, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    return None if saved == current else f"{key}: {saved!r} -> {current!r}"


def model_section_difference(config: pydantic.BaseModel, run_dir: str, section: str = "model") -> str | None:
    """The first key where `config`'s `section` differs from the one `<run_dir>/config.yaml` was trained
    with ("model.a.b: old -> new"), or None (the same, or the run folder has no config.yaml)."""
    saved_config = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved_config):
        return None
    with open(saved_config) as f:
        saved = (yaml.safe_load(f) or {}).get(section)
    return _first_difference(saved, config.model_dump(mode="json", by_alias=True).get(section), section)


def load_trained(
    module: nn.Module, checkpoint: str, config: pydantic.BaseModel, section: str = "model"
) -> int:
    """`load_weights` for evaluate / predict / export, after checking that `config` describes the model the
    checkpoint's run trained: constants that live in the config, not the checkpoint (pos_weight, affine maps,
    downsampling rates), would otherwise change predictions silently. Returns the checkpoint's step."""
    path = resolve_checkpoint(checkpoint)
    run_dir = os.path.dirname(os.path.dirname(path))
    difference = model_section_difference(config, run_dir, section)
    if difference is not None:
        raise ConfigError(
            f"checkpoint {path} was trained with a different model ({difference}); use the run's own "
            f"config ({os.path.join(run_dir, 'config.yaml')}) or the same `{section}` section"
        )
    return load_weights(module, path)


def check_resume(job: TrainJob, checkpoint: str) -> None:
    """Refuse (ResumeError) to continue `checkpoint` with a different model; reads only."""
    t = job.training
    advice = "use a new `training.save_dir` with `initial_checkpoint_dir` to warm start"
    difference = model_section_difference(job.config, t.save_dir, job.model_section)
    if difference is not None:
        raise ResumeError(
            f"checkpoint in {os.path.dirname(checkpoint)} was trained with a different model "
            f"({difference}); {advice}"
        )
    problems = model_differences(job.sharded.module, checkpoint)
    if problems:
        raise ResumeError(
            f"checkpoint in {os.path.dirname(checkpoint)} was trained with a different model "
            f"({problems[0]}); {advice}"
        )


def _profiler(t: TrainingConfig, env: DistEnv) -> StepProfiler | None:
    if t.profile is None:
        return None
    p = t.profile
    folder = os.path.join(t.save_dir, "profile")
    return StepProfiler(
        p.start_step, p.num_steps, folder, env.rank, p.record_shapes, p.profile_memory, p.with_stack
    )


def _mlflow_sink(job: TrainJob, env: DistEnv):
    """Rank 0's MLflow sink with the run's params logged, or None when `training.mlflow` is unset."""
    m = job.training.mlflow
    if m is None or not env.is_main:
        return None
    name = m.run_name or os.path.basename(os.path.normpath(job.training.save_dir))
    sink = build_mlflow_sink(m.tracking_uri, m.experiment, name, job.training.save_dir, m.artifact_location)
    sink.log_params(flatten_config(job.config))
    return sink


def _close_mlflow(sink, t: TrainingConfig, checkpointer: Checkpointer, status: str) -> None:
    latest = checkpointer.latest_path()
    if t.mlflow.log_checkpoint and latest is not None and status != "failure":
        sink.log_artifacts(latest, f"checkpoints/{os.path.basename(latest)}")
    sink.log_artifacts(os.path.join(t.save_dir, "config.yaml"))
    sink.close({"success": "FINISHED", "running": "KILLED", "failure": "FAILED"}[status])


def training_states(sharded: ShardedModel, optimizer, scheduler, loop: LoopState) -> dict[str, Any]:
    """The job-wide checkpoint parts of a training run: model, every optimizer, scheduler, loop counters."""
    states: dict[str, Any] = {
        "model": ModelState(sharded.module),
        "optim/dense": OptimizerState(sharded.state_module, optimizer),
        "scheduler": SchedulerState(scheduler),
        "loop": loop,
    }
    for name, table_optimizer in sharded.table_optimizers.items():
        states[f"optim/table/{name}"] = OptimizerState(sharded.state_module, table_optimizer)
    if sharded.fused_optimizer is not None:
        states["fused"] = FusedOptimizerState(sharded.fused_optimizer)
    return states


def fit(job: TrainJob, env: DistEnv) -> TrainResult:
    """Resume from `save_dir`'s latest checkpoint (or warm start), train, save and evaluate the last step."""
    t = job.training
    check_save_dir(t.save_dir)
    loop = LoopState()
    states = training_states(job.sharded, job.optimizer, job.scheduler, loop)
    rank_states = {"data": DataState(job.train_data, loop), "rng": RngState(t.seed, env, loop)}
    steps = complete_steps(os.path.join(t.save_dir, "checkpoints"))
    latest = os.path.join(t.save_dir, "checkpoints", f"step-{steps[-1]}") if steps else None
    if latest is not None:
        check_resume(job, latest)
    checkpointer = Checkpointer(
        t.save_dir, env, states, rank_states, t.checkpoint_every_n, t.checkpoint_max_to_keep
    )
    restored = checkpointer.load(latest) if latest is not None else None
    if restored is not None:
        logger.info("resumed from step %d of %s", restored, t.save_dir)
    else:
        if t.initial_checkpoint_dir is not None:
            warm_start(job.sharded.module, t.initial_checkpoint_dir)
        seed_ranks(t.seed, env)
    if env.is_main:
        save_config(job.config, os.path.join(t.save_dir, "config.yaml"))
        log_hparams(t.save_dir, job.config, {}, step=loop.step, status="running")
    with checkpointer.signal_handlers():  # until training and its bookkeeping are done
        mlflow = _mlflow_sink(job, env)
        metric_logger = MetricLogger(t.save_dir, env.rank, sinks=[mlflow] if mlflow else ())
        evaluate = None
        if job.evaluate is not None:

            def evaluate(step: int) -> None:
                metric_logger.log(step, job.evaluate(job.sharded.module, step))

        bf16 = use_bf16(t, env)
        logger.info(
            "forward precision: %s (training.mixed_precision=%s)",
            "bf16" if bf16 else "fp32",
            t.mixed_precision,
        )
        options = LoopOptions(
            num_train_steps=t.num_train_steps,
            gradient_accumulation=t.gradient_accumulation,
            train_log_every_n=t.train_log_every_n,
            eval_every_n=t.eval_every_n,
            bf16=bf16,
            pipeline=t.pipeline,
            batch_type=job.batch_type,
            profiler=_profiler(t, env),
            threads=thread_tuner(t.num_threads, env, job.train_data, t.gradient_accumulation, use_compile(t)),
        )
        if use_compile(t):
            compiled = compile_dense(job.sharded.module)
            logger.info(
                "compiled (training.compile=%s): %s", t.compile, ", ".join(n or "<model>" for n in compiled)
            )
        optimizers = [job.optimizer, *job.sharded.table_optimizers.values()]
        status = "failure"
        try:
            result = train(
                job.sharded.module,
                optimizers,
                job.scheduler,
                job.train_data,
                env,
                options,
                metric_logger,
                checkpointer,
                evaluate,
                loop,
            )
            status = "success"
        except Preempted:
            status = "running"  # stopped by a signal after its checkpoint: the run continues when restarted
            raise
        finally:
            metric_logger.close()
            if env.is_main:
                # The dashboard's row for this run: its config and final metrics, or how it ended.
                log_hparams(t.save_dir, job.config, final_metrics(t.save_dir), step=loop.step, status=status)
            if mlflow is not None:
                _close_mlflow(mlflow, t, checkpointer, status)
    logger.info("training done at step %d; checkpoints in %s", result.step, checkpointer.dir)
    return result
