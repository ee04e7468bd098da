"""RecapConfig cross-section checks: sparse ids always have a row of their table (num_buckets vs
num_embeddings), in train_data and every validation partition."""

import pathlib

import pytest

from tml.core.config.loader import ConfigError, load_config
from tml.projects.home.recap.config import RecapConfig

pytestmark = pytest.mark.unit
CONFIGS = pathlib.Path(__file__).resolve().parents[4] / "projects/home/recap/config"
# Its tables: user_table (1000 rows) reads user_id, author_table (500 rows) reads author_id.
EMBEDDINGS = str(CONFIGS / "examples/model_embeddings.yaml")


def _features(user_buckets, author_buckets="500", section="train_data"):
    return (
        f"{section}.sparse_features=[{{name: user_id, column: meta.user_id, num_buckets: {user_buckets}}}, "
        f"{{name: author_id, column: meta.author_id, num_buckets: {author_buckets}}}]"
    )


def test_num_buckets_up_to_the_table_size_is_accepted():
    for buckets in ("1000", "10"):
        both = [_features(buckets), _features(buckets, section="validation_data.valid")]
        config = load_config(RecapConfig, EMBEDDINGS, both, env={})
        assert config.train_data.sparse_features[0].num_buckets == int(buckets)


@pytest.mark.parametrize(("buckets", "given"), [("1001", "= 1001 is larger"), ("null", "is unset")])
def test_num_buckets_past_the_table_or_unset_is_rejected(buckets, given):
    with pytest.raises(ConfigError) as error:
        load_config(RecapConfig, EMBEDDINGS, [_features(buckets)], env={})
    message = str(error.value)
    assert "model_embeddings.yaml" in message
    assert f"train_data.sparse_features[0].num_buckets {given} but feature 'user_id' feeds" in message
    assert "table 'user_table' with num_embeddings = 1000" in message


def test_validation_partitions_are_checked_too():
    with pytest.raises(
        ConfigError, match=r"validation_data.valid.sparse_features\[1\].num_buckets = 501 .*'author_table'"
    ):
        load_config(RecapConfig, EMBEDDINGS, [_features(1000, 501, "validation_data.valid")], env={})


def test_a_sparse_feature_no_table_reads_needs_no_bound():
    extra = (
        "train_data.sparse_features=[{name: user_id, column: meta.user_id, num_buckets: 10}, "
        "{name: author_id, column: meta.author_id, num_buckets: 10}, {name: other, column: meta.tweet_id}]"
    )
    both = [extra, extra.replace("train_data", "validation_data.valid", 1)]
    config = load_config(RecapConfig, EMBEDDINGS, both, env={})
    assert config.train_data.sparse_features[2].num_buckets is None
