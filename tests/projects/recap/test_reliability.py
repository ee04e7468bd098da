"""evaluate's calibration report: isotonic_* companions of the ranking metrics (overall and per segment)
computed on the calibrated probabilities, and one reliability diagram per partition and task, also for a
task without positives."""

import pathlib
import types

import pytest
import torch

from tml.core.config.loader import load_config
from tml.projects.home.recap.build import build_metrics
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.reliability import CalibrationReport, write_diagrams

pytestmark = pytest.mark.unit
LOCAL = pathlib.Path(__file__).resolve().parents[3] / "projects/home/recap/config/local.yaml"


def test_report_adds_isotonic_columns_and_draws_every_task(tmp_path):
    config = load_config(RecapConfig, str(LOCAL), env={})
    tasks = list(config.model.tasks)
    # Doubles every probability up to 0.5: the calibrated mean prediction is twice the trained one.
    knots = {task: ([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) for task in tasks}
    report = CalibrationReport(build_metrics(config, "cpu"), config, knots, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        p = torch.rand(256, 4, generator=generator) * 0.2
        labels = (torch.rand(256, 4, generator=generator) < p).float()
        labels[:, 2] = 0  # is_replied: no positives
        batch = types.SimpleNamespace(dense={"discrete": torch.randint(0, 3, (256, 8), generator=generator)})
        report.update(batch, {"probabilities": p, "labels": labels, "weights": torch.ones(256, 4)})
    results = report.compute()
    fav = "recap.engagement.is_favorited"
    assert results[f"{fav}/isotonic_mean_prediction"] == pytest.approx(2 * results[f"{fav}/mean_prediction"])
    assert f"client_0=0/{fav}/isotonic_rce" in results
    assert {key.rpartition("/isotonic_")[2] for key in results if "/isotonic_" in key} == {
        "auroc", "log_loss", "rce", "calibration", "mean_prediction"
    }  # fmt: skip
    paths = write_diagrams({"valid": report}, tasks, str(tmp_path / "step-1"))
    assert paths == [str(tmp_path / f"step-1.valid.{task}.reliability.png") for task in tasks]
    assert all(pathlib.Path(path).read_bytes()[:4] == b"\x89PNG" for path in paths)


def test_report_without_calibration_has_only_the_trained_metrics(tmp_path):
    config = load_config(RecapConfig, str(LOCAL), env={})
    report = CalibrationReport(build_metrics(config, "cpu"), config, None, torch.device("cpu"))
    batch = types.SimpleNamespace(dense={"discrete": torch.zeros(8, 8, dtype=torch.long)})
    p = torch.full((8, 4), 0.1)
    report.update(batch, {"probabilities": p, "labels": torch.ones(8, 4), "weights": torch.ones(8, 4)})
    results = report.compute()
    assert results and not any("isotonic" in key for key in results) and report.after is None
    assert len(write_diagrams({"valid": report}, list(config.model.tasks), str(tmp_path / "s"))) == 4
