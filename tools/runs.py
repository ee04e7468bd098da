"""`tml-runs`: compare run folders (config differences, last and best metrics, curves) and write their
TensorBoard HParams records.

A run folder is a `training.save_dir`: `config.yaml` and `metrics.jsonl` (see docs/runs.md). Runs still
training and runs without evaluation work; a folder without `config.yaml` is refused by name.

Example:
    tml-runs compare runs/lr-1e-3 runs/lr-3e-3
    tml-runs compare runs/* --all --metric 'eval/valid/*/auroc' --metric train/loss
    tml-runs compare runs/* --plot 'eval/valid/*/auroc' --output auroc.png
    tml-runs hparams runs/*        # then: tensorboard --logdir runs/
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import math
import os
import sys
from typing import Literal

from tml.ml_logging.hparams import flatten_config, format_value, log_hparams
from tml.ml_logging.run_folder import Run, default_metrics, final_metrics, read_run
from tml.ml_logging.tables import format_number, format_table

MAX_SUBPLOTS = 36
_MISSING = "-"
_HIGHER = ("auroc", "pr_auc", "rce", "nrce", "mrr", "examples_per_s")


def best_rule(name: str) -> Literal["max", "min", "one"] | None:
    """How the best value of metric `name` is picked, by its last path component: "max" for auroc,
    pr_auc, rce, nrce, mrr, hits_at_<k>, examples_per_s; "min" for loss and *_loss; "one" (nearest 1.0)
    for calibration; None (no best) for the rest (learning rates, counts, means)."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in _HIGHER or leaf.startswith("hits_at_"):
        return "max"
    if leaf == "loss" or leaf.endswith("_loss"):
        return "min"
    if leaf == "calibration":
        return "one"
    return None


def best_point(name: str, points: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, value) of the best finite value of `points` under `best_rule(name)`; the earliest on ties."""
    rule = best_rule(name)
    finite = [p for p in points if math.isfinite(p[1])]
    if rule is None or not finite:
        return None
    score = {"max": lambda v: -v, "min": lambda v: v, "one": lambda v: abs(v - 1.0)}[rule]
    return min(finite, key=lambda p: score(p[1]))


def run_labels(paths: list[str]) -> list[str]:
    """Each run path's shortest trailing part that no other run shares (`c`, `a/local`, `b/local`); the
    same folder given twice keeps one label for both."""
    parts = [os.path.abspath(path).split(os.sep) for path in paths]
    labels = []
    for mine in parts:
        others = [p for p in parts if p != mine]
        depth = 1
        while depth < len(mine) and any(p[-depth:] == mine[-depth:] for p in others):
            depth += 1
        labels.append("/".join(mine[-depth:]))
    return labels


def config_lines(runs: list[Run], labels: list[str], show_all: bool) -> list[str]:
    flats = [flatten_config(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    shown = {key: [format_value(flat[key]) if key in flat else _MISSING for flat in flats] for key in keys}
    differ = [key for key in keys if len(set(shown[key])) > 1]
    if show_all:
        title = f"config: {len(keys)} keys, {len(differ)} differ (marked *)"
        rows = [[("* " if key in differ else "  ") + key, *shown[key]] for key in keys]
    elif len(runs) == 1:
        return ["config: one run, nothing to compare (--all shows its keys)"]
    elif not differ:
        return [f"config: all {len(keys)} keys are equal (--all shows them)"]
    else:
        title = f"config: {len(differ)} of {len(keys)} keys differ (--all shows every key)"
        rows = [[key, *shown[key]] for key in differ]
    # Every column is a label column: values are text (paths, lists), read left-aligned.
    return [title, format_table(["key", *labels], rows, label_columns=len(runs) + 1)]


def select_metrics(runs: list[Run], patterns: list[str] | None) -> list[str]:
    """The metric names shown: those matching any glob of `patterns` (fnmatch: `*` also crosses `/`), or
    `default_metrics` of all runs' names; each pattern must match a metric of some run."""
    names = list(dict.fromkeys(name for run in runs for name in run.history))
    if patterns is None:
        return default_metrics(names)
    chosen: list[str] = []
    for pattern in patterns:
        matched = match_metrics(pattern, names)
        chosen += [name for name in matched if name not in chosen]
    return chosen


def match_metrics(pattern: str, names: list[str]) -> list[str]:
    """Names matching the glob `pattern`; ValueError naming the pattern and close matches when none do."""
    matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if matched:
        return matched
    if not names:
        raise ValueError(f"no metric matches {pattern!r}: the runs have logged no metrics yet")
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if close:
        hint = "close matches: " + ", ".join(close)
    else:
        more = f", ... ({len(names)} names)" if len(names) > 8 else ""
        hint = "the runs log: " + ", ".join(names[:8]) + more
    raise ValueError(f"no metric matches {pattern!r}; {hint}")


def metric_lines(runs: list[Run], labels: list[str], names: list[str]) -> list[str]:
    if not names:
        return ["metrics: none logged yet"]
    title = "metrics: last and best @step (max auroc/pr_auc/rce/nrce, min loss, calibration nearest 1)"
    columns = []  # per run: its "last" and "best" cells, row by row (titles, step, then each metric)
    for run in runs:
        last = ["last", _MISSING if run.last_step is None else str(run.last_step)]
        best = ["best", ""]
        for name in names:
            points = run.history.get(name)
            top = best_point(name, points) if points else None
            last.append(format_number(points[-1][1]) if points else _MISSING)
            # A metric without a direction (learning rate, count) has no best: the cell stays blank.
            best.append(f"{format_number(top[1])} @{top[0]}" if top else "" if points else _MISSING)
        columns.append(_pair_column(last, best))
    rows = [[label, *(column[i] for column in columns)] for i, label in enumerate(["", "step", *names])]
    return [title, format_table(["metric", *labels], rows)]


def _pair_column(left: list[str], right: list[str]) -> list[str]:
    # One table column per run keeps a run's two values together when the table is split into blocks.
    lw, rw = max(map(len, left)), max(map(len, right))
    return [f"{a:>{lw}}  {b:>{rw}}" for a, b in zip(left, right, strict=True)]


def plot_metrics(runs: list[Run], pattern: str, output: str) -> list[str]:
    """The metrics `--plot PATTERN` draws; ValueError when there are none, more than fit one figure, or
    `output` has no image format matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(output)[1].lstrip(".").lower()
    if extension not in formats:
        raise ValueError(
            f"--output {output}: expected a file ending in one of .{', .'.join(sorted(formats))}"
        )
    names = match_metrics(pattern, list(dict.fromkeys(name for run in runs for name in run.history)))
    if len(names) > MAX_SUBPLOTS:
        raise ValueError(
            f"{pattern!r} matches {len(names)} metrics; at most {MAX_SUBPLOTS} fit one figure, narrow it "
            f"(first matches: {', '.join(names[:3])})"
        )
    return names


def plot(runs: list[Run], labels: list[str], names: list[str], output: str):
    """Write one subplot per metric (value against step, one line per run, legend: run labels) to
    `output` (any format matplotlib saves: .png, .svg, .pdf); returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # not pyplot: no display, no global figure state

    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(6 * columns, 3.6 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    handles = {}
    for ax, name in zip(axes, names, strict=False):
        for run, label in zip(runs, labels, strict=True):
            points = run.history.get(name)
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            # Evaluation is often logged a handful of times: show the points, not just a line.
            marker = "o" if len(points) <= 50 else None
            (line,) = ax.plot(steps, values, marker=marker, markersize=3, label=label)
            handles.setdefault(label, line)
        if not any(math.isfinite(v) for run in runs for _, v in run.history.get(name, [])):
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    figure.legend(handles.values(), handles.keys(), loc="outside upper center", ncols=min(len(handles), 4))
    parent = os.path.dirname(output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(output, dpi=110)
    return figure


def compare(
    paths: list[str], show_all: bool, patterns: list[str] | None, plot_pattern: str | None, output: str | None
) -> None:
    runs = [read_run(path) for path in paths]
    labels = run_labels(paths)
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"run folder {twice} is given more than once")
    # Every input is checked before anything is printed: an error is the only output of a bad command.
    names = select_metrics(runs, patterns)
    plotted = plot_metrics(runs, plot_pattern, output) if plot_pattern is not None else []
    print("\n".join(config_lines(runs, labels, show_all)))
    print()
    print("\n".join(metric_lines(runs, labels, names)))
    if plotted:
        plot(runs, labels, plotted, output)
        print(f"\nwrote {output}: {len(plotted)} metric(s), {len(runs)} run(s)")


def write_hparams(paths: list[str]) -> None:
    """(Re)write each run folder's HParams record from its config.yaml and metrics.jsonl: runs trained
    before the lifecycle wrote one, or copied from elsewhere."""
    runs = [read_run(path) for path in paths]
    for path, run in zip(paths, runs, strict=True):
        step = run.last_step or 0
        target = (run.config.get("training") or {}).get("num_train_steps")
        status = "success" if isinstance(target, int) and step >= target else "running"
        metrics = final_metrics(path)
        folder = log_hparams(path, run.config, metrics, step, status=status)
        print(f"{folder}: {len(metrics)} metric(s) at step {step}, {status}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml-runs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="config differences, last/best metrics and curves of run folders")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (training.save_dir)")
    p.add_argument("--all", action="store_true", help="show every config key, not only those that differ")
    p.add_argument(
        "--metric",
        action="append",
        metavar="PATTERN",
        help="metrics to tabulate, a glob (repeatable; default: train/loss and the first eval partition)",
    )
    p.add_argument("--plot", metavar="METRIC", help="draw this metric (a glob: one subplot per match)")
    p.add_argument("--output", metavar="FILE", help="image file for --plot (.png, .svg, .pdf)")
    p = sub.add_parser("hparams", help="write run folders' TensorBoard HParams records from their files")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (training.save_dir)")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """Entry point of the `tml-runs` console script; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare" and (args.plot is None) != (args.output is None):
        parser.error("--plot METRIC and --output FILE go together")
    try:
        if args.command == "compare":
            compare(args.runs, args.all, args.metric, args.plot, args.output)
        else:
            write_hparams(args.runs)
    except ValueError as err:  # NotARunError included
        print(f"tml-runs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
