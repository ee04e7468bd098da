"""Reading run folders back: partial and resumed metrics.jsonl, NaN, bad folders, the default selection."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tml.ml_logging.metrics import MetricLogger
from tml.ml_logging.run_folder import NotARunError, default_metrics, final_metrics, read_run

pytestmark = pytest.mark.unit


def _run(tmp_path, lines: list[str], config=None):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config or {"training": {"seed": 0}}))
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    return tmp_path


def test_reads_what_metric_logger_writes(tmp_path):
    (tmp_path / "config.yaml").write_text("training:\n  seed: 3\n")
    logger = MetricLogger(str(tmp_path), console=False, tensorboard=False)
    logger.log(10, {"train/loss": 0.5, "train/lr/dense": 0.1})
    logger.log(20, {"train/loss": float("nan"), "eval/valid/fav/auroc": 0.7})
    logger.close()
    run = read_run(str(tmp_path))
    assert run.config == {"training": {"seed": 3}}
    assert run.history["train/lr/dense"] == [(10, 0.1)]
    assert run.history["eval/valid/fav/auroc"] == [(20, 0.7)]
    assert [s for s, _ in run.history["train/loss"]] == [10, 20] and math.isnan(
        run.history["train/loss"][1][1]
    )
    assert run.last_step == 20


def test_half_written_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    run = read_run(str(_run(tmp_path, ['{"step": 1, "train/loss": 0.5}\n', '{"step": 2, "train/lo'])))
    assert run.history == {"train/loss": [(1, 0.5)]}
    _run(tmp_path, ['{"step": 1, "train/loss": 0.5}\n', "{oops\n", '{"step": 3, "train/loss": 0.4}\n'])
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_run(str(tmp_path))
    _run(tmp_path, ['{"train/loss": 0.5}\n'])
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: expected a JSON object with an integer 'step'"):
        read_run(str(tmp_path))
    _run(tmp_path, ['{"step": 1, "train/loss": "fast"}\n'])
    with pytest.raises(ValueError, match=r"metric 'train/loss' has a non-numeric value 'fast'"):
        read_run(str(tmp_path))


def test_a_resumed_run_keeps_the_later_value_of_a_repeated_step(tmp_path):
    records = [{"step": s, "train/loss": v} for s, v in [(2, 0.9), (4, 0.8), (6, 0.7), (4, 0.75), (6, 0.65)]]
    run = read_run(str(_run(tmp_path, [json.dumps(r) + "\n" for r in records])))
    assert run.history["train/loss"] == [(2, 0.9), (4, 0.75), (6, 0.65)]


def test_run_without_metrics_yet(tmp_path):
    (tmp_path / "config.yaml").write_text("a: 1\n")
    run = read_run(str(tmp_path))
    assert run.history == {} and run.last_step is None


def test_not_a_run_folder_names_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(NotARunError, match=r"nowhere: no such folder"):
        read_run(str(tmp_path / "nowhere"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n')
    with pytest.raises(NotARunError, match=r"is not a run folder: it has no config.yaml$"):
        read_run(str(tmp_path))
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"config.yaml: expected a mapping of config sections, got list"):
        read_run(str(tmp_path))


def test_a_folder_of_runs_is_refused_with_a_hint(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("x: 1\n")
    with pytest.raises(NotARunError, match=r"it holds run folders: a, b; pass those"):
        read_run(str(tmp_path))


def test_default_metrics_are_train_loss_and_first_partition_quality_metrics():
    names = [
        "train/loss",
        "train/examples_per_s",
        "train/lr/dense",
        "eval/valid/fav/auroc",
        "eval/valid/fav/count",
        "eval/valid/fav/log_loss",
        "eval/valid/country=1/fav/auroc",
        "eval/test/fav/auroc",
        "eval/valid/reply/nrce",
    ]
    assert default_metrics(names) == [
        "train/loss",
        "eval/valid/fav/auroc",
        "eval/valid/fav/log_loss",
        "eval/valid/reply/nrce",
    ]
    assert default_metrics(["train/loss", "train/lr/dense"]) == ["train/loss"]


def test_final_metrics_are_the_last_finite_values(tmp_path):
    lines = [
        '{"step": 1, "train/loss": 0.5}\n',
        '{"step": 2, "train/loss": 0.4, "eval/valid/fav/auroc": "nan", "eval/valid/fav/rce": 3.0}\n',
    ]
    _run(tmp_path, lines)
    assert final_metrics(str(tmp_path)) == {"train/loss": 0.4, "eval/valid/fav/rce": 3.0}
    assert final_metrics(str(tmp_path), ["eval/valid/fav/rce", "absent"]) == {"eval/valid/fav/rce": 3.0}
