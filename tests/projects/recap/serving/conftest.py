"""A tiny trained local.yaml run shared by the serving tests: data, a checkpoint written by 2 ranks, the
predictions of `tml-recap predict` on the validation rows, and its exported artifact (exported program)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[4]
LOCAL = str(ROOT / "projects/home/recap/config/local.yaml")
TINY = [
    "train_data.global_batch_size=64",
    "validation_data.valid.global_batch_size=64",
    "training.num_train_steps=4",
    "training.checkpoint_every_n=4",
    "training.eval_every_n=4",
    "prediction.batch_size=100",
]


def recap(env: dict, *args: str, nproc: int = 1, ok: bool = True) -> str:
    """Run `tml-recap ARGS` (under torchrun with `nproc` > 1) as its own process; its output."""
    prefix = [sys.executable, "-m", "tml.projects.home.recap.main"]
    if nproc > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *prefix[1:]]
    done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    env.update(TML_DATA=str(tmp / "data"), TML_RUNS=str(tmp / "runs"), OMP_NUM_THREADS="1")
    data = tmp / "data" / "local"
    recap(env, "generate-data", "--config", LOCAL, "--num-examples", "2000", "--output", str(data))
    recap(env, "train", "--config", LOCAL, *TINY, nproc=2)  # the checkpoint is written by 2 ranks
    valid = str(data / "valid" / "*.parquet")
    recap(env, "predict", "--config", LOCAL, *TINY, "--input", valid, "--output", str(tmp / "preds"))
    artifact = tmp / "artifact"
    recap(env, "export", "--config", LOCAL, *TINY, "--output", str(artifact), "--compile", "none")
    return {
        "env": env,
        "tmp": tmp,
        "data": data,
        "valid": valid,
        "run": tmp / "runs" / "local",
        "predictions": tmp / "preds" / "part-00000.parquet",
        "artifact": artifact,
        "export": lambda *args, ok=True: recap(env, "export", "--config", LOCAL, *TINY, *args, ok=ok),
        "recap": lambda *args, ok=True: recap(env, *args, ok=ok),
    }
