"""Every validation partition is checked against the model before step 1 (dense tensor widths and dtypes,
sparse features, tasks), and each data section takes only the keys it honours; errors name the partition and
the key."""

import pathlib

import pytest

from tml.core.config.loader import ConfigError, load_config
from tml.projects.home.recap.config import RecapConfig

pytestmark = pytest.mark.unit
CONFIGS = pathlib.Path(__file__).resolve().parents[4] / "projects/home/recap/config"
LOCAL = str(CONFIGS / "local.yaml")
EMBEDDINGS = str(CONFIGS / "examples/model_embeddings.yaml")
TASKS = [
    "recap.engagement.is_favorited",
    "recap.engagement.is_good_clicked_convo_desc_v2",
    "recap.engagement.is_replied",
    "recap.engagement.is_retweeted",
]


def _error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(RecapConfig, path, list(overrides), env={})
    return str(error.value)


def test_a_truncation_in_train_data_only_is_caught_at_load_naming_both_sides():
    message = _error(LOCAL, "train_data.preprocess.truncate_and_slice.continuous_feature_truncation=32")
    assert (
        "validation_data.valid: dense tensor 'continuous' has width 64, the model (built from train_data) "
        "expects 32 (train_data: preprocess.truncate_and_slice.continuous_feature_truncation = 32; "
        "validation_data.valid: seg_dense_schema feature length 64)"
    ) in message
    cut = "preprocess.truncate_and_slice.continuous_feature_truncation=32"
    config = load_config(RecapConfig, LOCAL, [f"train_data.{cut}", f"validation_data.valid.{cut}"], env={})
    assert config.validation_data["valid"].preprocess.truncate_and_slice.continuous_feature_truncation == 32


def test_masks_dtypes_and_missing_tensors(tmp_path):
    mask = tmp_path / "mask.txt"
    mask.write_text("0 3 5")
    message = _error(
        LOCAL, f"validation_data.valid.preprocess.truncate_and_slice.binary_feature_mask_path={mask}"
    )
    assert (
        "validation_data.valid: dense tensor 'binary' has width 3, the model (built from train_data) "
        in message
    )
    assert "binary_feature_mask_path keeps 3 indices" in message
    features = (
        "validation_data.valid.seg_dense_schema.features=[{name: continuous, length: 64}, "
        "{name: binary, length: 16, dtype: int64}, {name: discrete, length: 8, dtype: float32}, "
        "{name: user_embedding, length: 16}, {name: author_embedding, length: 16}]"
    )
    assert (
        "dense tensor 'discrete' has dtype float32, the model (built from train_data) expects int64"
        in _error(LOCAL, features)
    )
    fewer = features.split(", {name: discrete")[0] + "]"
    message = _error(LOCAL, fewer)
    assert (
        "validation_data.valid: dense tensors ['author_embedding', 'discrete', 'user_embedding'] " in message
    )
    extra = features.replace("float32}", "int64}").replace("]", ", {name: other, length: 2}]")
    assert (
        "validation_data.valid: dense tensor 'other' (seg_dense_schema feature length 2) is not in train_data"
        in (_error(LOCAL, extra))
    )


def test_sparse_features_must_match_in_order_and_buckets():
    swapped = (
        "validation_data.valid.sparse_features=[{name: author_id, column: meta.author_id, num_buckets: 500}, "
        "{name: user_id, column: meta.user_id, num_buckets: 1000}]"
    )
    message = _error(EMBEDDINGS, swapped)
    assert (
        "validation_data.valid.sparse_features must list the features of train_data.sparse_features in the same order"
        in message
    )
    assert (
        "train_data has [user_id (num_buckets 1000), author_id (num_buckets 500)], validation_data.valid has "
        "[author_id (num_buckets 500), user_id (num_buckets 1000)]"
    ) in message
    # Another column for the same feature is fine (partitions may name their columns differently).
    renamed = (
        "validation_data.valid.sparse_features=[{name: user_id, column: uid, num_buckets: 1000}, "
        "{name: author_id, column: meta.author_id, num_buckets: 500}]"
    )
    assert (
        load_config(RecapConfig, EMBEDDINGS, [renamed], env={})
        .validation_data["valid"]
        .sparse_features[0]
        .column
        == "uid"
    )


def test_a_task_mismatch_says_what_is_missing_and_what_is_extra():
    message = _error(LOCAL, "validation_data.valid.tasks={recap.engagement.is_favorited: {}, foo: {}}")
    lacks = [t for t in TASKS if t != "recap.engagement.is_favorited"]
    assert f"validation_data.valid.tasks lacks {lacks}; has extra ['foo']; model.tasks = {TASKS}" in message
    rates = "optimizer.multi_task_learning_rates.tower_learning_rates"
    message = _error(LOCAL, f"{rates}={{recap.engagement.is_favorited: {{constant: 0.1}}}}")
    assert f"{rates} lacks {lacks}; model.tasks" in message and "has extra" not in message


def test_keys_a_section_does_not_honour_are_rejected_with_the_reason(tmp_path):
    text = pathlib.Path(LOCAL).read_text()
    text = text.replace(
        "  shuffle: {seed: 0, buffer_size: 16384}\n",
        "  shuffle: {seed: 0, buffer_size: 16384}\n  evaluation_tasks: [recap.engagement.is_favorited]\n",
    )
    text = text.replace(
        "    inputs: ${TML_DATA:-data}/local/valid/*.parquet\n",
        "    inputs: ${TML_DATA:-data}/local/valid/*.parquet\n    shuffle: {seed: 1}\n    num_epochs: 1\n"
        "    id_columns: [meta.user_id]\n",
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = _error(str(path))
    assert (
        "train_data: evaluation_tasks: not accepted here: only validation_data partitions report metrics "
        "(set it there)"
    ) in message
    assert (
        "validation_data.valid: shuffle and num_epochs: not accepted here: evaluation reads each partition once "
        "per evaluation, in file order (training.num_eval_steps evaluates fewer batches); id_columns: not "
        "accepted here: evaluation reads no ids (predict writes train_data.id_columns)"
    ) in message
    # A partition honours evaluation_tasks.
    config = load_config(
        RecapConfig, LOCAL, ["validation_data.valid.evaluation_tasks=[recap.engagement.is_replied]"], env={}
    )
    assert config.validation_data["valid"].evaluation_tasks == ["recap.engagement.is_replied"]


def test_a_saved_config_loads_back(tmp_path):
    # config.yaml of a run writes every default out: a validation partition has no shuffle/num_epochs to write.
    from tml.core.config.loader import save_config

    config = load_config(RecapConfig, LOCAL, env={})
    save_config(config, str(tmp_path / "config.yaml"))
    assert load_config(RecapConfig, str(tmp_path / "config.yaml"), env={}) == config


def test_an_unreadable_schema_file_names_the_section(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error(LOCAL, f"train_data.seg_dense_schema={{schema_path: {missing}}}")
    assert f"train_data.seg_dense_schema.schema_path '{missing}': cannot read" in message


def test_evaluation_cadence_without_a_partition_is_rejected():
    message = _error(LOCAL, "validation_data={}")  # local.yaml sets eval_every_n and num_eval_steps
    assert (
        "training.eval_every_n and training.num_eval_steps set, but there is no validation_data partition"
    ) in message
    config = load_config(
        RecapConfig,
        LOCAL,
        ["validation_data={}", "training.eval_every_n=null", "training.num_eval_steps=null"],
        env={},
    )
    assert config.validation_data == {}
