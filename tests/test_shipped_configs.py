"""Every YAML shipped in the repository is a complete config that loads and validates on its own.

No environment is given: folders default through `${TML_DATA:-data}` / `${TML_RUNS:-runs}`, so a config
that needs a variable to be set (or is only a fragment of a config) fails here. Models are built where
their inputs need no files (z-score stats are written by `compute-stats` first; see
tests/projects/recap/test_examples.py for whole runs).
"""

import pathlib

import pytest

from tml.core.config.loader import load_config
from tml.projects.home.recap.config import RecapConfig
from tml.projects.twhin.config import TwhinConfig

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p
    for p in ROOT.rglob("*.yaml")
    if not ({".venv", ".git", "runs", "data"} & set(p.relative_to(ROOT).parts))
)
RECAP = ROOT / "projects/home/recap/config"
TWHIN = ROOT / "projects/twhin/config"


def test_something_is_shipped():
    names = {p.name for p in SHIPPED}
    assert {"local.yaml", "prod.yaml", "model_mlp.yaml", "model_dcn.yaml"} <= names
    assert all(p.is_relative_to(RECAP) or p.is_relative_to(TWHIN) for p in SHIPPED), (
        "a new project's YAML needs its config class here"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_is_a_standalone_config(path):
    if path.is_relative_to(TWHIN):
        from tml.projects.twhin.build import build_model

        config = load_config(TwhinConfig, str(path), env={})
        assert config.train_data.inputs.startswith("data/") and config.training.save_dir.startswith("runs/")
        assert config.validation_data and all(
            p.inputs.startswith("data/") for p in config.validation_data.values()
        )
        build_model(config, device="meta")
        return
    config = load_config(RecapConfig, str(path), env={})
    # Data and runs live under the two documented folders, whatever the environment says.
    assert config.train_data.inputs.startswith("data/"), config.train_data.inputs
    assert config.training.save_dir.startswith("runs/"), config.training.save_dir
    assert config.validation_data, "every shipped config evaluates something"
    z = config.model.featurization_config.z_score_log_config
    discretizer = config.model.discretizer
    if discretizer is not None:  # tests/projects/recap/test_light_ranker.py calibrates and builds it
        assert discretizer.boundaries_path.startswith("runs/"), "calibrate-discretizer writes it with the run"
    elif z is None:
        from tml.projects.home.recap.build import build_train_module

        build_train_module(config)
    else:
        assert z.analysis_path.startswith("data/"), "compute-stats writes the default path the config reads"
