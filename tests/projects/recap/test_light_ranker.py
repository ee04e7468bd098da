"""The light ranker (config/light_ranker.yaml) runs the commands its header lists, as written (tiny sizes,
and `--compile none` for export): generate-data, calibrate-discretizer, train, evaluate, predict, export,
score and serve; its plan runs the calibrate-discretizer phase first; wrong inputs fail in one line that
names the key, file or column.

Everything runs in one fresh process (mode after mode, as `tml.projects.home.recap.main.cli`); `serve` is
its own process, asked over HTTP.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG = ROOT / "projects/home/recap/config/light_ranker.yaml"
TINY = [
    "training.num_train_steps=3",
    "training.checkpoint_every_n=3",
    "training.train_log_every_n=1",
    "train_data.global_batch_size=32",
    "validation_data.valid.global_batch_size=32",
    "train_data.shuffle.buffer_size=0",
    "prediction.batch_size=50",
]


def _examples():
    """tests/projects/recap/test_examples.py, whose header parser reads the documented commands."""
    spec = importlib.util.spec_from_file_location(
        "_examples", pathlib.Path(__file__).with_name("test_examples.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_error(cli, argv: list[str]) -> str:
    """What `tml-recap ARGV` prints when it fails with a user error (exit status 2)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2, (argv, stderr.getvalue()[-2000:])
    return stderr.getvalue().strip().splitlines()[-1]


def _serve(argv: list[str], rows: list[dict], env: dict) -> dict:
    """Start `tml-recap serve` on a free port, POST `rows` as JSON, stop it with SIGTERM."""
    argv = [*argv[: argv.index("--port")], "--port", "0"]
    log = open(pathlib.Path(env["TML_RUNS"]) / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "tml.projects.home.recap.main", *argv], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **env})  # fmt: skip
    try:
        port, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            log.seek(0)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read())
            if found:
                port = int(found.group(1))
                with contextlib.suppress(OSError):
                    if b"ready" in urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").read():
                        break
            time.sleep(0.3)
        body = json.dumps({"records": rows}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", body, {"content-type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request).read())
        bad = [dict(rows[0], engagement_values=rows[0]["engagement_values"] + [1.0])]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict",
            json.dumps({"records": bad}).encode(),
            {"content-type": "application/json"},
        )
        try:
            urllib.request.urlopen(request)
            refused = None
        except urllib.error.HTTPError as error:
            refused = (error.code, json.loads(error.read())["error"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    return {"answer": answer, "refused": refused}


def _run(tmp: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tml.core.checkpoint import load_weights
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.build import build_train_module
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.main import cli
    from tml.reader.vectors import unpack_table

    env = {"TML_DATA": f"{tmp}/data", "TML_RUNS": f"{tmp}/runs"}
    os.environ.update(env)
    os.chdir(ROOT)
    commands = _examples().documented_commands(CONFIG, env)
    report: dict = {"modes": [argv[0] for argv in commands]}
    serve = None
    for argv in commands:
        if argv[0] == "serve":
            serve = argv
            continue
        if argv[0] == "export":
            argv = [*argv, "--compile", "none"]  # the README's run is the suite's one AOTInductor compile
        cli(argv)
    config = load_config(RecapConfig, str(CONFIG), TINY)
    run = pathlib.Path(config.training.save_dir)
    predict = next(argv for argv in commands if argv[0] == "predict")
    score = next(argv for argv in commands if argv[0] == "score")
    predictions = pq.read_table(f"{predict[predict.index('--output') + 1]}/part-00000.parquet")
    scores = pq.read_table(f"{score[score.index('--output') + 1]}/part-00000.parquet")
    module = build_train_module(config)
    load_weights(module, str(run))
    valid = unpack_table(
        pq.read_table(config.validation_data["valid"].inputs.replace("*.parquet", "part-00000.parquet"))
    )
    rows = valid.slice(0, 5).to_pylist()
    report.update(
        boundaries=json.loads(pathlib.Path(config.model.discretizer.boundaries_path).read_text()),
        artifact=json.loads((run / "artifact" / "artifact.json").read_text()),
        prediction_columns=predictions.column_names,
        predict_score=predictions["score"].to_pylist(),
        score_score=scores["score"].to_pylist(),
        max_abs=module.model.sparse_linear.linear["engagement"].max_abs.clone(),
        metrics=[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()],
        served=_serve(serve, rows, env),
    )

    # The plan: calibrate-discretizer first, then train, calibrate and evaluate; a second run skips them.
    plan_dir = f"{tmp}/runs/plan"
    plan = ["plan", "--config", str(CONFIG), *TINY, f"training.save_dir={plan_dir}",
            f"model.discretizer.boundaries_path={plan_dir}/discretizer.json"]  # fmt: skip
    cli(plan)
    first = {
        p.stem: json.loads(p.read_text())["ended"] for p in pathlib.Path(plan_dir, "plan").glob("*.json")
    }
    cli(plan)
    second = {
        p.stem: json.loads(p.read_text())["ended"] for p in pathlib.Path(plan_dir, "plan").glob("*.json")
    }
    report["plan"] = {"first": first, "second": second}

    # Wrong inputs, each one line naming what is wrong.
    here = ["--config", str(CONFIG)]
    only = f"{tmp}/runs/only_continuous.json"
    cli(
        [
            "calibrate-discretizer",
            *here,
            "model.discretizer.features=[continuous]",
            f"model.discretizer.boundaries_path={only}",
        ]
    )
    bad = valid.slice(0, 40)
    values = bad["engagement_values"].to_pylist()
    values[7] = [None] * len(values[7]) if values[7] else [None]
    ids = bad["engagement_ids"].to_pylist()
    ids[7] = ids[7] or [1]
    bad = bad.set_column(
        bad.schema.get_field_index("engagement_values"),
        "engagement_values",
        pa.array(values, pa.list_(pa.float32())),
    )
    bad = bad.set_column(
        bad.schema.get_field_index("engagement_ids"), "engagement_ids", pa.array(ids, pa.list_(pa.int64()))
    )
    pq.write_table(bad, f"{tmp}/bad.parquet", row_group_size=20)
    artifact = str(run / "artifact")
    report["errors"] = {
        "recalibrate": _one_line_error(cli, ["calibrate-discretizer", *here]),
        "missing": _one_line_error(cli, ["summary", *here, f"model.discretizer.boundaries_path={tmp}/none.json"]),
        "other_features": _one_line_error(cli, ["summary", *here, f"model.discretizer.boundaries_path={only}"]),
        "out_bits": _one_line_error(cli, ["summary", *here, "model.discretizer.out_bits=40"]),
        "changed_bins": _one_line_error(cli, [*plan, "model.discretizer.num_bins=8"]),
        "null_values": _one_line_error(cli, ["score", "--artifact", artifact, "--input", f"{tmp}/bad.parquet", "--output", f"{tmp}/bad_scores"]),
    }  # fmt: skip
    return report


@pytest.mark.slow
def test_light_ranker_runs_its_documented_commands(run_alone, tmp_path):
    got = run_alone(_run, str(tmp_path), timeout=900)
    assert got["modes"] == [
        "generate-data",
        "calibrate-discretizer",
        "train",
        "evaluate",
        "predict",
        "export",
        "score",
        "serve",
    ]
    # The boundaries of every discretized feature: the 32 continuous columns and the engagement ids seen.
    features = got["boundaries"]["features"]
    assert {f"continuous[{i}]" for i in range(32)} <= set(features)
    assert any(key.startswith("engagement:") for key in features)
    assert [i["name"] for i in got["artifact"]["inputs"]["sparse_continuous"]] == ["engagement"]
    assert "eval/valid/is_clicked/auroc" in {key for record in got["metrics"] for key in record}
    assert got["prediction_columns"] == ["meta.user_id", "meta.author_id", "p/is_clicked", "score"]
    # The artifact scores as predict does; the running max |value| came back from the checkpoint.
    assert got["score_score"] == pytest.approx(got["predict_score"], abs=1e-5)
    assert float(got["max_abs"].max()) > 0
    assert got["served"]["answer"]["score"] == pytest.approx(got["score_score"][:5], abs=1e-5)
    assert got["served"]["refused"][0] == 422 and "expected one value per id" in got["served"]["refused"][1]
    plan = got["plan"]
    assert set(plan["first"]) == {"calibrate-discretizer", "train", "calibrate", "evaluate"}
    assert plan["second"] == plan["first"]  # all skipped: no record was rewritten
    errors = got["errors"]
    assert "boundaries_path" in errors["recalibrate"] and "exists: pass --overwrite" in errors["recalibrate"]
    assert re.search(
        r"none\.json'?: no such file; write it with `tml-recap calibrate-discretizer", errors["missing"]
    )
    assert "holds the bins of ['continuous'], not of 'engagement'" in errors["other_features"]
    assert "model.discretizer.out_bits" in errors["out_bits"] and "24" in errors["out_bits"]
    assert (
        "phase 'calibrate-discretizer'" in errors["changed_bins"]
        and "holds checkpoints" in errors["changed_bins"]
    )
    assert re.search(
        r"bad\.parquet \(batch 0\): column 'engagement_values' row 7 holds a null value \(\d+ null values in all\)",
        errors["null_values"],
    )
