"""TwhinConfig: every shipped config validates; every inconsistent choice is rejected with the key named."""

from __future__ import annotations

import pathlib

import pytest

from tml.core.config.loader import ConfigError, load_config
from tml.projects.twhin.config import TwhinConfig

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG_DIR = ROOT / "projects/twhin/config"
CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
LOCAL = str(CONFIG_DIR / "local.yaml")
ENV = {"TML_DATA": "/d", "TML_RUNS": "/r"}
TABLES = "[{name: user, num_embeddings: 10, embedding_dim: 4, optimizer: {sgd: {learning_rate: 0.1}}}, {name: tweet, num_embeddings: 5, embedding_dim: %d, optimizer: {sgd: {learning_rate: 0.1}}}]"


def test_shipped_configs_are_found():
    assert {"local.yaml", "prod.yaml", "examples/string_keys.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_validates(name):
    config = load_config(TwhinConfig, str(CONFIG_DIR / name), env=ENV)
    assert config.training.save_dir.startswith("/r/") and config.train_data.inputs.startswith("/d/")
    for partition in config.validation_data.values():
        assert partition.inputs.startswith("/d/")


def test_prod_is_the_original_shape():
    config = load_config(TwhinConfig, str(CONFIG_DIR / "prod.yaml"), env=ENV)
    tables = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    assert tables == {"user": 424_241, "tweet": 72_543}
    assert [(r.name, r.lhs, r.rhs) for r in config.model.relations] == [
        (name, "user", "tweet") for name in ("fav", "reply", "retweet", "magic_recs")
    ]
    assert config.train_data.in_batch_negatives == 10 and config.train_data.global_batch_size == 500
    valid = config.validation_data["valid"]
    assert valid.inputs == config.train_data.inputs and valid.offset == config.train_data.limit


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.relations=[{name: fav, lhs: user, rhs: twet}]",
         r"model: relations\[0\] \('fav'\): rhs table 'twet' is not in embeddings.tables \['user', 'tweet'\]"),
        (f"model.embeddings.tables={TABLES % 8}",
         "every table needs the same embedding_dim .*, got user 4, tweet 8"),
        (f"model.embeddings.tables={TABLES % 4}", None),
        ("model.relations=[{name: fav, lhs: user, rhs: tweet, operator: rotate}]",
         "operator: Input should be 'translation', 'diagonal', 'complex_diagonal' or 'none'"),
        ("model.relations=[{name: all, lhs: user, rhs: tweet}]", "relation name 'all' is reserved"),
        ("model.relations=[{name: a, lhs: user, rhs: tweet}, {name: a, lhs: user, rhs: user}]",
         r"relation names repeat: \['a'\]"),
        ("model.relations=[{name: fav, lhs: user, rhs: tweet, operator: none}]",
         "translation_optimizer is set, but every relation has operator 'none'"),
        ("model.translation_optimizer=null", r"translation_optimizer is unset, but relations \['fav', "),
        ("train_data={inputs: x, global_batch_size: 8, in_batch_negatives: 0}",
         "in_batch_negatives \\+ global_negatives is 0"),
        ("train_data.limit=0", "train_data.limit: Input should be greater than or equal to 1"),
        ("train_data.negative_sides=left", "negative_sides: Input should be 'rhs', 'lhs' or 'both'"),
        (f"model.embeddings.tables={TABLES.replace('learning_rate: 0.1}}}]', 'learning_rate: 0.1}}, data_type: bf16}]') % 4}",
         r"tables\.1\.data_type: Input should be 'fp32' or 'fp16'"),
    ],
)  # fmt: skip
def test_inconsistent_configs_are_rejected(override, message):
    if message is None:  # the same dims: fine
        load_config(
            TwhinConfig, LOCAL, [override, "model.relations=[{name: f, lhs: user, rhs: tweet}]"], env=ENV
        )
        return
    with pytest.raises(ConfigError, match=message):
        load_config(TwhinConfig, LOCAL, [override], env=ENV)


def test_dims_are_multiples_of_four():
    tables = TABLES.replace("embedding_dim: 4", "embedding_dim: 6") % 6
    with pytest.raises(ConfigError, match=r"tables\.0\.embedding_dim: Input should be a multiple of 4"):
        load_config(TwhinConfig, LOCAL, [f"model.embeddings.tables={tables}"], env=ENV)


def test_validation_partitions_take_no_training_keys():
    with pytest.raises(ConfigError, match="validation_data.valid.in_batch_negatives"):
        load_config(TwhinConfig, LOCAL, ["validation_data.valid.in_batch_negatives=3"], env=ENV)
