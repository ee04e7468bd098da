"""What the metric logger prints: short lines for people, while metrics.jsonl and TensorBoard keep every name.

- Evaluation results `eval/<partition>/[<stratifier>=<value>/]<task>/<metric>` become one table per
  partition: a row per task and segment, a column per metric.
- Learning rates `<prefix>/lr/<group>` are printed once per distinct value, naming the groups that share it
  (`train/lr=0.003 (all 5 groups)`, `train/lr=0.001 (backbone)`).
- Everything else is `name=value`, wrapped onto indented lines; no line is longer than `max_width`.

Example:
    for message in console_messages(100, {"train/loss": 0.41, "train/lr/backbone": 0.003}):
        logger.info(message)   # step 100: train/loss=0.41  train/lr=0.003 (backbone)
"""

from __future__ import annotations

from tml.ml_logging.tables import CONSOLE_WIDTH, format_number, format_table, wrap_items

OVERALL = "all"  # the segment name of a task's metrics over all examples
_MAX_GROUP_NAMES = 48  # longer lists of parameter-group names are shortened to "first and N more groups"


def console_messages(step: int, metrics: dict[str, float], max_width: int = CONSOLE_WIDTH) -> list[str]:
    """The log messages (each possibly several lines) that show `metrics` of `step`."""
    results, others = _split_eval(metrics)
    rates: dict[str, dict[str, float]] = {}
    items = []
    for name, value in others.items():
        prefix, sep, group = name.rpartition("/lr/")
        if sep and "/" not in group:
            rates.setdefault(prefix, {})[group] = value
        else:
            items.append(f"{name}={format_number(value)}")
    for prefix, groups in rates.items():
        items += _rate_items(prefix, groups)
    messages = [wrap_items(f"step {step}:", items, max_width)] if items else []
    for partition, values in results.items():
        messages.append(f"eval/{partition} at step {step}:\n{eval_table(values, max_width)}")
    return messages


def eval_tables(metrics: dict[str, float], max_width: int = CONSOLE_WIDTH) -> str:
    """The `eval/...` results in `metrics` as one table per partition, each under an `eval/<partition>:` line."""
    results, _ = _split_eval(metrics)
    return "\n\n".join(f"eval/{p}:\n{eval_table(values, max_width)}" for p, values in results.items())


def eval_table(values: dict[tuple[str, str, str], float], max_width: int = CONSOLE_WIDTH) -> str:
    """(task, segment, metric) -> value as a table: rows task / segment (overall first), columns metric."""
    tasks, segments, metrics = {}, {OVERALL: None}, {}
    for task, segment, metric in values:
        tasks.setdefault(task)
        segments.setdefault(segment)
        metrics.setdefault(metric)
    rows = [
        [task, segment, *(values.get((task, segment, metric)) for metric in metrics)]
        for task in tasks
        for segment in segments
        if any((task, segment, metric) in values for metric in metrics)
    ]
    return format_table(["task", "segment", *metrics], rows, label_columns=2, max_width=max_width)


def _split_eval(
    metrics: dict[str, float],
) -> tuple[dict[str, dict[tuple[str, str, str], float]], dict[str, float]]:
    """partition -> {(task, segment, metric): value} for the evaluation results, and the other metrics."""
    results: dict[str, dict[tuple[str, str, str], float]] = {}
    others = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if parts[0] == "eval" and (len(parts) == 4 or (len(parts) == 5 and "=" in parts[2])):
            segment = parts[2] if len(parts) == 5 else OVERALL
            results.setdefault(parts[1], {})[(parts[-2], segment, parts[-1])] = value
        else:
            others[name] = value
    return results, others


def _rate_items(prefix: str, groups: dict[str, float]) -> list[str]:
    by_value: dict[float, list[str]] = {}
    for group, value in groups.items():
        by_value.setdefault(value, []).append(group)
    items = []
    for value, names in by_value.items():
        if len(names) == len(groups) > 1:
            who = f"all {len(names)} groups"
        elif len(", ".join(names)) <= _MAX_GROUP_NAMES:
            who = ", ".join(names)
        else:
            who = f"{names[0]} and {len(names) - 1} more groups"
        items.append(f"{prefix}/lr={format_number(value)} ({who})")
    return items
