"""`RecapConfig`: the one config tree of the heavy ranker, in the original's YAML shape.

Sections: `training` (core), `model` (model.py), `train_data` / `validation_data` (the reader's DataConfig),
`optimizer` (Adam/SGD/Adagrad with a backbone schedule and one per tower), `prediction` (ranking weights).
"""

from __future__ import annotations

import math
from typing import ClassVar

import pydantic

from tml.core.config.base import BaseConfig
from tml.core.config.training import TrainingConfig
from tml.optimizers.config import AdagradConfig, AdamConfig, LearningRate, SgdConfig
from tml.projects.home.recap.config.model import ModelConfig
from tml.reader.config import DataConfig

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
    batch_size: int = _F(4096, ge=1, description="Rows per prediction batch.")


class RecapConfig(BaseConfig):
    training: TrainingConfig = _F(description="Run length, output folder, cadence, devices.")
    model: ModelConfig = _F(description="The ranker's architecture.")
    train_data: DataConfig = _F(description="Training data.")
    validation_data: dict[str, DataConfig] = _F(
        default_factory=dict, description="Named validation partitions, evaluated during and after training."
    )
    optimizer: RecapOptimizerConfig = _F(description="Dense optimizer and learning-rate schedules.")
    prediction: PredictionConfig = _F(default_factory=PredictionConfig, description="`predict` mode.")

    @pydantic.model_validator(mode="after")
    def _match_tasks(self) -> RecapConfig:
        # Labels are matched to towers by name (the original matched by position and trained on the wrong labels).
        tasks = list(self.model.tasks)
        for where, data in [
            ("train_data", self.train_data),
            *((f"validation_data.{k}", v) for k, v in self.validation_data.items()),
        ]:
            if set(data.tasks) != set(tasks):
                raise ValueError(
                    f"{where}.tasks must name exactly the model's tasks (labels are matched by name): "
                    f"model.tasks = {sorted(tasks)}, {where}.tasks = {sorted(data.tasks)}"
                )
            unknown = sorted(set(data.evaluation_tasks) - set(tasks))
            if unknown:
                raise ValueError(
                    f"{where}.evaluation_tasks: {unknown} are not in model.tasks {sorted(tasks)}"
                )
        rates = self.optimizer.multi_task_learning_rates
        if rates is not None and set(rates.tower_learning_rates) != set(tasks):
            raise ValueError(
                "optimizer.multi_task_learning_rates.tower_learning_rates must name exactly the model's tasks: "
                f"model.tasks = {sorted(tasks)}, tower_learning_rates = {sorted(rates.tower_learning_rates)}"
            )
        self._check_id_ranges()
        weights = self.prediction.ranking_weights
        if weights is not None and set(weights) - set(tasks):
            raise ValueError(
                f"prediction.ranking_weights: {sorted(set(weights) - set(tasks))} are not model tasks"
            )
        return self

    def _check_id_ranges(self) -> None:
        # The reader takes ids modulo num_buckets; an id past a table's last row would be clamped onto a
        # real row by FBGEMM on GPU (silently training the wrong embedding), so every id must have a row.
        large = self.model.large_embeddings
        if large is None:
            return
        tables = {feature: table for table in large.tables for feature in table.features}
        for where, data in [
            ("train_data", self.train_data),
            *((f"validation_data.{k}", v) for k, v in self.validation_data.items()),
        ]:
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
