"""Warm start across feature changes (core.checkpoint.warm_start, as `training.initial_checkpoint_dir` runs
it): a model whose config adds a task or a feature starts from a checkpoint of the smaller model. Tensors
of the same name and shape load; new ones, and those whose shape changed (the first layer, reading a wider
input), keep their fresh initialisation; the log lists each kind. Day 1 is examples/warm_start_base.yaml,
trained by its own command; the changes are those examples/warm_start.yaml makes, one at a time."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

# DCP loads in one process here, which it warns about.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "projects/home/recap/config/examples"
NEW_TASK = "recap.engagement.is_retweeted"
TINY = ["training.num_train_steps=4", "training.checkpoint_every_n=4", "train_data.global_batch_size=64"]


def _config(tmp_path, change: str):
    """warm_start_base.yaml with one of warm_start.yaml's changes: a task or a feature."""
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig

    raw = yaml.safe_load((EXAMPLES / "warm_start_base.yaml").read_text())
    if change == "task":
        raw["model"]["tasks"][NEW_TASK] = {"mlp_config": {"layer_sizes": [16, 1]}}
        raw["train_data"]["tasks"][NEW_TASK] = {}
        raw["validation_data"]["valid"]["tasks"][NEW_TASK] = {}
    else:
        raw["model"]["dense_embeddings"]["names"].append("author_embedding")
    path = tmp_path / f"add_{change}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(
        RecapConfig, str(path), env={"TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path)}
    )


def _warm_start(config, checkpoint):
    from tml.core.checkpoint import warm_start
    from tml.core.state import model_state
    from tml.projects.home.recap.build import build_train_module

    torch.manual_seed(1)
    module = build_train_module(config)
    initial = {name: value.clone() for name, value in model_state(module).items()}
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tml.core.checkpoint")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        fresh = warm_start(module, checkpoint)
    finally:
        logger.removeHandler(handler)
        logger.level = level
    return fresh, initial, model_state(module), lines


def test_adding_a_task_or_a_feature_keeps_the_shared_weights(tmp_path):
    from tml.core.checkpoint import load_weights
    from tml.core.config.loader import load_config
    from tml.core.state import model_state
    from tml.projects.home.recap.build import build_train_module
    from tml.projects.home.recap.config import RecapConfig

    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path)}
    main = [sys.executable, "-m", "tml.projects.home.recap.main"]
    for args in (
        ["generate-data", "--config", str(EXAMPLES / "warm_start.yaml"), "--num-examples", "2000",
         "--output", str(tmp_path / "data/warm_start")],
        ["train", "--config", str(EXAMPLES / "warm_start_base.yaml"), *TINY],
    ):  # fmt: skip
        done = subprocess.run([*main, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-5000:]
    checkpoint = str(tmp_path / "warm_start_base")
    base = build_train_module(load_config(RecapConfig, str(EXAMPLES / "warm_start_base.yaml"), env=env))
    load_weights(base, checkpoint)
    day1 = model_state(base)

    # A new task: only its tower starts fresh.
    fresh, initial, warm, lines = _warm_start(_config(tmp_path, "task"), checkpoint)
    tower = "model.towers.recap__engagement__is_retweeted."
    assert fresh == [name for name in warm if name.startswith(tower)] and len(fresh) == 4
    for name, value in warm.items():
        torch.testing.assert_close(value, initial[name] if name in fresh else day1[name], rtol=0, atol=0)
    assert lines[0].endswith(
        "tensors loaded: model.dense_vectors.norms (2), model.backbone.layers (4), "
        "model.towers.recap__engagement__is_favorited (4), model.towers.recap__engagement__is_replied (4)"
    )
    assert lines[1:] == [
        "warm start: new, freshly initialised: model.towers.recap__engagement__is_retweeted (4)"
    ]

    # A new feature (an 8-d vector): its LayerNorm is new, the backbone's first weight reads 8 more columns.
    fresh, initial, warm, lines = _warm_start(_config(tmp_path, "feature"), checkpoint)
    assert fresh == [
        "model.dense_vectors.norms.author_embedding.weight",
        "model.dense_vectors.norms.author_embedding.bias",
        "model.backbone.layers.0.weight",
    ]
    for name, value in warm.items():
        torch.testing.assert_close(value, initial[name] if name in fresh else day1[name], rtol=0, atol=0)
    assert lines[1:] == [
        "warm start: new, freshly initialised: model.dense_vectors.norms (2)",
        "warm start: changed shape, freshly initialised: model.backbone.layers.0.weight (saved [64, 48], "
        "model [64, 56])",
    ]
