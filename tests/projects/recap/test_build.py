"""build_recap_optimizer: the backbone group exists exactly when the model has parameters outside the towers
and tables, and every schedule the config sets is used; build_metrics: segments from model.stratifiers."""

import pathlib

import pytest
import torch

from tml.core.config.loader import ConfigError, load_config
from tml.core.sharding import ShardedModel
from tml.projects.home.recap.build import build_metrics, build_recap_optimizer, build_train_module
from tml.projects.home.recap.config import RecapConfig

pytestmark = pytest.mark.unit
EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "projects/home/recap/config/examples"
LR = "{constant: 0.5}"


def _optimizer(name: str, *overrides: str):
    config = load_config(RecapConfig, str(EXAMPLES / name), list(overrides), env={})
    module = build_train_module(config)
    optimizer, scheduler = build_recap_optimizer(config, ShardedModel(module))
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.parameters()}, "every parameter in exactly one group"
    return optimizer, scheduler


def test_share_none_towers_only_trains_every_parameter_with_its_tower_schedule():
    optimizer, scheduler = _optimizer("model_mlp.yaml")  # share_none, log1p: no backbone parameters
    names = [group["name"] for group in optimizer.param_groups]
    assert names == ["recap.engagement.is_favorited", "recap.engagement.is_replied"]
    scheduler.step()  # step 1 of each tower's 50-step ramp
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 / 50, 0.005 / 50])


def test_a_backbone_schedule_without_backbone_parameters_is_rejected():
    with pytest.raises(
        ConfigError, match="backbone_learning_rate is set, but the model has no parameters outside"
    ):
        _optimizer("model_mlp.yaml", f"optimizer.multi_task_learning_rates.backbone_learning_rate={LR}")


def test_backbone_parameters_need_a_backbone_schedule():
    optimizer, _ = _optimizer("model_masknet.yaml")
    assert [g["name"] for g in optimizer.param_groups][0] == "backbone"
    with pytest.raises(
        ConfigError,
        match=r"backbone_learning_rate is unset, but .*\(featurizer\., dense_vectors\., backbone\.\)",
    ):
        _optimizer("model_masknet.yaml", "optimizer.multi_task_learning_rates.backbone_learning_rate=null")


def test_single_schedule_trains_everything():
    optimizer, scheduler = _optimizer(
        "model_mlp.yaml",
        "optimizer.multi_task_learning_rates=null",
        f"optimizer.single_task_learning_rate={LR}",
    )
    assert [g["name"] for g in optimizer.param_groups] == ["default"]
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_build_metrics_has_one_segment_per_stratifier():
    config = load_config(RecapConfig, str(EXAMPLES / "model_embeddings.yaml"), env={})
    metrics = build_metrics(config, torch.device("cpu"))
    assert metrics.segment_names == ["client_web=2"]
    assert metrics.segment_masks is not None


def test_optimizer_clip_grad_norm_clips_every_dense_gradient_at_step():
    # optimizer.clip_grad_norm has one home: the dense optimizer clips before each of its steps.
    optimizer, _ = _optimizer("model_mlp.yaml", "optimizer.clip_grad_norm=0.25")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.cat([p.grad.flatten() for p in params]).norm().item() == pytest.approx(0.25, rel=1e-4)
