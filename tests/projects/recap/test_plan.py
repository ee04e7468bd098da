"""`tml-recap plan` with local.yaml's settings (tiny sizes) on bundled synthetic data, on CPU: train,
calibrate and evaluate run in order; a second run skips every finished phase; a changed setting that a
finished training cannot take is refused; a run killed during training resumes from its checkpoint.
Each command runs as its own process, as users run it."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from tml.core.config.loader import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[3]
LOCAL = str(ROOT / "projects/home/recap/config/local.yaml")
TINY = [
    "train_data.global_batch_size=64",
    "validation_data.valid.global_batch_size=64",
    "training.num_train_steps=8",
    "training.checkpoint_every_n=4",
    "training.train_log_every_n=4",
]
PHASES = ["train", "calibrate", "evaluate"]


def command(tmp_path, *args):
    return [sys.executable, "-m", "tml.projects.home.recap.main", *args]


def environment(tmp_path):
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    env.pop("TML_DEBUG", None)
    return env


def recap(tmp_path, *args, status=0):
    done = subprocess.run(
        command(tmp_path, *args), env=environment(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == status, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def records(run):
    return {p: json.loads((run / "plan" / f"{p}.json").read_text()) for p in PHASES}


@pytest.mark.slow
def test_plan_runs_every_phase_then_skips_them(tmp_path):
    data = tmp_path / "data/local"
    recap(tmp_path, "generate-data", "--config", LOCAL, "--num-examples", "6000", "--output", str(data))
    out = recap(tmp_path, "plan", "--config", LOCAL, *TINY)
    for phase in PHASES:
        assert f"plan: phase {phase}: not run before" in out
    assert "plan done: train (ran), calibrate (ran), evaluate (ran)" in out
    run = tmp_path / "runs/local"
    first = records(run)
    assert all(r["status"] == "finished" and r["error"] is None for r in first.values())
    assert first["train"]["outputs"]["step"] == 8
    assert first["calibrate"]["outputs"]["file"] == str(run / "calibration/step-8.json")
    evaluation = json.loads((run / "evaluate/step-8.json").read_text())
    assert "eval/valid/recap.engagement.is_replied/isotonic_rce" in evaluation
    assert len(list((run / "evaluate").glob("step-8.valid.*.reliability.png"))) == 4

    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "tensorboard" not in p.parts)
    out = recap(tmp_path, "plan", "--config", LOCAL, *TINY)
    for phase in PHASES:
        assert f"plan: phase {phase} finished at {first[phase]['ended']} with the same inputs: skipped" in out
    assert "plan done: train (skipped), calibrate (skipped), evaluate (skipped)" in out
    assert records(run) == first
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if "tensorboard" not in p.parts) == files

    # A finished training cannot take another optimizer by resuming: refused, naming the key.
    out = recap(tmp_path, "plan", "--config", LOCAL, *TINY, "optimizer.adam.beta_1=0.8", status=2)
    assert (
        "tml-recap: plan: phase 'train' finished with other inputs: its checkpoints were trained with other "
        "settings (optimizer.adam.beta_1: 0.95 -> 0.8)"
    ) in out
    # A calibration setting re-runs calibrate and evaluate only, and says what changed.
    out = recap(tmp_path, "plan", "--config", LOCAL, *TINY, "calibration.num_bins=100")
    assert "plan: phase train finished at" in out
    assert "plan: phase calibrate: inputs changed since it finished (num_bins: 1000 -> 100)" in out
    assert "plan done: train (skipped), calibrate (ran), evaluate (ran)" in out

    # Killed (SIGKILL) during training: the next run resumes from the latest checkpoint, then goes on.
    killed = [*TINY, "training.num_train_steps=300", "training.checkpoint_every_n=20",
              f"training.save_dir={tmp_path}/runs/killed"]  # fmt: skip
    run = tmp_path / "runs/killed"
    process = subprocess.Popen(
        command(tmp_path, "plan", "--config", LOCAL, *killed),
        env=environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints/step-20/COMPLETE").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert json.loads((run / "plan/train.json").read_text())["status"] == "running"
    out = recap(tmp_path, "plan", "--config", LOCAL, *killed)
    assert "plan: phase train: its last run ended running; running it again" in out
    resumed = re.search(rf"resumed from step (\d+) of {run}", out)
    assert resumed and 20 <= int(resumed.group(1)) < 300, out[-3000:]
    assert [r["status"] for r in records(run).values()] == ["finished"] * 3
    assert records(run)["train"]["outputs"]["step"] == 300


@pytest.mark.unit
def test_phases_named_in_the_config_are_checked():
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.plan import resolve_phases

    def phases(*overrides):
        return [p.name for p in resolve_phases(load_config(RecapConfig, LOCAL, list(overrides), env={}))]

    assert phases() == PHASES
    assert phases("plan.phases=[calibrate, evaluate]") == ["calibrate", "evaluate"]
    assert phases("validation_data={}", "training.eval_every_n=null", "training.num_eval_steps=null") == [
        "train"
    ]
    with pytest.raises(ConfigError, match=r"plan.phases\[1\]: unknown phase 'test'; the phases are"):
        phases("plan.phases=[train, test]")
    with pytest.raises(
        ConfigError,
        match=r"phases run in the order \['calibrate-discretizer', 'train', 'calibrate', 'evaluate'\]",
    ):
        phases("plan.phases=[evaluate, train]")
    with pytest.raises(ConfigError, match=r"phase 'calibrate' cannot run: the config has no validation_data"):
        phases("plan.phases=[train, calibrate]", "validation_data={}", "training.eval_every_n=null",
               "training.num_eval_steps=null")  # fmt: skip
    with pytest.raises(ConfigError, match="distinct phase names"):
        phases("plan.phases=[train, train]")


@pytest.mark.unit
def test_differences_name_every_changed_key():
    from tml.projects.home.recap.plan import differences

    saved = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "gone": 1}
    assert differences(saved, {"a": {"b": 2, "c": [1, 2]}, "d": "x", "new": True}) == [
        "a.b: 1 -> 2",
        "gone: 1 -> (default)",
        "new: (default) -> True",
    ]
    assert differences(saved, saved) == []
