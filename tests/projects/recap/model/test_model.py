"""RecapModel end to end: task order, heads, loss, parameter groups, split towers, embeddings, debias, prod."""

import math

import pytest
import torch

from tml.core.config.loader import ConfigError
from tml.projects.home.recap.config.model import ModelConfig
from tml.projects.home.recap.model import (
    RecapTrainModule,
    build_loss,
    build_model,
    embedding_table_prefixes,
    parameter_groups,
)
from tml.projects.home.recap.model.heads import odds_correction
from tml.projects.home.recap.model.recap_model import sanitize
from tml.reader.batch import RecapBatch

pytestmark = pytest.mark.unit

WIDTHS = {"continuous": 5, "binary": 2, "discrete": 3}
TASKS = ["recap.engagement.is_replied", "recap.engagement.is_favorited", "recap.engagement.is_retweeted"]


def _tower(**extra):
    return {"mlp_config": {"layer_sizes": [4, 1]}, **extra}


def _batch(widths=WIDTHS, n_tasks=len(TASKS), b=6, seed=0, sparse=None):
    g = torch.Generator().manual_seed(seed)
    dense = {k: torch.randn(b, w, generator=g) for k, w in widths.items()}
    if "discrete" in widths:
        dense["discrete"] = torch.randint(0, 4, (b, widths["discrete"]), generator=g)
    labels = torch.randint(0, 2, (b, n_tasks), generator=g).float()
    return RecapBatch(dense=dense, labels=labels, weights=torch.ones(b, n_tasks), sparse=sparse)


def _model(rates=None, **overrides):
    torch.manual_seed(0)
    config = ModelConfig.model_validate({"tasks": {t: _tower() for t in TASKS}, **overrides})
    return build_model(config, WIDTHS, [], rates or {})


def _train_module(model):
    # pos_weight and loss_weight 1 for every task, as `build_loss` gives for a config that sets neither.
    tasks = {t: _tower() for t in model.task_names}
    return RecapTrainModule(model, build_loss(ModelConfig.model_validate({"tasks": tasks})))


def test_outputs_follow_config_task_order():
    model = _model()
    assert model.task_names == TASKS
    assert list(model.towers) == [sanitize(t) for t in TASKS] and "." not in "".join(model.towers)
    batch = _batch()
    out = model(batch)
    x = model.features(batch)
    for i, task in enumerate(TASKS):
        torch.testing.assert_close(out["logits"][:, i : i + 1], model.towers[sanitize(task)](x))


def test_odds_correction_formula():
    p, r = torch.tensor([0.5, 0.9, 0.0]), torch.tensor([0.1, 0.01, 0.3])
    expected = torch.tensor([0.05 / 0.55, 0.009 / (0.1 + 0.009), 0.0])
    torch.testing.assert_close(odds_correction(p, r), expected)
    # The correction multiplies the odds by r.
    q = odds_correction(torch.tensor(0.3), torch.tensor(0.2))
    assert q / (1 - q) == pytest.approx(0.2 * 0.3 / 0.7)


def test_heads_apply_affine_map_then_sigmoid_then_correction():
    rates = {TASKS[0]: (0.5, 0.05)}  # r = 0.1
    overrides = {"tasks": {TASKS[0]: _tower(affine_map={"scale": 2.0, "bias": -1.0}), TASKS[1]: _tower()}}
    torch.manual_seed(0)
    config = ModelConfig.model_validate(overrides)
    model = build_model(config, WIDTHS, [], rates)
    batch = _batch(n_tasks=2)
    out = model(batch)
    raw = model.towers[sanitize(TASKS[0])](model.features(batch))[:, 0]
    torch.testing.assert_close(out["logits"][:, 0], 2.0 * raw - 1.0)
    p = torch.sigmoid(out["logits"])
    torch.testing.assert_close(out["probabilities"][:, 0], p[:, 0] * 0.1 / (1 - p[:, 0] + 0.1 * p[:, 0]))
    torch.testing.assert_close(out["probabilities"][:, 1], p[:, 1])


def test_probabilities_undo_pos_weight_and_downsampling():
    # BCE with pos_weight w fits w times the odds; downsampling (pos 0.5, neg 0.1) multiplied them by 5.
    tasks = {"a": _tower(pos_weight=4.0), "b": _tower(pos_weight=2.0)}
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate({"tasks": tasks}), WIDTHS, [], {"a": (0.5, 0.1)})
    torch.testing.assert_close(model.heads.odds_ratios, torch.tensor([0.1 / 0.5 / 4.0, 1.0 / 2.0]))
    out = model(_batch(n_tasks=2))
    odds = torch.exp(out["logits"])  # the odds the model learned
    torch.testing.assert_close(
        out["probabilities"] / (1 - out["probabilities"]), odds * model.heads.odds_ratios
    )
    # The heads' constants come from the config, never from a checkpoint.
    assert not {"odds_ratios", "pos_weights", "loss_weights"} & set(model.state_dict())


def test_loss_weights_pos_weight_and_example_weights():
    tasks = {"a": _tower(pos_weight=3.0, loss_weight=0.5), "b": _tower()}
    torch.manual_seed(0)
    config = ModelConfig.model_validate({"tasks": tasks})
    model = build_model(config, WIDTHS, [], {})
    batch = _batch(n_tasks=2)
    batch.weights = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    loss, outputs = RecapTrainModule(model, build_loss(config))(batch)
    z, y, w = outputs["logits"][:, 0].detach(), batch.labels[:, 0], batch.weights[:, 0]
    per_example = -(3.0 * y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z)))
    expected_a = (per_example * w).sum() / w.sum()
    torch.testing.assert_close(outputs["loss/a"], expected_a)
    assert outputs["loss/b"] == 0.0  # all weights zero: no contribution, no NaN
    torch.testing.assert_close(loss.detach(), 0.5 * expected_a)
    assert set(outputs) >= {"logits", "probabilities", "labels", "weights"}


def test_train_module_rejects_label_width_mismatch():
    with pytest.raises(ValueError, match=r"do not match the model's \[B, T=3\] outputs"):
        _train_module(_model())(_batch(n_tasks=2))


@pytest.mark.parametrize("kind", ["share_all", "share_partial"])
def test_shared_backbone_and_parameter_groups(kind):
    backbone = {"mlp_config": {"layer_sizes": [8], "final_layer_activation": True}}
    model = _model(multi_task_type=kind, backbone=backbone)
    tower_in = model.towers[sanitize(TASKS[0])].in_features
    assert tower_in == (8 if kind == "share_all" else 8 + 7)
    train_module = _train_module(model)
    groups = parameter_groups(train_module)
    assert groups["backbone"] == ["model.backbone."]
    assert groups[TASKS[1]] == [f"model.towers.{sanitize(TASKS[1])}."]
    names = [n for n, _ in train_module.named_parameters()]
    owners = [[g for g, prefixes in groups.items() if any(n.startswith(p) for p in prefixes)] for n in names]
    assert all(len(o) == 1 for o in owners)
    loss, _ = train_module(_batch())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_share_none_without_parameters_outside_towers_has_no_backbone_group():
    model = _model()  # share_none, log1p featurization: only towers have parameters
    assert set(parameter_groups(model)) == set(TASKS)
    debias = {"max_position": 3, "num_dims": 2, "drop_probability": 0.5, "position_feature_index": 0}
    assert parameter_groups(_model(position_debias_config=debias))["backbone"] == ["position."]


def test_split_towers_and_group_embeddings():
    split = {
        "groups": {
            "user": {"features": ["continuous[0:2]", "binary"], "layer_sizes": [4, 3]},
            "tweet": {"features": ["continuous[3:5]"], "layer_sizes": [2]},
        }
    }
    model = _model(split_towers=split)
    batch = _batch()
    emb = model.group_embeddings(batch, groups=["user"])
    assert list(emb) == ["user"] and emb["user"].shape == (6, 3)
    features = model.features(batch)
    assert features.shape == (6, 3 + 2 + 1)  # user, tweet, ungrouped continuous[2:3]
    torch.testing.assert_close(features[:, :3], emb["user"])
    torch.testing.assert_close(
        features[:, 5],
        torch.sign(batch.dense["continuous"][:, 2]) * torch.log1p(batch.dense["continuous"][:, 2].abs()),
    )
    # The user embedding depends on the user columns only.
    other = _batch()
    other.dense["continuous"][:, 2:] += 10
    torch.testing.assert_close(model.group_embeddings(other, ["user"])["user"], emb["user"])
    with pytest.raises(KeyError, match=r"unknown split tower group\(s\) \['author'\]"):
        model.group_embeddings(batch, ["author"])
    with pytest.raises(ValueError, match="needs model.split_towers"):
        _model().group_embeddings(batch)


def test_small_embeddings_map_out_of_range_ids_to_reserved_row():
    small = {"tables": [{"name": "client", "num_embeddings": 4, "embedding_dim": 2, "index": 1}]}
    model = _model(small_embeddings=small)
    table = model.small_embeddings.embeddings["client"]
    assert table.num_embeddings == 5
    batch = _batch()
    batch.dense["discrete"][:, 1] = torch.tensor([0, 3, 4, -1, 1000, 2])
    seg = model.segments(batch)["client"]
    rows = torch.tensor([0, 3, 4, 4, 4, 2])
    torch.testing.assert_close(seg, table.weight[rows])


def test_position_debias_dropped_at_eval():
    debias = {"max_position": 3, "num_dims": 2, "drop_probability": 0.5, "position_feature_index": 0}
    model = _model(position_debias_config=debias)
    model.position.drop_probability = 0.0  # every position kept, to check the lookup row by row
    rows = model.position.embedding.weight
    batch = _batch()
    batch.dense["discrete"][:, 0] = torch.tensor([0, 1, 2, 3, -5, 1])
    torch.testing.assert_close(
        model.segments(batch)["position_debias"], rows[torch.tensor([0, 1, 2, 3, 3, 1])]
    )
    model.eval()
    torch.testing.assert_close(model.segments(batch)["position_debias"], rows[[3] * 6])
    model.train()
    model.position.drop_probability = 1.0
    torch.testing.assert_close(model.segments(batch)["position_debias"], rows[[3] * 6])


def _kjt():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # Two features x batch of 2: user_id bags [1, 2], [] ; author_id bags [3], [0, 0].
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "author_id"],
        values=torch.tensor([1, 2, 3, 0, 0]),
        lengths=torch.tensor([2, 0, 1, 2]),
    )


def test_large_embeddings_pool_bags_and_load_pretrained(tmp_path):
    pretrained = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    torch.save({"users": pretrained}, tmp_path / "snap.pt")
    large = {
        "tables": [
            {
                "name": "user",
                "num_embeddings": 10,
                "embedding_dim": 4,
                "feature_names": ["user_id"],
                "pretrained": {"embedding_snapshot_uri": str(tmp_path / "snap.pt"), "emb_name": "users"},
            },
            {
                "name": "author",
                "num_embeddings": 5,
                "embedding_dim": 8,
                "feature_names": ["author_id"],
                "pooling": "mean",
            },
        ]
    }
    torch.manual_seed(0)
    large["optimizer"] = {"sgd": {"learning_rate": 0.1}}
    config = ModelConfig.model_validate({"tasks": {"t": _tower()}, "large_embeddings": large})
    model = build_model(config, WIDTHS, ["user_id", "author_id"], {})
    segs = model.segments(_batch(n_tasks=1, b=2, sparse=_kjt()))
    torch.testing.assert_close(segs["user_id"], torch.stack([pretrained[1] + pretrained[2], torch.zeros(4)]))
    author = model.large_embeddings.ebc.embedding_bags["author"].weight
    torch.testing.assert_close(segs["author_id"], torch.stack([author[3], author[0]]))
    assert embedding_table_prefixes(model) == [
        "large_embeddings.ebc.embedding_bags.user.",
        "large_embeddings.ebc.embedding_bags.author.",
    ]
    assert "backbone" not in parameter_groups(model)  # the tables are not in any dense group
    loss, _ = RecapTrainModule(model, build_loss(config))(_batch(n_tasks=1, b=2, sparse=_kjt()))
    loss.backward()
    assert model.large_embeddings.ebc.embedding_bags["user"].weight.grad is not None

    meta = build_model(config, WIDTHS, ["user_id", "author_id"], {}, embedding_device="meta")
    assert meta.large_embeddings.ebc.embedding_bags["user"].weight.is_meta
    bad = config.model_copy(deep=True)
    bad.large_embeddings.tables[0].pretrained.emb_name = "nope"
    with pytest.raises(ConfigError, match=r"snap.pt: no tensor 'nope'"):
        build_model(bad, WIDTHS, ["user_id", "author_id"], {})


# The production heavy ranker (the original's shipped config), in the original's YAML shape.
PROD_TASKS = [
    "recap.engagement.is_favorited",
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied",
    "recap.engagement.is_good_clicked_convo_desc_v2",
    "recap.engagement.is_negative_feedback_v2",
    "recap.engagement.is_profile_clicked_and_profile_engaged",
    "recap.engagement.is_replied",
    "recap.engagement.is_replied_reply_engaged_by_author",
    "recap.engagement.is_report_tweet_clicked",
    "recap.engagement.is_retweeted",
    "recap.engagement.is_video_playback_50",
]
TWHIN = ["user_follow_embedding", "user_engagement_embedding", "author_follow_embedding"]


def _prod_tower(task):
    mlp = {"layer_sizes": [256, 128, 1], "batch_norm": {"affine": False, "momentum": 0.1}}
    if "negative_feedback" in task:
        mlp["dropout"] = {"rate": 0.1}
    if "report" in task:
        mlp["dropout"] = {"rate": 0.2}
    return {"mlp_config": mlp}


PROD = {
    "multi_task_type": "share_all",
    "featurization_config": {
        "double_norm_log_config": {
            "batch_norm_config": {"affine": True, "momentum": 0.01},
            "clip_magnitude": 5.0,
            "layer_norm_config": {"epsilon": 0.0, "axis": -1, "center": True, "scale": True},
        },
        "feature_names_to_concat": ["binary"],
    },
    "dense_embeddings": {"names": TWHIN, "layer_norm": True},
    "backbone": {
        "mask_net_config": {
            "use_parallel": True,
            "mask_blocks": [{"aggregation_size": 1024, "output_size": 1024, "input_layer_norm": False}] * 4,
            "mlp": {"layer_sizes": [2048], "final_layer_activation": True},
        }
    },
    "tasks": {task: _prod_tower(task) for task in PROD_TASKS},
}


def test_production_model_parameter_count_and_step():
    config = ModelConfig.model_validate(PROD)
    widths = {"continuous": 2117, "binary": 59, "discrete": 320, **dict.fromkeys(TWHIN, 200)}
    model = build_model(config, widths, [], {t: (1.0, 0.01) for t in PROD_TASKS})
    c, b, v, agg, out, hidden = 2117, 59, 200, 1024, 1024, 2048
    batch_norm = 2 * c  # the featurizer's affine BatchNorm: weight + bias per continuous feature
    block_ln = 2 * (c + b)  # LayerNorm weight + bias over [continuous, binary]
    twhin_ln = 3 * 2 * v
    i = c + b + 3 * v  # backbone input width: 2776
    mask_block = (i * agg + agg) + (agg * i + i) + (i * out + out) + 2 * out  # mask, projection, hidden, LN
    backbone = 4 * mask_block + (4 * out * hidden + hidden)
    tower = (hidden * 256 + 256) + (256 * 128 + 128) + (128 * 1 + 1)  # tower BatchNorms have no affine
    expected = batch_norm + block_ln + twhin_ln + backbone + 10 * tower
    assert expected == 48_115_108
    assert sum(p.numel() for p in model.parameters()) == expected
    dropouts = {
        t: [m.p for m in model.towers[sanitize(t)].modules() if isinstance(m, torch.nn.Dropout)]
        for t in PROD_TASKS
    }
    assert dropouts["recap.engagement.is_negative_feedback_v2"] == [0.1, 0.1]
    assert dropouts["recap.engagement.is_report_tweet_clicked"] == [0.2, 0.2]
    assert dropouts["recap.engagement.is_favorited"] == []

    batch = _batch(widths, n_tasks=10, b=8)
    batch.dense["continuous"][0, 0] = math.nan
    loss, outputs = RecapTrainModule(model, build_loss(config))(batch)
    loss.backward()
    assert torch.isfinite(loss) and outputs["probabilities"].shape == (8, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # r = 0.01: calibrated probabilities are far below the training-distribution sigmoid.
    assert (outputs["probabilities"] < torch.sigmoid(outputs["logits"])).all()


def test_prod_yaml_is_the_production_model():
    # So the count derived above is prod.yaml's (tml-recap summary prints it: tests/projects/recap/test_main.py).
    import pathlib

    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig

    prod = pathlib.Path(__file__).resolve().parents[4] / "projects/home/recap/config/prod.yaml"
    shipped = load_config(RecapConfig, str(prod), env={}).model
    assert shipped.model_dump() == ModelConfig.model_validate(PROD).model_dump()


def test_dense_only_model_does_not_import_torchrec():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from tml.projects.home.recap.config.model import ModelConfig\n"
        "from tml.projects.home.recap.model import build_model\n"
        "c = ModelConfig.model_validate({'tasks': {'t': {'mlp_config': {'layer_sizes': [1]}}}})\n"
        "build_model(c, {'continuous': 2, 'binary': 1}, [], {})\n"
        "assert 'torchrec' not in sys.modules, 'torchrec imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
