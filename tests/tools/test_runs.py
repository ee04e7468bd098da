"""tml-runs compare on small fake run folders (config.yaml + metrics.jsonl): config differences, last/best
tables, metric globs, runs still training or without evaluation, bad folders, and the plot."""

from __future__ import annotations

import json

import pytest
import yaml

from tml.ml_logging.run_folder import read_run
from tml.tools.runs import best_point, best_rule, cli, plot, run_labels

pytestmark = pytest.mark.unit

FAV = "eval/valid/recap.engagement.is_favorited"


def make_run(folder, lr, records, config_extra=None, tail=""):
    folder.mkdir(parents=True)
    config = {
        "training": {"save_dir": str(folder.name), "num_train_steps": 400, "num_threads": None},
        "optimizer": {"adam": {"lr": lr}, "layers": [512, 256]},
        **(config_extra or {}),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(folder)


def records(lr, steps):
    out = []
    for step in range(100, steps + 1, 100):
        out.append({"step": step, "train/loss": round(0.6 - step / 2000 + lr, 4), "train/lr/dense": lr})
        if step % 200 == 0:
            out.append(
                {
                    "step": step,
                    f"{FAV}/auroc": round(0.75 - abs(step - 200) / 1000 - lr, 4),
                    f"{FAV}/calibration": round(1.2 - step / 1000, 4),
                    f"{FAV}/count": 1000.0,
                    "eval/valid/country=1/recap.engagement.is_favorited/auroc": 0.6,
                    "eval/test/recap.engagement.is_favorited/auroc": 0.5,
                }
            )
    return out


@pytest.fixture()
def runs(tmp_path):
    return [
        make_run(tmp_path / "lr-1e-3", 0.001, records(0.001, 400)),
        # Still training: two steps so far, the last record half written.
        make_run(tmp_path / "lr-3e-3", 0.003, records(0.003, 200), tail='{"step": 300, "train/lo'),
    ]


def _cli(capsys, *argv):
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_prints_differing_keys_and_last_best_metrics(runs, capsys):
    code, out, err = _cli(capsys, "compare", *runs)
    assert code == 0 and err == ""
    assert out == (
        "config: 2 of 5 keys differ (--all shows every key)\n"
        "key                lr-1e-3  lr-3e-3\n"
        "training.save_dir  lr-1e-3  lr-3e-3\n"
        "optimizer.adam.lr  0.001    0.003\n"
        "\n"
        "metrics: last and best @step (max auroc/pr_auc/rce/nrce, min loss, calibration nearest 1)\n"
        "metric                                                          lr-1e-3            lr-3e-3\n"
        "                                                       last        best   last        best\n"
        "step                                                    400                200\n"
        "train/loss                                            0.401  0.401 @400  0.503  0.503 @200\n"
        "eval/valid/recap.engagement.is_favorited/auroc        0.549  0.749 @200  0.747  0.747 @200\n"
        "eval/valid/recap.engagement.is_favorited/calibration    0.8      1 @200      1      1 @200\n"
    )
    assert max(len(line) for line in out.splitlines()) == len(out.splitlines()[-1])


def test_all_marks_differing_keys_and_metric_globs_select_rows(runs, capsys):
    code, out, _ = _cli(capsys, "compare", *runs, "--all", "--metric", "train/*", "--metric", "*country=*")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "config: 5 keys, 2 differ (marked *)"
    assert "* optimizer.adam.lr         0.001       0.003" in lines
    assert "  optimizer.layers          [512, 256]  [512, 256]" in lines
    assert "  training.num_threads      null        null" in lines
    metric_rows = [line.split()[0] for line in lines[lines.index("") + 5 :]]
    assert metric_rows == [
        "train/loss",
        "train/lr/dense",
        "eval/valid/country=1/recap.engagement.is_favorited/auroc",
    ]
    # A learning rate has no "best": its best cell stays blank.
    assert next(line for line in lines if line.startswith("train/lr/dense")).split() == [
        "train/lr/dense",
        "0.001",
        "0.003",
    ]


def test_runs_without_eval_or_metrics_show_dashes(tmp_path, capsys):
    trained = make_run(tmp_path / "a", 0.001, records(0.001, 400))
    no_eval = make_run(tmp_path / "b", 0.001, [{"step": 100, "train/loss": 0.7}])
    fresh = make_run(tmp_path / "c", 0.002, [])
    code, out, _ = _cli(capsys, "compare", trained, no_eval, fresh)
    assert code == 0
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith("step ")).split() == ["step", "400", "100", "-"]
    assert [line for line in lines if line.startswith(f"{FAV}/auroc")][0].split()[-4:] == ["-", "-", "-", "-"]
    code, out, _ = _cli(capsys, "compare", no_eval)
    assert out.splitlines()[0] == "config: one run, nothing to compare (--all shows its keys)"
    code, out, _ = _cli(capsys, "compare", fresh)
    assert out.splitlines()[-1] == "metrics: none logged yet"


def test_bad_inputs_are_one_line_errors_and_print_nothing_else(runs, tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    code, out, err = _cli(capsys, "compare", runs[0], str(tmp_path / "notarun"))
    assert (code, out) == (2, "")
    assert err == f"tml-runs: error: {tmp_path / 'notarun'} is not a run folder: it has no config.yaml\n"

    code, out, err = _cli(capsys, "compare", *runs, "--metric", "eval/valid/*/aucroc")
    assert (code, out) == (2, "")
    assert err.startswith("tml-runs: error: no metric matches 'eval/valid/*/aucroc'; close matches: ")
    assert f"{FAV}/auroc" in err and err.count("\n") == 1

    code, out, err = _cli(capsys, "compare", *runs, "--plot", "nothing*", "--output", str(tmp_path / "x.png"))
    assert code == 2 and out == "" and "the runs log: train/loss, train/lr/dense" in err

    code, _, err = _cli(capsys, "compare", *runs, "--plot", "train/loss", "--output", str(tmp_path / "x.txt"))
    assert (
        code == 2 and "--output" in err and "x.txt: expected a file ending in one of" in err and ".png" in err
    )

    code, _, err = _cli(capsys, "compare", runs[0], runs[0])
    assert code == 2 and "is given more than once" in err

    with pytest.raises(SystemExit) as exit_info:
        cli(["compare", *runs, "--plot", "train/loss"])
    assert (
        exit_info.value.code == 2 and "--plot METRIC and --output FILE go together" in capsys.readouterr().err
    )


def test_run_labels_are_the_shortest_distinct_suffixes():
    assert run_labels(["runs/a/local", "runs/b/local", "runs/c"]) == ["a/local", "b/local", "c"]
    assert run_labels(["x/lr-1", "y/lr-2/"]) == ["lr-1", "lr-2"]


def test_best_rule():
    assert [best_rule(n) for n in ("x/auroc", "x/nrce", "x/hits_at_10", "train/examples_per_s")] == [
        "max"
    ] * 4
    assert [best_rule(n) for n in ("train/loss", "eval/v/t/log_loss")] == ["min", "min"]
    assert best_rule("eval/v/t/calibration") == "one"
    assert [best_rule(n) for n in ("train/lr/dense", "eval/v/t/count", "eval/v/t/mean_label")] == [None] * 3
    assert best_point("eval/v/t/calibration", [(1, 1.3), (2, 0.95), (3, float("nan")), (4, 1.05)]) == (
        2,
        0.95,
    )
    assert best_point("eval/v/t/auroc", [(1, float("nan"))]) is None
    assert best_point("train/loss", [(1, 0.5), (2, 0.4), (3, 0.4)]) == (2, 0.4)


def test_plot_draws_one_subplot_per_metric_with_run_legend(runs, tmp_path, capsys):
    from matplotlib.image import imread

    output = tmp_path / "plots" / "auroc.png"
    code, out, _ = _cli(capsys, "compare", *runs, "--plot", "eval/*/auroc", "--output", str(output))
    assert code == 0 and out.endswith(f"\nwrote {output}: 3 metric(s), 2 run(s)\n")
    assert imread(str(output)).shape[2] in (3, 4)

    loaded = [read_run(path) for path in runs]
    names = [f"{FAV}/auroc", "train/loss"]
    figure = plot(loaded, ["lr-1e-3", "lr-3e-3"], names, str(tmp_path / "two.svg"))
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == names
    assert [len(ax.lines) for ax in axes] == [2, 2]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["lr-1e-3", "lr-3e-3"]
    assert list(axes[1].lines[0].get_xdata()) == [100, 200, 300, 400]
    assert (tmp_path / "two.svg").read_text().lstrip().startswith("<?xml")


def test_hparams_command_writes_each_runs_record(runs, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    code, out, _ = _cli(capsys, "hparams", *runs)
    assert code == 0
    assert out.splitlines() == [
        f"{runs[0]}/tensorboard/hparams: 3 metric(s) at step 400, success",
        f"{runs[1]}/tensorboard/hparams: 3 metric(s) at step 200, running",
    ]
    for run, finished in zip(runs, (True, False), strict=True):
        acc = EventAccumulator(f"{run}/tensorboard/hparams")
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["optimizer.adam.lr"].number_value in (0.001, 0.003)
        assert (metadata.SESSION_END_INFO_TAG in content) == finished
        assert sorted(acc.Tags()["scalars"]) == sorted(["train/loss", f"{FAV}/auroc", f"{FAV}/calibration"])
