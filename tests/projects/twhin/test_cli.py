"""tml-twhin end to end on tiny data, as a user runs it: generate-data -> train -> evaluate -> export ->
neighbors -> attach (into recap Parquet that recap's reader then reads), and the string-key path
(generate-data -> build-vocab -> export -> neighbors --key). Modes that train or shard run as their own
process; the light ones in this one."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.projects.twhin.main import cli

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[3]
LOCAL = str(ROOT / "projects/twhin/config/local.yaml")
KEYS = str(ROOT / "projects/twhin/config/examples/string_keys.yaml")
TINY = [
    "training.num_train_steps=6",
    "training.checkpoint_every_n=3",
    "training.eval_every_n=3",
    "training.train_log_every_n=3",
    "train_data.global_batch_size=128",
]


def twhin(tmp_path, *args, ok=True) -> str:
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    command = [sys.executable, "-m", "tml.projects.twhin.main", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TML_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TML_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_generate_train_evaluate_export_neighbors_attach(data_env, capsys):
    tmp_path = data_env
    data = tmp_path / "data" / "twhin_local"
    cli(["generate-data", "--config", LOCAL, "--num-edges", "3000", "--output", str(data)])
    assert "valid: 150 edges" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir()) == ["test", "train", "valid"]

    out = twhin(tmp_path, "train", "--config", LOCAL, *TINY)
    run = tmp_path / "runs" / "twhin_local"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/examples_per_s" in r] == [3, 6]
    assert any("eval/test/side=lhs/fav/random_mrr" in r for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert "eval/valid at step 6" in out and "random_mrr" in out

    out = twhin(tmp_path, "evaluate", "--config", LOCAL, *TINY)
    result = json.loads((run / "evaluate" / "step-6.json").read_text())
    assert result["step"] == 6 and result["eval/valid/all/count"] == 2 * 150
    assert 0 < result["eval/valid/all/random_mrr"] < 0.01 and 0 < result["eval/valid/all/mrr"] <= 1
    assert "eval/valid:" in out and "side=rhs" in out

    export = tmp_path / "export"
    twhin(tmp_path, "export", "--config", LOCAL, *TINY, "--output", str(export))
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["step"] == 6 and [t["name"] for t in manifest["tables"]] == ["user", "tweet"]
    out = twhin(tmp_path, "export", "--config", LOCAL, *TINY, "--output", str(export), ok=False)
    assert "already holds an export" in out and "--overwrite" in out

    cli(["neighbors", "--export", str(export), "--type", "user", "--id", "7", "-k", "5", "--among", "tweet",
         "--metric", "cos", "--backend", "torch"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "cos neighbours of user 7 in tweet:" and len(lines) == 6

    # attach: recap-shaped Parquet with meta.user_id, some ids the export does not know.
    recap = tmp_path / "recap"
    recap.mkdir()
    ids = np.array([0, 7, 4999, 5000, -3, 7], dtype=np.int64)
    pq.write_table(pa.table({"meta.user_id": ids, "label": np.ones(6, np.float32)}), recap / "part-0.parquet")
    out_dir = tmp_path / "recap_twhin"
    cli(["attach", "--export", str(export), "--type", "user", "--input", str(recap / "*.parquet"),
         "--id-column", "meta.user_id", "--name", "user_twhin", "--output", str(out_dir)])  # fmt: skip
    assert "2 rows (33.33%) had user ids the export does not know" in capsys.readouterr().out
    from tml.projects.twhin.embeddings import load
    from tml.reader.config import DataConfig
    from tml.reader.dataset import build_dataset

    vectors = load(str(export)).lookup("user", ids=[0, 7, 4999])
    config = DataConfig(
        inputs=str(out_dir / "*.parquet"),
        global_batch_size=6,
        seg_dense_schema={"features": [{"name": "user_twhin", "length": 16}]},
        tasks={"label": {}},
    )
    (batch,) = list(build_dataset(config, ["label"], num_epochs=1, shuffle=False))
    read = batch.dense["user_twhin"]
    torch.testing.assert_close(read[[0, 1, 2, 5]], vectors[[0, 1, 2, 1]])
    assert not read[[3, 4]].any()


def test_string_keys_build_vocab_export_neighbors(data_env, capsys):
    from tml.core.config.loader import load_config
    from tml.core.distributed import DistEnv
    from tml.projects.twhin import build
    from tml.projects.twhin.config import TwhinConfig
    from tml.projects.twhin.export import write_export

    tmp_path = data_env
    data = tmp_path / "data" / "twhin_keys"
    cli(["generate-data", "--config", KEYS, "--num-edges", "2000", "--output", str(data)])
    assert "(string keys)" in capsys.readouterr().out
    cli(["build-vocab", "--config", KEYS])
    assert "vocabulary ->" in capsys.readouterr().out and (data / "vocab" / "user.parquet").exists()
    config = load_config(TwhinConfig, KEYS)
    torch.manual_seed(0)
    module = build.build_model(config)
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    write_export(config, module, env, 0, str(tmp_path / "export"), overwrite=False)
    cli(["neighbors", "--export", str(tmp_path / "export"), "--type", "user", "--key", "user-17", "-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "dot neighbours of user 'user-17' in user:" and len(lines) == 4
    keys = [line.split()[2] for line in lines[1:]]  # rows past the vocabulary print '-'
    assert all(k.startswith("user-") or k == "-" for k in keys) and "user-17" not in keys
