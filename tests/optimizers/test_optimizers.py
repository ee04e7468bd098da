"""Schedules match their formulas; configs validate; parameter groups match exactly one prefix."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from tml.optimizers.build import build_optimizer
from tml.optimizers.config import LearningRate, OptimizerConfig
from tml.optimizers.schedules import learning_rate_at

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"constant": 0.3}, {0: 0.3, 7: 0.3}),
        (
            {
                "piecewise_constant": {
                    "learning_rate_boundaries": [2, 5],
                    "learning_rate_values": [1.0, 0.5, 0.1],
                }
            },
            {0: 1.0, 1: 1.0, 2: 0.5, 4: 0.5, 5: 0.1, 100: 0.1},
        ),
        (
            {"linear_ramp_to_constant": {"learning_rate": 0.2, "num_ramp_steps": 4}},
            {0: 0.0, 1: 0.05, 4: 0.2, 9: 0.2},
        ),
        (
            {
                "linear_ramp_to_cosine": {
                    "learning_rate": 1.0,
                    "final_learning_rate": 0.1,
                    "num_ramp_steps": 2,
                    "final_num_steps": 6,
                }
            },
            {
                0: 0.0,
                1: 0.5,
                2: 1.0,
                3: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                4: 0.55,
                6: 0.1,
                50: 0.1,
            },
        ),
    ],
)
def test_schedules_match_formula(schedule, expected):
    lr = LearningRate(**schedule)
    for step, value in expected.items():
        assert learning_rate_at(lr, step) == pytest.approx(value)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"piecewise_constant": {"learning_rate_boundaries": [2], "learning_rate_values": [1.0]}}, "len"),
        (
            {"piecewise_constant": {"learning_rate_boundaries": [3, 2], "learning_rate_values": [1, 2, 3]}},
            "increasing",
        ),
        (
            {"constant": 0.1, "linear_ramp_to_constant": {"learning_rate": 1, "num_ramp_steps": 1}},
            "exactly one",
        ),
        ({}, "exactly one"),
    ],
)
def test_bad_schedules_rejected(schedule, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        LearningRate(**schedule)


def _model():
    return torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "towers": torch.nn.Linear(2, 1)})


def test_groups_get_their_own_schedule():
    config = OptimizerConfig(adam={}, learning_rate={"constant": 9.0})
    ramp = LearningRate(linear_ramp_to_constant={"learning_rate": 0.4, "num_ramp_steps": 2})
    groups = {"backbone": (["backbone"], LearningRate(constant=0.1)), "towers": (["towers"], ramp)}
    optimizer, scheduler = build_optimizer(_model().named_parameters(), config, groups)
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "towers"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.0])
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2])


def test_group_matching_errors():
    config = OptimizerConfig(sgd={}, learning_rate={"constant": 0.1})
    lr = LearningRate(constant=0.1)
    with pytest.raises(ValueError, match="'towers.weight' matches no group"):
        build_optimizer(_model().named_parameters(), config, {"b": (["backbone"], lr)})
    with pytest.raises(ValueError, match="'backbone.weight' matches several groups"):
        build_optimizer(_model().named_parameters(), config, {"b": (["backbone"], lr), "all": ([""], lr)})


def test_in_backward_parameters_skipped_and_algorithms():
    model = _model()
    model.towers.weight._in_backward_optimizers = []  # the marker torch/torchrec put on fused params
    config = OptimizerConfig(adagrad={}, learning_rate={"constant": 0.1})
    optimizer, _ = build_optimizer(model.named_parameters(), config)
    params = optimizer.param_groups[0]["params"]
    assert isinstance(optimizer, torch.optim.Adagrad) and len(params) == 3
    assert all(p is not model.towers.weight for p in params)
    adamw, _ = build_optimizer(
        model.named_parameters(), OptimizerConfig(adam={"weight_decay": 0.1}, learning_rate={"constant": 1})
    )
    assert isinstance(adamw, torch.optim.AdamW)


@pytest.mark.parametrize("algorithm", [{"adam": {}}, {"sgd": {"momentum": 0.9}}, {"adagrad": {}}])
def test_fused_kernel_on_cpu_matches_the_reference_loop(algorithm):
    # The builder picks torch's fused kernel: it must be picked, and step like the per-parameter loop.
    config = OptimizerConfig(**algorithm, learning_rate={"constant": 0.01})
    fast_model, slow_model = _model(), _model()
    slow_model.load_state_dict(fast_model.state_dict())
    fast, _ = build_optimizer(fast_model.named_parameters(), config)
    assert fast.defaults["fused"] is True
    slow = type(fast)(slow_model.parameters(), **{**fast.defaults, "fused": False, "lr": 0.01})
    for model, optimizer in ((fast_model, fast), (slow_model, slow)):
        for group in optimizer.param_groups:
            group["lr"] = 0.01
        for seed in range(3):
            inputs = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed))
            optimizer.zero_grad()
            sum(m(inputs).square().sum() for m in (model.backbone, model.towers)).backward()
            optimizer.step()
    for fast_param, slow_param in zip(fast_model.parameters(), slow_model.parameters(), strict=True):
        torch.testing.assert_close(fast_param, slow_param)


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        ({"constant": -0.1}, "constant"),
        (
            {"piecewise_constant": {"learning_rate_boundaries": [3], "learning_rate_values": [0.1, -0.1]}},
            "piecewise_constant.learning_rate_values.1",
        ),
        (
            {"linear_ramp_to_constant": {"learning_rate": -1e-3, "num_ramp_steps": 10}},
            "linear_ramp_to_constant.learning_rate",
        ),
        (
            {
                "linear_ramp_to_cosine": {
                    "learning_rate": 0.1,
                    "final_learning_rate": -0.01,
                    "num_ramp_steps": 1,
                    "final_num_steps": 5,
                }
            },
            "linear_ramp_to_cosine.final_learning_rate",
        ),
    ],
)
def test_a_negative_learning_rate_is_rejected_naming_its_key(schedule, key):
    with pytest.raises(pydantic.ValidationError) as error:
        LearningRate(**schedule)
    [problem] = error.value.errors()
    assert ".".join(str(part) for part in problem["loc"]) == key
    assert "greater than or equal to 0" in problem["msg"]
    assert LearningRate(constant=0.0).constant == 0.0  # a frozen group is fine


def test_clip_grad_norm_is_applied_by_the_optimizer_itself():
    # Every caller that steps the optimizer gets the clipping the config asks for, loop or not.
    model = _model()
    config = OptimizerConfig(sgd={}, learning_rate={"constant": 1.0}, clip_grad_norm=0.5)
    optimizer, _ = build_optimizer(model.named_parameters(), config)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    optimizer.step()
    steps = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    assert steps.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr 1: the step is the clipped gradient
    assert torch.allclose(steps, steps[0].expand_as(steps))  # one global norm: the direction is kept
