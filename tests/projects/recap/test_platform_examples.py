"""The platform examples (`config/examples/calibrated_plan.yaml`, `warm_start.yaml`) are standalone: the
`tml-recap` commands of their headers run as written, on tiny sizes, in one fresh process (mode after mode,
as `tml.projects.home.recap.main.cli`), and do what the headers say: the plan runs, a second plan skips
every phase, predict and the artifact score with the same calibrated knots; day 2 warm starts from day 1."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "projects/home/recap/config/examples"
NUM_EXAMPLES = "3000"
TINY = {
    "calibrated_plan.yaml": ["validation_data.calibrate.global_batch_size=64"],
    "warm_start.yaml": [],
}
COMMON = [
    "training.num_train_steps=4",
    "training.checkpoint_every_n=4",
    "training.train_log_every_n=2",
    "train_data.global_batch_size=64",
    "validation_data.valid.global_batch_size=64",
    "train_data.shuffle.buffer_size=0",
]
CONFIG_MODES = ("plan", "train", "evaluate", "predict", "export", "calibrate")


def _header_commands(path: pathlib.Path, env: dict[str, str]) -> list[list[str]]:
    """tests/projects/recap/test_examples.py's header parser (test modules load each other by path)."""
    spec = importlib.util.spec_from_file_location(
        "_examples", pathlib.Path(__file__).with_name("test_examples.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.header_commands(path, env)


def documented_commands(path: pathlib.Path, env: dict[str, str]) -> list[list[str]]:
    """The header's `tml-recap ...` lines, variables expanded by the config loader's rules, tiny sizes added."""
    commands = _header_commands(path, env)
    for argv in commands:
        if argv[0] == "generate-data":
            argv[argv.index("--num-examples") + 1] = NUM_EXAMPLES
        if argv[0] in CONFIG_MODES:
            config = pathlib.Path(argv[argv.index("--config") + 1]).name
            argv += COMMON + TINY.get(config, [])
    return commands


_CHILD = """
import importlib.util, os, sys
from tml.projects.home.recap.main import cli
spec = importlib.util.spec_from_file_location("_platform_examples", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
env = {"TML_DATA": sys.argv[2] + "/data", "TML_RUNS": sys.argv[2] + "/runs"}
os.environ.update(env)
os.chdir(module.ROOT)
for name in sys.argv[3:]:
    for argv in module.documented_commands(module.EXAMPLES / name, env):
        print("COMMAND", " ".join(argv), file=sys.stderr, flush=True)
        cli(argv)
"""


def _run(tmp_path, *examples) -> str:
    torchrun = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, __file__, str(tmp_path), *examples],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-8000:]
    return done.stderr


@pytest.mark.slow
def test_platform_examples_run_their_documented_commands(tmp_path):
    import pyarrow.parquet as pq

    log = _run(tmp_path, "calibrated_plan.yaml", "warm_start.yaml")
    runs = tmp_path / "runs"

    plans = [part for part in log.split("COMMAND ") if part.startswith("plan ")]
    assert len(plans) == 2
    assert "plan done: train (ran), calibrate (ran), evaluate (ran)" in plans[0]
    assert "plan done: train (skipped), calibrate (skipped), evaluate (skipped)" in plans[1]
    run = runs / "calibrated_plan"
    fitted = json.loads((run / "calibration/step-4.json").read_text())
    assert fitted["partition"] == "calibrate"
    metrics = json.loads((run / "evaluate/step-4.json").read_text())
    assert "eval/valid/recap.engagement.is_favorited/isotonic_log_loss" in metrics
    predicted = pq.read_table(run / "predictions/part-00000.parquet")
    scored = pq.read_table(run / "scores/part-00000.parquet")
    for name in (
        "p/recap.engagement.is_favorited",
        "p/recap.engagement.is_good_clicked_convo_desc_v2",
        "score",
    ):
        np.testing.assert_allclose(
            scored.column(name).to_numpy(), predicted.column(name).to_numpy(), atol=1e-6
        )
    heads = json.loads((run / "artifact/artifact.json").read_text())["heads"]
    assert (
        heads["recap.engagement.is_favorited"]["calibration"]["x"]
        == fitted["tasks"]["recap.engagement.is_favorited"]["x"]
    )

    warm = log[log.index("COMMAND train --config projects/home/recap/config/examples/warm_start.yaml") :]
    assert f"warm start from {runs}/warm_start_base/checkpoints/step-4: 13 tensors loaded" in warm
    assert (
        "new, freshly initialised: model.dense_vectors.norms (2), model.towers.recap__engagement__is_retweeted (4)"
        in warm
    )
    assert (
        "changed shape, freshly initialised: model.backbone.layers.0.weight (saved [64, 48], model [64, 56])"
        in warm
    )
    assert (runs / "warm_start/evaluate/step-4.json").exists()


@pytest.mark.unit
def test_documented_commands_cover_the_features():
    env = {"TML_DATA": "/d", "TML_RUNS": "/r"}
    plan = [argv[0] for argv in documented_commands(EXAMPLES / "calibrated_plan.yaml", env)]
    assert plan == ["generate-data", "plan", "plan", "predict", "export", "score"]
    warm = documented_commands(EXAMPLES / "warm_start.yaml", env)
    assert [argv[0] for argv in warm] == ["generate-data", "train", "train", "evaluate"]
    assert warm[1][2].endswith("warm_start_base.yaml") and warm[0][-1] == "/d/warm_start"
