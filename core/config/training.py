"""The `training` section (the original's keys plus evaluation cadence, precision and devices) and the
per-table sharding section that projects put next to their embedding tables.

Example:
    training:
      save_dir: runs/experiment_1
      num_train_steps: 10000
      checkpoint_every_n: 1000
      eval_every_n: 1000
      mixed_precision: bf16
"""

from __future__ import annotations

from typing import Literal

import pydantic

from tml.core.config.base import BaseConfig
from tml.ml_logging.mlflow_sink import MlflowConfig

_F = pydantic.Field


class ProfileConfig(BaseConfig):
    """torch.profiler over a few optimizer steps on every rank (docs/training.md, "Profiling")."""

    start_step: int = _F(
        ge=1, description="First optimizer step traced (1-based, counted across resumes); skip the first few."
    )
    num_steps: int = _F(3, ge=1, description="Consecutive steps traced.")
    record_shapes: bool = _F(False, description="Record operator input shapes (slower, larger traces).")
    profile_memory: bool = _F(False, description="Record tensor allocations and frees.")
    with_stack: bool = _F(False, description="Record Python stacks of operators (much larger traces).")


class TrainingConfig(BaseConfig):
    """How long to train, where to write, how often to log, evaluate and checkpoint."""

    save_dir: str = _F(description="Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/.")
    num_train_steps: int = _F(
        ge=1, description="Optimizer steps to train (each of gradient_accumulation batches)."
    )
    initial_checkpoint_dir: str | None = _F(
        None,
        description="Warm start: load model weights (not optimizer state or step) from this checkpoint "
        "folder (a step-N folder or a run's checkpoints/ folder: its latest) when save_dir has none.",
    )
    checkpoint_every_n: int = _F(1000, ge=1, description="Save a checkpoint every N optimizer steps.")
    checkpoint_max_to_keep: int = _F(3, ge=1, description="Keep only the newest N checkpoints.")
    train_log_every_n: int = _F(100, ge=1, description="Log train/* metrics every N optimizer steps.")
    num_eval_steps: int | None = _F(
        None, description="Batches per evaluation and partition (> 0); None or -1: one full pass."
    )
    eval_every_n: int | None = _F(
        None, ge=1, description="Evaluate every N optimizer steps (and at the end); None: only at the end."
    )
    eval_log_every_n: int = _F(100, ge=1, description="Update the evaluation progress every N batches.")
    gradient_accumulation: int = _F(
        1, ge=1, description="Batches whose gradients are summed (loss / N each) before one optimizer step."
    )
    seed: int = _F(0, description="Seed of torch's generators (the same on every rank).")
    mixed_precision: Literal["auto", "none", "bf16"] = _F(
        "auto",
        description="bf16 autocast of the forward pass (training and evaluation); auto: bf16 on cuda and on "
        "CPUs with AMX (Intel Xeon since Sapphire Rapids), none on other CPUs, where bf16 is slower than fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = _F("auto", description="auto: cuda when available.")
    backend: Literal["auto", "gloo", "nccl"] = _F("auto", description="auto: nccl on cuda, gloo on cpu.")
    collective_timeout_s: int = _F(
        600, ge=1, description="Seconds a collective may wait for other ranks before the job fails."
    )
    pipeline: Literal["auto", "eager", "base", "sparse_dist"] = _F(
        "auto",
        description=(
            "How batches flow through a train step (docs/training.md): eager (copy, forward, backward, "
            "step), base (torchrec TrainPipelineBase: the next batch's host-to-device copy overlaps this "
            "step), sparse_dist (torchrec TrainPipelineSparseDist: also the embedding input all-to-alls); "
            "auto: sparse_dist on cuda for models with fused embedding tables, eager otherwise."
        ),
    )
    compile: Literal["auto", "none", "dense"] = _F(
        "auto",
        description=(
            "torch.compile of the model's dense parts (every submodule without embedding tables; "
            "docs/training.md): dense, or none; auto: none (no machine kind measured in "
            "benchmarks/RESULTS.md gains from it by default)."
        ),
    )
    profile: ProfileConfig | None = _F(
        None, description="Trace some steps with torch.profiler into <save_dir>/profile/ (None: off)."
    )
    mlflow: MlflowConfig | None = _F(
        None,
        description="Also log params, metrics and the last checkpoint to MLflow (pip install 'tml[mlflow]'; "
        "docs/runs.md); None: off.",
    )
    num_threads: int | None = _F(
        None,
        ge=1,
        description=(
            "torch's intra-op CPU threads per process. None: OMP_NUM_THREADS when set (torchrun sets 1), "
            "else this process's share of the cores minus one left to the data reader's decoding threads "
            "(oversubscribed cores halve CPU training speed); a CPU run then times its first steps and "
            "gives torch that core too when that is faster (docs/training.md). Set it for bit-identical reruns."
        ),
    )

    @pydantic.field_validator("num_eval_steps")
    @classmethod
    def _eval_steps(cls, value: int | None) -> int | None:
        # 0 batches would report metrics of nothing (NaN everywhere).
        if value is not None and value != -1 and value < 1:
            raise ValueError(
                f"{value} would evaluate no batch: use null or -1 for a full pass over each partition, or "
                "a positive number of batches"
            )
        return value

    @pydantic.model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("backend 'nccl' needs device 'cuda' (or 'auto' on a GPU machine)")
        return self


ShardingType = Literal["data_parallel", "table_wise", "row_wise", "table_row_wise", "column_wise"]
ComputeKernel = Literal["fused", "dense"]


class EmbeddingShardingConfig(BaseConfig):
    """How one embedding table is placed across ranks; unset keys are left to the planner.

    `compute_kernel: dense` runs the table's optimizer as an ordinary torch optimizer and is only
    available with `sharding_type: data_parallel` (a replicated table); `fused` applies the optimizer
    inside the backward pass and works with every model-parallel sharding type.
    """

    sharding_type: ShardingType | None = _F(None, description="Placement across ranks; None: planner.")
    compute_kernel: ComputeKernel | None = _F(None, description="fused | dense; None: planner.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> EmbeddingShardingConfig:
        dp = self.sharding_type == "data_parallel"
        if self.compute_kernel == "dense" and self.sharding_type not in (None, "data_parallel"):
            raise ValueError(
                f"compute_kernel 'dense' needs sharding_type 'data_parallel', got '{self.sharding_type}'"
            )
        if self.compute_kernel == "fused" and dp:
            raise ValueError("sharding_type 'data_parallel' has only the 'dense' compute_kernel")
        return self
