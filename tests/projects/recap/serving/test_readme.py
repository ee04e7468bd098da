"""The README's serving block, line by line as a user types it (tiny sizes, a free port): generate, train,
export (AOTInductor), serve in the background, wait for readiness, build a request from the bundled data,
curl it, SIGTERM; the scores equal `tml-recap predict`'s on the same rows, and so do those of
`tml-recap score` on the AOTInductor package in a process that cannot import torchrec."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)

ROOT = pathlib.Path(__file__).resolve().parents[4]
CONFIGS = "projects/home/recap/config/"
TINY = "train_data.global_batch_size=64 validation_data.valid.global_batch_size=64"


def serving_block() -> list[str]:
    """The lines of the README's bash block that runs `tml-recap serve`."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "tml-recap serve" in b)
    return [line for line in block.splitlines() if line.strip()]


def tiny(line: str, port: int) -> str:
    """The same command on a tiny scale: fewer rows and steps, small batches, a free port, the repo's config."""
    line = line.replace(CONFIGS, f"{ROOT}/{CONFIGS}").replace("8080", str(port))
    line = line.replace("--num-examples 20000", "--num-examples 2000")
    return line.replace("training.num_train_steps=100", f"training.num_train_steps=4 {TINY}")


def test_readme_serving_block_runs_and_scores_like_predict(tmp_path, tcp_port_factory):
    lines = serving_block()
    assert [line.split()[1] for line in lines if line.startswith("tml-recap")] == [
        "generate-data", "train", "export", "serve",
    ]  # fmt: skip
    port = tcp_port_factory()
    venv = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("TML_DATA", "TML_RUNS", "RANK", "WORLD_SIZE")}
    env["PATH"] = f"{venv}:{env['PATH']}"  # `tml-recap` and `python` of this environment, as after `activate`
    server, outputs = None, []
    server_tmp = tmp_path / "server-tmp"  # the server's $TMPDIR
    try:
        for line in lines:
            command = tiny(line, port)
            if command.endswith("&"):
                server_tmp.mkdir()
                server = subprocess.Popen(
                    shlex.split(command[:-1]), cwd=tmp_path, env=dict(env, TMPDIR=str(server_tmp)),
                    stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                continue
            if command.startswith("kill %1"):
                extracted = list(server_tmp.glob("aotinductor_*"))  # the AOTInductor package, loaded
                server.send_signal(signal.SIGTERM)
                assert server.wait(timeout=60) == -signal.SIGTERM, server.stderr.read()
                # ... and deleted on the way out, though uvicorn ends the process with the signal itself
                assert extracted and not any(path.exists() for path in extracted), extracted
                continue
            done = subprocess.run(command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-6000:])
            outputs.append(done.stdout)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
    scores = json.loads(outputs[-1])
    assert len(scores["score"]) == 2
    meta = json.loads((tmp_path / "artifacts/local/artifact.json").read_text())
    # `--compile auto` compiled with AOTInductor (a C++ compiler is part of the setup); this is the suite's
    # one AOTInductor compile, so its package is also checked offline, where torchrec cannot be imported.
    assert meta["runtime"] == "aoti" and meta["compile_seconds"] > 0, meta["runtime_note"]
    no_torchrec = (
        "import sys; sys.modules['torchrec'] = None; sys.modules['fbgemm_gpu'] = None\n"
        "from tml.projects.home.recap.main import cli; cli(sys.argv[1:])"
    )
    score = [sys.executable, "-c", no_torchrec, "score", "--artifact", "artifacts/local", "--runtime", "aoti",
             "--input", "data/local/valid/part-00000.parquet", "--output", "scores"]  # fmt: skip
    done = subprocess.run(score, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "(runtime aoti)" in done.stderr, done.stderr[-6000:]

    predict = [
        f"{venv}/tml-recap", "predict", "--config", f"{ROOT}/{CONFIGS}local.yaml", *TINY.split(),
        "--input", "data/local/valid/part-00000.parquet", "--output", "preds",
    ]  # fmt: skip
    done = subprocess.run(predict, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    predicted = pq.read_table(tmp_path / "preds/part-00000.parquet")
    expected = predicted.slice(0, 2)
    np.testing.assert_allclose(scores["score"], expected.column("score").to_numpy(), rtol=1e-4, atol=1e-4)
    for task, values in scores["probabilities"].items():
        np.testing.assert_allclose(values, expected.column(f"p/{task}").to_numpy(), rtol=1e-4, atol=1e-5)
    scored = pq.read_table(tmp_path / "scores/part-00000.parquet")
    assert scored.column_names == predicted.column_names and scored.num_rows == predicted.num_rows
    for name in predicted.column_names:
        np.testing.assert_allclose(
            scored.column(name).to_numpy(), predicted.column(name).to_numpy(), rtol=1e-4, atol=1e-4
        )
