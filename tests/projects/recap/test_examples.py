"""Every `config/examples/model_*.yaml` is a standalone config: the `tml-recap` commands written in its header
(generate-data, compute-stats where it z-scores, train, evaluate, predict) run as given, on tiny sizes.

The commands are taken from the YAML's header comment, so the documented flow is what is tested: data
written by generate-data is where the config reads it, stats land where z_score_log_config reads them.
All examples run in one fresh process (mode after mode, as `tml.projects.home.recap.main.cli`).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "projects/home/recap/config/examples").glob("model_*.yaml"))
# Tiny runs: few rows, small batches, 3 steps; the commands themselves are the documented ones.
NUM_EXAMPLES = "400"
TINY = [
    "training.num_train_steps=3",
    "training.checkpoint_every_n=3",
    "training.train_log_every_n=1",
    "train_data.global_batch_size=32",
    "validation_data.valid.global_batch_size=32",
    "train_data.shuffle.buffer_size=0",
]


def header_commands(path: pathlib.Path, env: dict[str, str]) -> list[list[str]]:
    """The `tml-recap ...` lines of the YAML's header comment, variables expanded, as argv lists."""
    from tml.core.config.loader import substitute_env

    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if text.startswith("tml-recap "):
            # Expanded like the shell would (${VAR:-default} included), by the config loader's rules.
            commands.append(shlex.split(substitute_env(text, str(path), env))[1:])
    return commands


def documented_commands(path: pathlib.Path, env: dict[str, str]) -> list[list[str]]:
    """`header_commands` at tiny sizes: NUM_EXAMPLES generated rows, TINY added to train / evaluate / predict."""
    commands = header_commands(path, env)
    for argv in commands:
        if argv[0] == "generate-data":
            argv[argv.index("--num-examples") + 1] = NUM_EXAMPLES
        if argv[0] in ("train", "evaluate", "predict"):
            argv += TINY
    return commands


def _run_examples(tmp: str) -> dict:
    """Run every example's documented commands in this process; report what each wrote."""
    import pyarrow.parquet as pq

    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.main import cli

    env = {"TML_DATA": f"{tmp}/data", "TML_RUNS": f"{tmp}/runs"}
    os.environ.update(env)
    os.chdir(ROOT)  # the commands name configs relative to the repository root
    report = {}
    for path in EXAMPLES:
        commands = documented_commands(path, env)
        for argv in commands:
            cli(argv)
        config = load_config(RecapConfig, str(path), TINY)
        predict = next(argv for argv in commands if argv[0] == "predict")
        out = predict[predict.index("--output") + 1]
        valid = config.validation_data["valid"].inputs
        z = config.model.featurization_config.z_score_log_config
        lines = pathlib.Path(config.training.save_dir, "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        report[path.name] = {
            "modes": [argv[0] for argv in commands],
            "tasks": list(config.model.tasks),
            "stats_written": z is not None and os.path.exists(z.analysis_path),
            "metric_keys": sorted({key for record in records for key in record}),
            "checkpoints": sorted(os.listdir(f"{config.training.save_dir}/checkpoints")),
            "prediction_columns": pq.read_table(f"{out}/part-00000.parquet").column_names,
            "prediction_rows": pq.read_table(f"{out}/part-00000.parquet").num_rows,
            "valid_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(valid)),
        }
    return report


@pytest.mark.slow
def test_every_example_runs_its_documented_commands(run_alone, tmp_path):
    report = run_alone(_run_examples, str(tmp_path), timeout=600)
    assert sorted(report) == [p.name for p in EXAMPLES] and len(report) == 6
    for name, got in report.items():
        assert got["modes"][0] == "generate-data", name
        assert got["modes"][-3:] == ["train", "evaluate", "predict"], name
        assert got["stats_written"] == ("compute-stats" in got["modes"]), name
        assert got["checkpoints"] == ["step-3"], name
        for task in got["tasks"]:
            assert f"eval/valid/{task}/auroc" in got["metric_keys"], (name, task)
            assert f"p/{task}" in got["prediction_columns"], (name, task)
        assert "score" in got["prediction_columns"]
        assert got["prediction_rows"] == got["valid_rows"] > 0, name
    assert "compute-stats" in report["model_dcn.yaml"]["modes"]
    assert any("client_web=2/" in key for key in report["model_embeddings.yaml"]["metric_keys"])


@pytest.mark.unit
def test_documented_commands_are_complete():
    env = {"TML_DATA": "/d", "TML_RUNS": "/r"}
    for path in EXAMPLES:
        modes = [argv[0] for argv in documented_commands(path, env)]
        assert modes[0] == "generate-data" and modes[-3:] == ["train", "evaluate", "predict"], path.name
        generate = documented_commands(path, env)[0]
        assert generate[generate.index("--output") + 1] == f"/d/{path.stem}", path.name
        predict = documented_commands(path, env)[-1]
        assert predict[predict.index("--output") + 1] == f"/r/{path.stem}/predictions", path.name
