"""The MLflow sink against a local SQLite store, read back through MlflowClient (skipped without the
`mlflow` extra, except the check of the error that names it)."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest

from tml.ml_logging.hparams import flatten_config
from tml.ml_logging.mlflow_sink import MlflowConfig, build_mlflow_sink, mlflow_name

pytestmark = [
    pytest.mark.unit,
    # SQLAlchemy deprecations raised inside mlflow's own store code.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds)."""
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'tml[mlflow]'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        root = tmp_path_factory.mktemp("mlflow")
        yield f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


def test_params_metrics_and_artifacts_read_back(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, artifacts = store
    save_dir = tmp_path / "runs" / "lr-3e-3"
    checkpoint = save_dir / "checkpoints" / "step-4"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "model" / "weights.bin").write_bytes(b"\x00" * 16)
    (checkpoint / "meta.json").write_text("{}")
    config = {"optimizer": {"lr": 0.003, "layers": [8, 4]}, "training": {"num_threads": None, "bf16": True}}

    sink = build_mlflow_sink(uri, "recap", "lr-3e-3", save_dir=str(save_dir), artifact_location=artifacts)
    sink.log_params(flatten_config(config))
    sink.log_metrics(2, {"train/loss": 0.5, "eval/valid/country=1/fav/auroc": 0.6})
    sink.log_metrics(4, {"train/loss": 0.4, "eval/valid/fav/auroc": float("nan")})
    sink.log_artifacts(str(checkpoint), "checkpoints/step-4")
    sink.close()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.run_name == "lr-3e-3" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "recap"
    assert run.data.params == {
        "optimizer.lr": "0.003",
        "optimizer.layers": "[8, 4]",
        "training.num_threads": "null",
        "training.bf16": "true",
    }
    history = [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "train/loss")]
    assert history == [(2, 0.5), (4, 0.4)]
    assert [m.value for m in client.get_metric_history(sink.run_id, "eval/valid/country:1/fav/auroc")] == [
        0.6
    ]
    assert math.isnan(client.get_metric_history(sink.run_id, "eval/valid/fav/auroc")[0].value)
    listed = {a.path for a in client.list_artifacts(sink.run_id, "checkpoints/step-4")}
    assert listed == {"checkpoints/step-4/model", "checkpoints/step-4/meta.json"}
    assert [a.path for a in client.list_artifacts(sink.run_id, "checkpoints/step-4/model")] == [
        "checkpoints/step-4/model/weights.bin"
    ]
    assert json.loads((save_dir / "mlflow_run.json").read_text()) == {
        "tracking_uri": uri,
        "run_id": sink.run_id,
    }


def test_a_resumed_run_folder_continues_its_mlflow_run(store, tmp_path, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient

    # Capture the sink's warnings here, whatever handlers earlier tests left on the `tml` logger.
    sink_logger = logging.getLogger("tml.ml_logging.mlflow_sink")
    monkeypatch.setattr(sink_logger, "propagate", False)
    monkeypatch.setattr(sink_logger, "handlers", [caplog.handler])
    caplog.set_level(logging.WARNING, logger=sink_logger.name)

    uri, artifacts = store
    first = build_mlflow_sink(uri, "recap", "r", save_dir=str(tmp_path / "r"), artifact_location=artifacts)
    first.log_params({"training.num_train_steps": 6, "seed": 0})
    first.log_metrics(6, {"train/loss": 0.5})
    first.close(status="KILLED")

    again = build_mlflow_sink(uri, "recap", "r", save_dir=str(tmp_path / "r"))
    assert again.run_id == first.run_id
    again.log_params({"training.num_train_steps": 8, "seed": 0, "new.key": "x"})
    again.log_metrics(8, {"train/loss": 0.4})
    again.log_artifacts(str(tmp_path / "r" / "mlflow_run.json"))
    again.close()
    assert "keeps its first params" in caplog.text and "training.num_train_steps (6 -> 8)" in caplog.text

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"training.num_train_steps": "6", "seed": "0", "new.key": "x"}
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [6, 8]
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["mlflow_run.json"]

    # Another experiment name, or no save_dir: a new MLflow run.
    other = build_mlflow_sink(uri, "recap-v2", "r", save_dir=str(tmp_path / "r"))
    assert other.run_id != first.run_id
    assert build_mlflow_sink(uri, "recap", "r").run_id not in (first.run_id, other.run_id)


def test_bad_artifact_path_and_bad_run_record(store, tmp_path):
    uri, artifacts = store
    sink = build_mlflow_sink(uri, "recap", "r", artifact_location=artifacts)
    with pytest.raises(FileNotFoundError, match=r"MLflow artifact .*nowhere: no such file or folder"):
        sink.log_artifacts(str(tmp_path / "nowhere"))
    (tmp_path / "mlflow_run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"mlflow_run.json: not JSON .*delete it to start a new MLflow run"):
        build_mlflow_sink(uri, "recap", "r", save_dir=str(tmp_path))


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r"needs the mlflow extra: pip install 'tml\[mlflow\]'"):
        build_mlflow_sink("sqlite:///x.db", "e", "r")


def test_names_and_config():
    assert mlflow_name("eval/valid/country=7/recap.fav/auroc") == "eval/valid/country:7/recap.fav/auroc"
    assert mlflow_name("odd|name") == "odd_name"
    config = MlflowConfig(tracking_uri="sqlite:///m.db", experiment="recap")
    assert config.run_name is None and config.log_checkpoint
    with pytest.raises(ValueError, match="extra_forbidden"):
        MlflowConfig(tracking_uri="sqlite:///m.db", experiment="recap", uri="x")
    assert all(field.description for field in MlflowConfig.model_fields.values())
