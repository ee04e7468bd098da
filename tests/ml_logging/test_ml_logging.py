import json
import logging

import pytest

from tml.ml_logging.log import get_logger, setup_logging, warn_once
from tml.ml_logging.metrics import MetricLogger
from tml.ml_logging.progress import progress_bar

pytestmark = pytest.mark.unit


def test_metric_logger_writes_jsonl_and_tensorboard(tmp_path):
    metrics = MetricLogger(str(tmp_path), rank=0)
    metrics.log(100, {"train/loss": 0.41, "train/examples_per_s": 5321.0})
    metrics.log(200, {"train/loss": float("nan")})
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 100, "train/loss": 0.41, "train/examples_per_s": 5321.0},
        {"step": 200, "train/loss": "nan"},
    ]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = MetricLogger(str(tmp_path), rank=0, console=False)
    for step in range(3):
        metrics.log(step, {"eval/valid/fav/auroc": 0.5 + step / 10})
    metrics.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    values = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/valid/fav/auroc")]
    assert values == [(0, 0.5), (1, 0.6), (2, 0.7)]


def test_metric_logger_is_silent_off_rank_zero(tmp_path):
    metrics = MetricLogger(str(tmp_path), rank=1)
    metrics.log(1, {"train/loss": 1.0})
    metrics.close()
    assert list(tmp_path.iterdir()) == []


def test_rank_filtering_and_warn_once(capsys):
    setup_logging(rank=1)
    get_logger("x").info("hidden on rank 1")
    get_logger("x").error("errors always show")
    setup_logging(rank=1, all_ranks=True)
    logger = get_logger("tml.test")
    for _ in range(5):
        warn_once(logger, "repeats every step")
    err = capsys.readouterr().err
    assert "hidden on rank 1" not in err
    assert "errors always show" in err
    assert err.count("repeats every step") == 1
    assert "[rank 1]" in err
    setup_logging(rank=0, level=logging.INFO)


def test_plain_progress_lines_when_not_a_terminal(capsys):
    setup_logging(rank=0)
    bar = progress_bar(3, "eval", rank=0, interval_s=0.0)
    for _ in range(3):
        bar.update(1, loss=0.5)
    bar.close()
    err = capsys.readouterr().err
    assert "eval: 3/3" in err and "loss=0.5" in err
    assert progress_bar(3, "eval", rank=1).update(1) is None
