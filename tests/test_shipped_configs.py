"""Every YAML shipped in the repository loads and validates (and builds its model where it is a model section)."""

import pathlib

import pytest
import yaml

from tml.core.config.loader import load_config
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.config.model import ModelConfig

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p
    for p in ROOT.rglob("*.yaml")
    if not ({".venv", ".git", "runs", "data"} & set(p.relative_to(ROOT).parts))
)
ENV = {"TML_DATA": "/data", "TML_RUNS": "/runs", "STATS_PATH": "/stats.json"}


def test_something_is_shipped():
    names = {p.name for p in SHIPPED}
    assert {"local.yaml", "prod.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_validates(path):
    if path.parent.name == "examples" and path.name.startswith("model_"):
        ModelConfig.model_validate(
            yaml.safe_load(path.read_text().replace("${STATS_PATH}", ENV["STATS_PATH"]))["model"]
        )
    else:
        load_config(RecapConfig, str(path), env=ENV)
