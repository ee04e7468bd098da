"""ModelConfig rejections (config-time and build-time). The shipped examples are whole configs, tested in
tests/test_shipped_configs.py, tests/projects/recap/test_pipelines.py and test_examples.py."""

import pathlib

import pydantic
import pytest

from tml.projects.home.recap.config.model import ModelConfig
from tml.projects.home.recap.model import build_model

pytestmark = pytest.mark.unit

TOWER = {"mlp_config": {"layer_sizes": [4, 1]}}
WIDTHS = {"continuous": 10, "binary": 3, "discrete": 4}


def _config(**overrides):
    base = {"tasks": {"a.b": TOWER}}
    base.update(overrides)
    return ModelConfig.model_validate(base)


def _reject(match, **overrides):
    with pytest.raises(pydantic.ValidationError, match=match):
        _config(**overrides)


def test_defaults():
    config = _config()
    assert config.multi_task_type == "share_none"
    assert config.featurization_config.log1p_abs_config is not None
    assert config.featurization_config.feature_names_to_concat == ["binary"]
    assert config.tasks["a.b"].pos_weight == 1.0 and config.tasks["a.b"].loss_weight == 1.0


def test_multi_task_type_vs_backbone():
    _reject("share_all needs a `backbone`", multi_task_type="share_all")
    _reject("share_partial needs a `backbone`", multi_task_type="share_partial")
    _reject("share_none forbids `backbone`", backbone=TOWER)
    _reject(
        "backbone.affine_map", multi_task_type="share_all", backbone={**TOWER, "affine_map": {"scale": 2}}
    )


def test_exactly_one_architecture():
    _reject(r"exactly one of \[mlp_config, dcn_config", tasks={"a": {"pos_weight": 1.0}})
    _reject(
        r"got: mlp_config, dcn_config",
        tasks={"a": {**TOWER, "dcn_config": {"poly_degree": 1, "use_parallel": False}}},
    )


def test_mask_block_needs_exactly_one_size():
    block = {"output_size": 4, "aggregation_size": 8, "reduction_factor": 0.5}
    _reject("reduction_factor, aggregation_size", tasks={"a": {"mask_net_config": {"mask_blocks": [block]}}})
    block = {"output_size": 4}
    _reject("got: none", tasks={"a": {"mask_net_config": {"mask_blocks": [block]}}})


def test_dcn_parallel_keys():
    _reject(
        "use_parallel=true needs dcn_config.parallel_mlp", tasks={"a": {"dcn_config": {"poly_degree": 1}}}
    )
    dcn = {"poly_degree": 1, "use_parallel": False, "parallel_mlp": {"layer_sizes": [2]}}
    _reject("parallel_mlp is only used with use_parallel", tasks={"a": {"dcn_config": dcn}})


def test_value_checks():
    _reject("scale must be non-zero", tasks={"a": {**TOWER, "affine_map": {"scale": 0.0}}})
    _reject("pos_weight", tasks={"a": {**TOWER, "pos_weight": 0.0}})
    _reject("layer_sizes", tasks={"a": {"mlp_config": {"layer_sizes": []}}})
    _reject("rate", tasks={"a": {"mlp_config": {"layer_sizes": [1], "dropout": {"rate": 1.5}}}})
    debias = {"max_position": 3, "num_dims": 2, "position_feature_index": 0}
    _reject("drop_probability", position_debias_config={**debias, "drop_probability": 2})
    # With 0 the unknown row, the one evaluation uses, would never be trained.
    for never in (0, -0.5):
        _reject(
            "drop_probability must be > 0.*only positions dropped in training",
            position_debias_config={**debias, "drop_probability": never},
        )
    for bad in ("a/b", "a=b", ""):
        _reject(
            "stratifier name must be non-empty without", stratifiers=[{"name": bad, "index": 0, "value": 1}]
        )


def test_featurization_groups_and_removed_keys():
    _reject(
        "got: log1p_abs_config, clip_log1p_abs_config",
        featurization_config={"log1p_abs_config": {}, "clip_log1p_abs_config": {}},
    )
    _reject(
        "at most one of use_batch_norm, use_renorm",
        featurization_config={
            "z_score_log_config": {"analysis_path": "x", "use_batch_norm": True, "use_renorm": True}
        },
    )
    for removed in ("schema_path", "use_bq_stats"):
        _reject(removed, featurization_config={"z_score_log_config": {"analysis_path": "x", removed: "y"}})
    _reject("only -1", featurization_config={"double_norm_log_config": {"layer_norm_config": {"axis": 0}}})


OPT = {"sgd": {"learning_rate": 0.1}}


def test_embedding_table_keys():
    table = {"name": "t", "num_embeddings": 4, "embedding_dim": 4}
    _reject("vocab", large_embeddings={"optimizer": OPT, "tables": [{**table, "vocab": "x"}]})
    _reject("duplicate name 't'", large_embeddings={"optimizer": OPT, "tables": [table, table]})
    _reject(
        "duplicate name 'f'",
        large_embeddings={
            "optimizer": OPT,
            "tables": [{**table, "feature_names": ["f"]}, {**table, "name": "u", "feature_names": ["f"]}],
        },
    )
    _reject(
        "duplicate name 's'",
        small_embeddings={"tables": [{"name": "s", "num_embeddings": 2, "embedding_dim": 2, "index": 0}] * 2},
    )
    _reject("pooling", large_embeddings={"optimizer": OPT, "tables": [{**table, "pooling": "max"}]})
    _reject("duplicate name 'x'", stratifiers=[{"name": "x", "index": 0, "value": 1}] * 2)


def test_dlrm_placement():
    dlrm = {"dlrm_config": {"bottom_mlp": {"layer_sizes": [2]}, "top_mlp": {"layer_sizes": [1]}}}
    _reject("tasks.a.dlrm_config", multi_task_type="share_all", backbone=TOWER, tasks={"a": dlrm})
    split = {"groups": {"g": {"features": ["binary"], "layer_sizes": [2]}}}
    _reject("split_towers cannot be combined with dlrm_config", tasks={"a": dlrm}, split_towers=split)


def test_split_feature_spec():
    _reject(
        "bad feature spec 'continuous\\[3:1\\]'",
        split_towers={"groups": {"g": {"features": ["continuous[3:1]"], "layer_sizes": [2]}}},
    )
    _reject(
        "bad feature spec",
        split_towers={"groups": {"g": {"features": ["continuous[a:b]"], "layer_sizes": [2]}}},
    )


def _build_fails(match, config, widths=WIDTHS, sparse=(), rates=None):
    with pytest.raises(ValueError, match=match):
        build_model(config, dict(widths), list(sparse), rates or {})


def test_build_time_checks():
    small = {"tables": [{"name": "s", "num_embeddings": 3, "embedding_dim": 2, "index": 4}]}
    _build_fails(
        r"small_embeddings.tables\[0\].index=4 is outside the `discrete` tensor \(width 4\)",
        _config(small_embeddings=small),
    )
    _build_fails(r"stratifiers\[0\].index=9", _config(stratifiers=[{"name": "x", "index": 9, "value": 1}]))
    debias = {"max_position": 3, "num_dims": 2, "drop_probability": 0.1, "position_feature_index": 7}
    _build_fails("position_feature_index=7", _config(position_debias_config=debias))
    _build_fails(
        "'discrete' is not in the data",
        _config(position_debias_config=debias),
        widths={"continuous": 2, "binary": 1},
    )
    _build_fails(
        r"tasks.a.b: a tower must end in 1 output.*got 4",
        _config(tasks={"a.b": {"mlp_config": {"layer_sizes": [4]}}}),
    )
    _build_fails(r"unknown tasks \['c'\]", _config(), rates={"c": (1.0, 0.5)})
    _build_fails(r"must be in \(0, 1\]", _config(), rates={"a.b": (1.0, 0.0)})
    _build_fails("names collide", _config(tasks={"a.b": TOWER, "a__b": TOWER}))
    _build_fails("dense_embeddings.names: dense tensor 'nope'", _config(dense_embeddings={"names": ["nope"]}))
    large = {"optimizer": OPT, "tables": [{"name": "t", "num_embeddings": 4, "embedding_dim": 4}]}
    _build_fails(
        r"table 't': sparse features \['t'\] are not in the data",
        _config(large_embeddings=large),
        sparse=["u"],
    )
    clash = {"tables": [{"name": "binary", "num_embeddings": 3, "embedding_dim": 2, "index": 0}]}
    _build_fails(r"feature names \['binary'\] are used twice", _config(small_embeddings=clash))


def test_build_time_dlrm_checks():
    def dlrm(bottom):
        return _config(
            tasks={
                "a": {
                    "dlrm_config": {"bottom_mlp": {"layer_sizes": [bottom]}, "top_mlp": {"layer_sizes": [1]}}
                }
            }
        )

    _build_fails("needs embedding vectors", dlrm(2))
    config = dlrm(3).model_copy(
        update={
            "small_embeddings": _config(
                small_embeddings={
                    "tables": [{"name": "s", "num_embeddings": 3, "embedding_dim": 2, "index": 0}]
                }
            ).small_embeddings
        }
    )
    _build_fails(
        r"bottom_mlp.layer_sizes\[-1\]=3 must equal every embedding dim, got embedding dims \[2\]", config
    )


def test_build_time_split_checks():
    def split(*features, other=None):
        groups = {"g": {"features": list(features), "layer_sizes": [2]}}
        if other:
            groups["h"] = {"features": other, "layer_sizes": [2]}
        return _config(split_towers={"groups": groups})

    _build_fails(r"groups.g.features: unknown feature 'user'", split("user"))
    _build_fails(r"'continuous\[8:11\]' goes past the width 10", split("continuous[8:11]"))
    _build_fails(
        r"column 3 of 'continuous' is also in group 'g'", split("continuous[0:4]", other=["continuous[3:5]"])
    )


@pytest.mark.parametrize("key", ["pos_weight", "loss_weight"])
def test_a_loss_weight_on_the_backbone_is_rejected(key):
    # The backbone has no loss of its own: the key would be accepted and ignored.
    _reject(
        f"backbone.{key}: weighs a task's loss", multi_task_type="share_all", backbone={**TOWER, key: 2.0}
    )
    assert _config(multi_task_type="share_all", backbone={**TOWER, key: 1.0}).backbone is not None


def test_batch_norm_or_dropout_on_an_mlp_without_hidden_layers_is_rejected():
    single = {"mlp_config": {"layer_sizes": [1], "batch_norm": {}, "dropout": {"rate": 0.2}}}
    _reject(
        r"batch_norm and dropout: applied after hidden layers, and layer_sizes \[1\] has none",
        tasks={"t": single},
    )
    assert _config(tasks={"t": {"mlp_config": {"layer_sizes": [4, 1], "batch_norm": {}}}}).tasks["t"]


def test_large_table_dim_is_a_multiple_of_four():
    # FBGEMM's table kernels assert it deep inside sharding; the config says so first, naming the key.
    from tml.core.config.loader import ConfigError, load_config
    from tml.projects.home.recap.config import RecapConfig

    local = str(pathlib.Path(__file__).resolve().parents[4] / "projects/home/recap/config/local.yaml")
    table = "model.large_embeddings.tables=[{name: author_id, num_embeddings: 20000, embedding_dim: 6}]"
    with pytest.raises(ConfigError, match=r"large_embeddings\.tables\.0\.embedding_dim: .*multiple of 4"):
        load_config(RecapConfig, local, [table])
