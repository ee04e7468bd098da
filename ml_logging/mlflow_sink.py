"""An MLflow sink for a run: params (the flattened config), step-wise metrics and artifacts (checkpoints).

Needs the `mlflow` extra (`pip install 'tml[mlflow]'`: mlflow-skinny with SQLAlchemy and Alembic, enough for
a `sqlite:///` store or an MLflow server); `mlflow` is imported only when a sink is built. The sink holds an
`MlflowClient` on one MLflow run and logs synchronously; build it on rank 0 only.

With `save_dir`, the MLflow run id is kept in `<save_dir>/mlflow_run.json`, so a run folder that resumes
from its checkpoint continues its MLflow run (same metric history) instead of starting a second one.

MLflow names allow letters, digits and `_ - . / : space`: `=` in segment names becomes `:`
(`eval/valid/country:7/fav/auroc`), any other character `_`.

Example:
    sink = build_mlflow_sink("sqlite:///runs/mlflow.db", "recap", "lr-3e-3", save_dir="runs/lr-3e-3")
    sink.log_params(flatten_config(config))
    sink.log_metrics(100, {"train/loss": 0.41})
    sink.log_artifacts("runs/lr-3e-3/checkpoints/step-500", "checkpoints/step-500")
    sink.close()
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

import pydantic

from tml.core.config.base import BaseConfig
from tml.ml_logging.hparams import Scalar, format_value
from tml.ml_logging.log import get_logger

logger = get_logger(__name__)
RUN_FILE = "mlflow_run.json"
_INVALID = re.compile(r"[^\w\-./: ]")


class MlflowConfig(BaseConfig):
    """Where a run's params, metrics and last checkpoint go in MLflow (needs `pip install 'tml[mlflow]'`)."""

    tracking_uri: str = pydantic.Field(
        description="MLflow tracking URI: sqlite:///path/mlflow.db, http(s)://server, or a databricks URI."
    )
    experiment: str = pydantic.Field(description="MLflow experiment name; created when it does not exist.")
    run_name: str | None = pydantic.Field(
        None, description="MLflow run name; None: the name of the run folder (training.save_dir)."
    )
    artifact_location: str | None = pydantic.Field(
        None,
        description="Artifact root of the experiment when this run creates it; None: the tracking "
        "server's default (./mlruns of the working directory for a sqlite:/// store).",
    )
    log_checkpoint: bool = pydantic.Field(
        True,
        description="Upload the last checkpoint folder as artifact checkpoints/step-N when the run ends "
        "(the artifact store gets a full copy: turn off for models with large embedding tables).",
    )


def _import_mlflow() -> type:
    """mlflow's MlflowClient class, or an ImportError that names the extra to install."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ImportError(
            "the MLflow sink needs the mlflow extra: pip install 'tml[mlflow]' "
            f"(mlflow-skinny, sqlalchemy, alembic); import failed: {err}"
        ) from err
    return MlflowClient


def mlflow_name(name: str) -> str:
    """`name` with the characters MLflow rejects in param and metric keys replaced (see module doc)."""
    return _INVALID.sub("_", name.replace("=", ":"))


class MlflowSink:
    """Log to one MLflow run: `log_params`, `log_metrics`, `log_artifacts`, `close`.

    Args:
        tracking_uri: MLflow tracking URI (`sqlite:///abs/path/mlflow.db`, `http://host:5000`, ...).
        experiment: experiment name, created (with `artifact_location`) when missing.
        run_name: name of a new MLflow run.
        run_id: continue this existing run instead of creating one.
        artifact_location: artifact root for a newly created experiment (None: the server's default).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        client_type = _import_mlflow()
        self.tracking_uri = tracking_uri
        self.client = client_type(tracking_uri=tracking_uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Scalar]) -> None:
        """Log params (a flattened config) as strings written the way `tml-runs compare` shows them.

        MLflow params cannot change: a key this run already has (a resumed run) keeps its first value,
        and a changed one is reported as a warning.
        """
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        existing = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            name, text = mlflow_name(key), format_value(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                logger.warning("MLflow param %s cut to %d characters", key, MAX_PARAM_VAL_LENGTH)
                text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            if name not in existing:
                new.append(Param(name, text))
            elif existing[name] != text:
                changed.append(f"{key} ({existing[name]} -> {text})")
        if changed:
            logger.warning(
                "MLflow run %s keeps its first params (MLflow params cannot change): %s",
                self.run_id,
                ", ".join(changed),
            )
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one step's metrics (the same call as `MetricLogger.log`); NaN is kept as NaN."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_name(name), float(value), now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])

    def log_artifacts(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a file or a folder's contents under `artifact_path` (default: the file's or folder's
        name, so `checkpoints/step-500` lands in `step-500/`)."""
        if os.path.isdir(path):
            name = artifact_path or os.path.basename(os.path.normpath(path))
            self.client.log_artifacts(self.run_id, path, name)
        elif os.path.isfile(path):
            self.client.log_artifact(self.run_id, path, artifact_path)
        else:
            raise FileNotFoundError(f"MLflow artifact {path}: no such file or folder")

    def close(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """End the MLflow run with `status` (FAILED after an error, KILLED after a stop signal)."""
        self.client.set_terminated(self.run_id, status=status)


def build_mlflow_sink(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    save_dir: str | None = None,
    artifact_location: str | None = None,
) -> MlflowSink:
    """The sink for a run; with `save_dir`, the run folder's MLflow run continues when it exists (same
    tracking URI and experiment, run not deleted), else the new run's id goes to `<save_dir>/mlflow_run.json`."""
    record_path = os.path.join(save_dir, RUN_FILE) if save_dir is not None else None
    run_id = _recorded_run(record_path, tracking_uri, experiment)
    sink = MlflowSink(tracking_uri, experiment, run_name, run_id, artifact_location)
    if run_id is not None:
        logger.info("continuing MLflow run %s", run_id)
    elif record_path is not None:
        os.makedirs(save_dir, exist_ok=True)
        with open(record_path, "w", encoding="utf-8") as f:
            json.dump({"tracking_uri": tracking_uri, "run_id": sink.run_id}, f)
    return sink


def _recorded_run(record_path: str | None, tracking_uri: str, experiment: str) -> str | None:
    if record_path is None or not os.path.exists(record_path):
        return None
    with open(record_path, encoding="utf-8") as f:
        try:
            record: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{record_path}: not JSON ({err.msg}); delete it to start a new MLflow run"
            ) from err
    if record.get("tracking_uri") != tracking_uri:
        return None
    client_type = _import_mlflow()
    from mlflow.exceptions import MlflowException

    client = client_type(tracking_uri=tracking_uri)
    try:
        run = client.get_run(record["run_id"])
    except MlflowException:  # the run is gone from this store
        return None
    if (
        run.info.lifecycle_stage == "deleted"
        or client.get_experiment(run.info.experiment_id).name != experiment
    ):
        return None
    return run.info.run_id
