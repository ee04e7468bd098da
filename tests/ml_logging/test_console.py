"""The console digest of the metric logger: evaluation tables and one learning rate per distinct value,
no line over 200 characters, every value once; metrics.jsonl keeps every name."""

import json
import logging

import pytest

from tml.ml_logging.console import console_messages, eval_tables
from tml.ml_logging.log import setup_logging
from tml.ml_logging.metrics import MetricLogger
from tml.ml_logging.tables import format_number, format_table, wrap_items

pytestmark = pytest.mark.unit

TASKS = [f"recap.engagement.is_task_with_a_long_name_{i}" for i in range(10)]
METRICS = ["auroc", "pr_auc", "log_loss", "rce", "nrce", "calibration", "mean_label", "mean_prediction"]
METRICS += ["count", "weight_sum"]
SEGMENTS = ["", "client_0=0/", "client_0=1/", "country=BR/"]  # overall and three stratifier values


def realistic_eval() -> dict[str, float]:
    """10 tasks x 10 metrics x (overall + 3 segments), every value distinct once formatted."""
    results, i = {}, 0
    for segment in SEGMENTS:
        for task in TASKS:
            for metric in METRICS:
                i += 1
                results[f"eval/valid/{segment}{task}/{metric}"] = (
                    10_000.0 + i if metric == "count" else 1 + i / 1000
                )
    return results


def logged(capsys, step, metrics, tmp_path=None):
    setup_logging(rank=0)
    logger = MetricLogger(str(tmp_path) if tmp_path else None, rank=0, tensorboard=False)
    logger.log(step, metrics)
    logger.close()
    return capsys.readouterr().err


def test_eval_results_are_a_table_with_every_value_once(capsys, tmp_path):
    results = realistic_eval()
    err = logged(capsys, 2000, results, tmp_path)
    lines = err.splitlines()
    assert max(len(line) for line in lines) <= 200
    assert len(lines) < 60, "one row per task and segment, not one line per value"
    tokens = err.split()
    for value in results.values():
        assert tokens.count(format_number(value)) == 1, value
    assert "eval/valid at step 2000:" in err
    header = next(line for line in lines if line.startswith("task"))
    assert header.split() == ["task", "segment", *METRICS]
    row = next(line for line in lines if line.startswith(f"{TASKS[3]}  ") and " country=BR " in line)
    assert row.split()[2] == format_number(results[f"eval/valid/country=BR/{TASKS[3]}/auroc"])
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record == {"step": 2000, **results}


def test_learning_rates_print_once_per_distinct_value(capsys, tmp_path):
    towers = [f"recap.engagement.is_{t}" for t in ("favorited", "retweeted", "replied", "good_clicked")]
    metrics = {"train/loss": 0.41234, "train/lr/backbone": 0.003, **{f"train/lr/{t}": 0.003 for t in towers}}
    err = logged(capsys, 100, metrics, tmp_path)
    assert err.count("train/lr") == 1
    assert "step 100: train/loss=0.4123  train/lr=0.003 (all 5 groups)" in err
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert [k for k in record if k.startswith("train/lr/")] == [
        "train/lr/backbone",
        *(f"train/lr/{t}" for t in towers),
    ]

    metrics["train/lr/backbone"] = 0.001
    err = logged(capsys, 200, metrics)
    assert err.count("train/lr") == 2
    assert (
        "train/lr=0.001 (backbone)  train/lr=0.003 (recap.engagement.is_favorited and 3 more groups)" in err
    )


def test_other_metrics_wrap_under_200_characters():
    metrics = {f"train/some_quite_long_metric_name_{i}": i + 0.5 for i in range(40)}
    (message,) = console_messages(7, metrics)
    lines = message.splitlines()
    assert len(lines) > 1 and max(len(line) for line in lines) <= 200
    assert lines[0].startswith("step 7: train/some_quite_long_metric_name_0=0.5")
    assert all(line.startswith("  train/") for line in lines[1:])
    assert message.split()[2:] == [f"train/some_quite_long_metric_name_{i}={i + 0.5}" for i in range(40)]


def test_table_splits_columns_into_blocks_within_the_width():
    header = ["task", *(f"metric_{i}" for i in range(12))]
    rows = [[f"task_{r}", *(r * 100 + c + 0.25 for c in range(12))] for r in range(3)]
    text = format_table(header, rows, max_width=60)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 60
    assert sum(line.startswith("task ") for line in lines) > 1, "several blocks, each with the header"
    tokens = text.split()
    for row in rows:
        for value in row[1:]:
            assert tokens.count(format_number(value)) == 1
        assert tokens.count(row[0]) == sum(line.startswith("task ") for line in lines)


def test_number_and_cell_formats():
    assert [format_number(v) for v in (0.812345, 5000.0, 12, float("nan"), 1.23456e-5, -356.53)] == [
        "0.8123", "5000", "12", "nan", "1.235e-05", "-356.5"
    ]  # fmt: skip
    assert format_table(["a", "b"], [["x", None], ["yy", 1.5]]) == "a     b\nx\nyy  1.5"
    assert wrap_items("step 1:", []) == "step 1:"


def test_evaluate_table_has_a_heading_per_partition():
    text = eval_tables(
        {"eval/valid/fav/auroc": 0.7, "eval/test/fav/auroc": 0.6, "eval/test/k=1/fav/auroc": 0.5}
    )
    assert text == (
        "eval/valid:\ntask  segment  auroc\nfav   all        0.7\n\n"
        "eval/test:\ntask  segment  auroc\nfav   all        0.6\nfav   k=1        0.5"
    )


def test_console_can_be_switched_off(capsys):
    setup_logging(rank=0, level=logging.INFO)
    MetricLogger(None, console=False).log(1, {"train/loss": 1.0})
    assert capsys.readouterr().err == ""
