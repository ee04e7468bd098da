"""tml-recap end to end on tiny synthetic data: generate-data, train (1 and 2 processes), resume, evaluate,
predict, summary, compute-stats. Each mode runs as its own process, as users run it."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
LOCAL = str(ROOT / "projects/home/recap/config/local.yaml")
TINY = [
    "train_data.global_batch_size=64",
    "validation_data.valid.global_batch_size=64",
    "training.checkpoint_every_n=4",
    "training.eval_every_n=4",
    "training.train_log_every_n=2",
]


def recap(tmp_path, *args, nproc=1, ok=True):
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    prefix = [sys.executable, "-m", "tml.projects.home.recap.main"]
    if nproc > 1:
        prefix = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "-m",
            "tml.projects.home.recap.main",
        ]
    done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done.stdout + done.stderr


# Python warnings ("x.py:3: FutureWarning: ..."), torch's logging ("[rank0]:W1201 ..."), other libraries'
# loggers ("WARNING:torchrec...:"); torchrun's own note about OMP_NUM_THREADS is the launcher's, not the run's.
THIRD_PARTY_WARNING = re.compile(r"Warning: |^(\[rank\d+\]:)?[WE]\d{4} |^WARNING:")


def third_party_warnings(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if THIRD_PARTY_WARNING.search(line)]
    return [line for line in lines if "torch/distributed/run.py" not in line]


def metrics(tmp_path, run="local"):
    path = tmp_path / "runs" / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_recap_modes_end_to_end(tmp_path):
    data = tmp_path / "data" / "local"
    recap(tmp_path, "generate-data", "--config", LOCAL, "--num-examples", "3000", "--output", str(data))
    assert json.loads((data / "train" / "oracle_auc.json").read_text())

    out = recap(tmp_path, "train", "--config", LOCAL, *TINY, "training.num_train_steps=6")
    assert third_party_warnings(out) == []
    run = tmp_path / "runs" / "local"
    assert (run / "config.yaml").exists() and list((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    steps = [r["step"] for r in metrics(tmp_path) if "train/loss" in r]
    assert steps == [2, 4, 6]
    assert any("eval/valid/recap.engagement.is_favorited/auroc" in r for r in metrics(tmp_path))

    # A second run with more steps resumes from step 6 instead of starting again.
    out = recap(tmp_path, "train", "--config", LOCAL, *TINY, "training.num_train_steps=8")
    assert "resumed from step 6" in out
    assert [r["step"] for r in metrics(tmp_path) if "train/loss" in r][-1] == 8

    # evaluate and predict only read the run: they neither remove a save in progress nor add files there.
    (run / "checkpoints" / ".tmp-step-99").mkdir()
    checkpoints_before = sorted(p.name for p in (run / "checkpoints").iterdir())
    out = recap(tmp_path, "evaluate", "--config", LOCAL, *TINY)
    assert third_party_warnings(out) == []
    assert "eval/valid:" in out and "recap.engagement.is_replied" in out and "auroc" in out
    evaluation = json.loads((run / "evaluate" / "step-8.json").read_text())
    assert evaluation["step"] == 8 and "eval/valid/recap.engagement.is_replied/auroc" in evaluation

    preds = tmp_path / "preds"
    recap(
        tmp_path,
        "predict",
        "--config",
        LOCAL,
        *TINY,
        "--input",
        str(data / "valid" / "*.parquet"),
        "--output",
        str(preds),
    )
    table = pq.read_table(preds / "part-00000.parquet")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (data / "valid").glob("*.parquet"))
    assert table.num_rows == rows
    assert {"meta.user_id", "meta.author_id", "score", "p/recap.engagement.is_favorited"} <= set(
        table.column_names
    )
    p = {
        t: table.column(f"p/recap.engagement.{t}").to_numpy()
        for t in ("is_favorited", "is_retweeted", "is_replied", "is_good_clicked_convo_desc_v2")
    }
    expected = (
        0.5 * p["is_favorited"]
        + 1.0 * p["is_retweeted"]
        + 13.5 * p["is_replied"]
        + 10.0 * p["is_good_clicked_convo_desc_v2"]
    )
    assert abs(table.column("score").to_numpy() - expected).max() < 1e-5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints_before
    out = recap(
        tmp_path,
        "predict",
        "--config",
        LOCAL,
        "--input",
        str(data / "valid"),
        "--output",
        str(preds),
        ok=False,
    )
    assert "already holds 1 part file(s)" in out and "--overwrite" in out

    # Two ranks, uneven shares (3 files of 150 rows, batches of 64: 5 batches on one rank, 3 on the other).
    valid_files = sorted((data / "valid").glob("*.parquet"))[:3]
    recap(
        tmp_path,
        "predict",
        "--config",
        LOCAL,
        *TINY,
        "prediction.batch_size=64",
        "--input",
        str(data / "valid" / "part-0000[012].parquet"),
        "--output",
        str(tmp_path / "preds2"),
        nproc=2,
    )
    parts = [pq.read_table(tmp_path / "preds2" / f"part-0000{r}.parquet") for r in (0, 1)]
    assert parts[0].num_rows != parts[1].num_rows
    assert sum(p.num_rows for p in parts) == sum(pq.ParquetFile(f).metadata.num_rows for f in valid_files)

    # Resuming with another global batch size is exact by rows and says so; a changed model is refused
    # before anything in the run folder is touched.
    out = recap(
        tmp_path,
        "train",
        "--config",
        LOCAL,
        *TINY,
        "training.num_train_steps=10",
        "train_data.global_batch_size=32",
    )
    assert "resumed from step 8" in out and "global_batch_size 64 -> 32" in out
    saved_config = (run / "config.yaml").read_text()
    pos_weight = "model.tasks.recap.engagement.is_favorited.pos_weight=2.0"
    out = recap(
        tmp_path, "train", "--config", LOCAL, *TINY, "training.num_train_steps=12", pos_weight, ok=False
    )
    assert (
        "was trained with a different model (model.tasks.recap.engagement.is_favorited.pos_weight: 1.0 -> 2.0)"
        in out
    )
    assert "initial_checkpoint_dir" in out and (run / "config.yaml").read_text() == saved_config
    # Reading the checkpoint with another model section would score with other constants: refused too.
    out = recap(tmp_path, "evaluate", "--config", LOCAL, *TINY, pos_weight, ok=False)
    assert "was trained with a different model (model.tasks.recap.engagement.is_favorited.pos_weight" in out

    # Two processes under torchrun (gloo): the embedding table is sharded row-wise, the rest data-parallel.
    # Three files make uneven shares (1500 and 750 rows): at step 24 one rank's epoch ends in a short batch
    # while the other's is full, and the row-wise table still exchanges equal pieces (the reader pads).
    out = recap(
        tmp_path,
        "train",
        "--config",
        LOCAL,
        *TINY,
        "training.num_train_steps=26",
        "training.eval_every_n=26",
        "training.checkpoint_every_n=26",
        f"train_data.inputs={data}/train/part-0000[012].parquet",
        f"training.save_dir={tmp_path}/runs/two",
        "training.profile={start_step: 2, num_steps: 2}",
        nproc=2,
    )
    assert third_party_warnings(out) == []
    for rank in (0, 1):
        assert len(list((tmp_path / "runs/two/profile" / f"rank{rank}").glob("*.pt.trace.json"))) == 1
    assert [r["step"] for r in metrics(tmp_path, "two") if "train/loss" in r] == list(range(2, 27, 2))


@pytest.mark.slow
def test_summary_of_prod_and_stats(tmp_path):
    out = recap(tmp_path, "summary", "--config", str(ROOT / "projects/home/recap/config/prod.yaml"))
    # The closed-form count of tests/projects/recap/model/test_model.py::PROD, which prod.yaml writes out.
    assert out.strip().splitlines()[-1] == "total parameters: 48115108"


def test_config_errors_exit_with_the_key(tmp_path):
    env = {**os.environ, "TML_DATA": "d", "TML_RUNS": "r"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tml.projects.home.recap.main",
            "train",
            "--config",
            LOCAL,
            "training.num_stepz=3",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "'training' has no key 'num_stepz'" in done.stderr
