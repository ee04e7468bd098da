"""`RecapConfig`: the one config tree of the heavy ranker, in the original's YAML shape.

Sections: `training` (core), `model` (model.py), `train_data` / `validation_data` (the reader's DataConfig /
ValidationDataConfig, checked against each other: every partition must feed the model what train_data does),
`optimizer` (Adam/SGD/Adagrad with a backbone schedule and one per tower), `prediction` (ranking weights).
"""

from __future__ import annotations

import math
from typing import ClassVar

import pydantic

from tml.core.config.base import BaseConfig
from tml.core.config.training import TrainingConfig
from tml.core.errors import UserError
from tml.optimizers.config import AdagradConfig, AdamConfig, LearningRate, SgdConfig
from tml.projects.home.recap.config.calibration import CalibrationConfig
from tml.projects.home.recap.config.model import ModelConfig
from tml.projects.home.recap.config.plan import PlanConfig
from tml.reader.config import DataConfig, DataSource, ValidationDataConfig
from tml.reader.schema import resolve_dense_specs

_F = pydantic.Field

# Serving weights of the "For You" ranker as published in April 2023: score = sum_i weight_i * p_i.
PUBLISHED_RANKING_WEIGHTS: dict[str, float] = {
    "recap.engagement.is_favorited": 0.5,
    "recap.engagement.is_retweeted": 1.0,
    "recap.engagement.is_replied": 13.5,
    "recap.engagement.is_profile_clicked_and_profile_engaged": 12.0,
    "recap.engagement.is_video_playback_50": 0.005,
    "recap.engagement.is_replied_reply_engaged_by_author": 75.0,
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied": 11.0,
    "recap.engagement.is_good_clicked_convo_desc_v2": 10.0,
    "recap.engagement.is_negative_feedback_v2": -74.0,
    "recap.engagement.is_report_tweet_clicked": -369.0,
}


class MultiTaskLearningRates(BaseConfig):
    tower_learning_rates: dict[str, LearningRate] = _F(
        description="Task name -> schedule of that task's tower (every task needs one)."
    )
    backbone_learning_rate: LearningRate | None = _F(
        None,
        description="Schedule of every parameter outside the towers and the large tables (featurization, "
        "backbone, small embeddings, ...). Required when the model has such parameters, rejected when it "
        "has none (checked at build).",
    )


class RecapOptimizerConfig(BaseConfig):
    """The original's shape: an algorithm plus either one schedule or a backbone schedule and one per tower."""

    exactly_one_of: ClassVar = (
        ("adam", "sgd", "adagrad"),
        ("multi_task_learning_rates", "single_task_learning_rate"),
    )
    adam: AdamConfig | None = _F(None, description="Adam (AdamW when weight_decay > 0).")
    sgd: SgdConfig | None = _F(None, description="Stochastic gradient descent.")
    adagrad: AdagradConfig | None = _F(None, description="Adagrad.")
    multi_task_learning_rates: MultiTaskLearningRates | None = _F(
        None, description="A schedule for the backbone and one per task tower."
    )
    single_task_learning_rate: LearningRate | None = _F(None, description="One schedule for every parameter.")
    clip_grad_norm: float | None = _F(
        None,
        gt=0.0,
        description="Clip the dense gradients (every parameter outside the large tables) to this global L2 "
        "norm before each optimizer step; table gradients are not included.",
    )


class PredictionConfig(BaseConfig):
    ranking_weights: dict[str, float] | None = _F(
        None,
        description="Task -> weight of its probability in the ranking score sum_i w_i * p_i. None: the "
        "original's published weights for the tasks that have one, 0 for the others.",
    )
    batch_size: int = _F(
        4096, ge=1, description="Rows per batch on each rank while `predict` scores (bounds memory)."
    )


class RecapConfig(BaseConfig):
    training: TrainingConfig = _F(description="Run length, output folder, cadence, devices.")
    model: ModelConfig = _F(description="The ranker's architecture.")
    train_data: DataConfig = _F(description="Training data.")
    validation_data: dict[str, ValidationDataConfig] = _F(
        default_factory=dict,
        description="Named validation partitions, evaluated during and after training; each must give the "
        "model what train_data gives it (dense tensors, sparse features, tasks).",
    )
    optimizer: RecapOptimizerConfig = _F(description="Dense optimizer and learning-rate schedules.")
    prediction: PredictionConfig = _F(default_factory=PredictionConfig, description="`predict` mode.")
    calibration: CalibrationConfig = _F(
        default_factory=CalibrationConfig, description="Isotonic calibration (`calibrate`; docs/platform.md)."
    )
    plan: PlanConfig = _F(
        default_factory=PlanConfig, description="`tml-recap plan`'s phases (docs/platform.md)."
    )

    @pydantic.model_validator(mode="after")
    def _match_tasks(self) -> RecapConfig:
        # Labels are matched to towers by name (the original matched by position and trained on the wrong labels).
        tasks = list(self.model.tasks)
        for where, data in self._sections():
            if set(data.tasks) != set(tasks):
                raise ValueError(
                    f"{where}.tasks must name exactly the model's tasks (labels are matched by name): "
                    f"{_difference(where + '.tasks', data.tasks, tasks)}; model.tasks = {sorted(tasks)}"
                )
        for name, data in self.validation_data.items():
            unknown = sorted(set(data.evaluation_tasks) - set(tasks))
            if unknown:
                raise ValueError(
                    f"validation_data.{name}.evaluation_tasks: {unknown} are not in model.tasks {sorted(tasks)}"
                )
        rates = self.optimizer.multi_task_learning_rates
        if rates is not None and set(rates.tower_learning_rates) != set(tasks):
            key = "optimizer.multi_task_learning_rates.tower_learning_rates"
            raise ValueError(
                f"{key} must name exactly the model's tasks: {_difference(key, rates.tower_learning_rates, tasks)}"
                f"; model.tasks = {sorted(tasks)}"
            )
        self._check_id_ranges()
        self._check_partitions_fit_the_model()
        evaluation = {
            "eval_every_n": self.training.eval_every_n,
            "num_eval_steps": self.training.num_eval_steps,
        }
        unused = [f"training.{key}" for key, value in evaluation.items() if value is not None]
        if unused and not self.validation_data:
            raise ValueError(
                f"{' and '.join(unused)} set, but there is no validation_data partition to evaluate: add one or "
                "remove them"
            )
        weights = self.prediction.ranking_weights
        if weights is not None and set(weights) - set(tasks):
            raise ValueError(
                f"prediction.ranking_weights: {sorted(set(weights) - set(tasks))} are not model tasks"
            )
        return self

    def _sections(self) -> list[tuple[str, DataSource]]:
        return [
            ("train_data", self.train_data),
            *((f"validation_data.{k}", v) for k, v in self.validation_data.items()),
        ]

    def _check_partitions_fit_the_model(self) -> None:
        # The model is built from train_data's tensors; a partition that gives it other widths, dtypes or
        # sparse features would fail (or, for sparse features in another order, silently look up the wrong
        # table: sharded tables fix their input order at the first batch) at the first evaluation, hours in.
        expected = _dense_layout("train_data", self.train_data)
        sparse = [(f.name, f.num_buckets) for f in self.train_data.sparse_features]
        continuous = [(f.name, f.num_buckets) for f in self.train_data.sparse_continuous_features]
        for name, data in self.validation_data.items():
            where = f"validation_data.{name}"
            given = _dense_layout(where, data)
            for tensor, (width, dtype, source) in given.items():
                if tensor not in expected:
                    raise ValueError(
                        f"{where}: dense tensor {tensor!r} ({source}) is not in train_data, from which the "
                        f"model is built (its dense tensors: {sorted(expected)})"
                    )
                want_width, want_dtype, want_source = expected[tensor]
                if (width, dtype) != (want_width, want_dtype):
                    have, want = (width, want_width) if dtype == want_dtype else (dtype, want_dtype)
                    what = "width" if dtype == want_dtype else "dtype"
                    raise ValueError(
                        f"{where}: dense tensor {tensor!r} has {what} {have}, the model (built from "
                        f"train_data) expects {want} (train_data: {want_source}; {where}: {source})"
                    )
            missing = sorted(set(expected) - set(given))
            if missing:
                raise ValueError(
                    f"{where}: dense tensors {missing} of train_data (the model reads them) are missing "
                    "(seg_dense_schema / dense_columns)"
                )
            mine = [(f.name, f.num_buckets) for f in data.sparse_features]
            if mine != sparse:
                raise ValueError(
                    f"{where}.sparse_features must list the features of train_data.sparse_features in the "
                    f"same order with the same num_buckets (ids must reach the rows they trained): "
                    f"train_data has {_sparse_text(sparse)}, {where} has {_sparse_text(mine)}"
                )
            mine = [(f.name, f.num_buckets) for f in data.sparse_continuous_features]
            if mine != continuous:
                raise ValueError(
                    f"{where}.sparse_continuous_features must list the features of "
                    "train_data.sparse_continuous_features with the same num_buckets: train_data has "
                    f"{_sparse_text(continuous)}, {where} has {_sparse_text(mine)}"
                )

    def _check_id_ranges(self) -> None:
        # The reader takes ids modulo num_buckets; an id past a table's last row would be clamped onto a
        # real row by FBGEMM on GPU (silently training the wrong embedding), so every id must have a row.
        large = self.model.large_embeddings
        if large is None:
            return
        tables = {feature: table for table in large.tables for feature in table.features}
        for where, data in self._sections():
            for i, feature in enumerate(data.sparse_features):
                table = tables.get(feature.name)
                if table is None or (feature.num_buckets or math.inf) <= table.num_embeddings:
                    continue
                given = "is unset" if feature.num_buckets is None else f"= {feature.num_buckets} is larger"
                raise ValueError(
                    f"{where}.sparse_features[{i}].num_buckets {given} but feature {feature.name!r} feeds "
                    f"table {table.name!r} with num_embeddings = {table.num_embeddings}: set num_buckets <= "
                    "num_embeddings so that every id has a row of its own"
                )

    def ranking_weights(self) -> dict[str, float]:
        given = self.prediction.ranking_weights
        source = PUBLISHED_RANKING_WEIGHTS if given is None else given
        return {task: source.get(task, 0.0) for task in self.model.tasks}


def _difference(key: str, given, tasks: list[str]) -> str:
    """'<key> lacks [...]; has extra [...]' (only the parts that apply)."""
    lacks, extra = sorted(set(tasks) - set(given)), sorted(set(given) - set(tasks))
    parts = ([f"lacks {lacks}"] if lacks else []) + ([f"has extra {extra}"] if extra else [])
    return f"{key} " + "; ".join(parts)


def _dense_layout(where: str, data: DataSource) -> dict[str, tuple[int, str, str]]:
    """Dense tensor -> (width, dtype, the key that gives that width), from the config alone (schema files and
    masks are read)."""
    try:
        specs = resolve_dense_specs(data)
    except (ValueError, UserError) as error:
        raise ValueError(f"{where}.{error}") from error
    layout = {}
    for spec in specs:
        cut = f"preprocess.truncate_and_slice.{spec.name}_feature"
        if spec.keep is not None:
            source = f"{cut}_mask_path keeps {spec.width} indices"
        elif spec.truncation is not None:
            source = f"{cut}_truncation = {spec.truncation}"
        elif spec.is_list:
            source = f"seg_dense_schema feature length {spec.length}"
        else:
            source = f"dense_columns group of {spec.length} columns"
        layout[spec.name] = (spec.width, spec.dtype, source)
    return layout


def _sparse_text(features: list[tuple[str, int | None]]) -> str:
    return "[" + ", ".join(f"{n} (num_buckets {b})" for n, b in features) + "]" if features else "none"
