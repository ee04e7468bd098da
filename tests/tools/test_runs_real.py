"""tml-runs and the HParams record on a real (tiny) tml-recap run folder: its config.yaml, metrics.jsonl
and tensorboard/ as the trainer writes them."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from tml.ml_logging.hparams import flatten_config
from tml.ml_logging.run_folder import final_metrics, read_run
from tml.tools.runs import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL = str(ROOT / "projects/home/recap/config/local.yaml")
FAV = "eval/valid/recap.engagement.is_favorited"


def _train(tmp_path, *args):
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    done = subprocess.run(
        [sys.executable, "-m", "tml.projects.home.recap.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_compare_and_hparams_on_a_trained_run(tmp_path, capsys, monkeypatch):
    from tml.projects.home.recap.main import cli as recap_cli

    data = tmp_path / "data" / "local"
    monkeypatch.setenv("TML_DATA", str(tmp_path / "data"))
    recap_cli(["generate-data", "--config", LOCAL, "--num-examples", "2000", "--output", str(data)])
    tiny = [
        "train_data.global_batch_size=64",
        "validation_data.valid.global_batch_size=64",
        "training.num_train_steps=4",
        "training.eval_every_n=2",
        "training.train_log_every_n=2",
        "training.checkpoint_every_n=4",
    ]
    mlflow = importlib.util.find_spec("mlflow") is not None
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "mlflow-artifacts"  # not ./mlruns of the working directory
    sink = [
        f"training.mlflow={{tracking_uri: '{store}', experiment: real, artifact_location: '{artifacts}'}}"
    ]
    sink = sink if mlflow else []
    _train(tmp_path, "train", "--config", LOCAL, *tiny, *sink)
    run = tmp_path / "runs" / "local"

    # A second run folder: the same run as if trained with another Adam epsilon.
    other = tmp_path / "runs" / "eps-1e-6"
    other.mkdir()
    shutil.copy(run / "metrics.jsonl", other / "metrics.jsonl")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["optimizer"]["adam"]["epsilon"] = 1.0e-6
    config["training"]["save_dir"] = str(other)
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    plot = ["--plot", f"{FAV}/*au*", "--output", str(tmp_path / "p.png")]
    assert cli(["compare", str(run), str(other), *plot]) == 0
    out = capsys.readouterr().out
    assert "config: 2 of " in out
    assert "optimizer.adam.epsilon  1e-07" in out and "training.save_dir" in out
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith("step ")).split() == ["step", "4", "4"]
    assert next(line for line in lines if line.startswith(f"{FAV}/auroc ")).count("@") == 2
    assert f"wrote {tmp_path / 'p.png'}: 2 metric(s), 2 run(s)" in out  # auroc, pr_auc

    trained = read_run(str(run))
    finals = final_metrics(str(run))
    assert "train/loss" in finals and f"{FAV}/auroc" in finals and f"{FAV}/count" not in finals
    assert set(finals) <= set(trained.history)
    # The trainer wrote its own HParams record at the end of the run.

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run / "tensorboard" / "hparams"))
    acc.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    )
    flat = flatten_config(trained.config)
    assert set(start.hparams) == {key for key, value in flat.items() if value is not None}
    assert start.hparams["training.num_train_steps"].number_value == 4
    assert sorted(acc.Tags()["scalars"]) == sorted(finals)
    if mlflow:
        _check_mlflow(store, run)


def _check_mlflow(store: str, run: pathlib.Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (logged,) = client.search_runs([client.get_experiment_by_name("real").experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "local"
    assert logged.data.params["training.num_train_steps"] == "4"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "train/loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
