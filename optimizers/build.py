"""Turn optimizer configs into torch optimizers and LR schedulers.

`build_optimizer` covers the dense parameters: one parameter group per named prefix group, each with its
own `LearningRate` schedule (a `LambdaLR` with one lambda per group; group lrs are set to 1.0 so the lambda's
value *is* the learning rate). Parameters owned by fused in-backward table optimizers are skipped. With
`clip_grad_norm` the optimizer clips its parameters' gradients (one global L2 norm over every group) at the
start of each `step()`, so whoever steps it gets the clipping the config asks for.
`embedding_optimizer` maps an `EmbeddingOptimizerConfig` to the flat `TableOptimizer` the core's sharding takes.

Example:
    optimizer, scheduler = build_optimizer(
        model.named_parameters(), config,
        groups={"backbone": (["backbone"], lr_a), "towers": (["towers"], lr_b)},
    )
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tml.core.config.base import which_one
from tml.core.sharding import TableOptimizer, is_in_backward
from tml.optimizers.config import EmbeddingOptimizerConfig, LearningRate, OptimizerConfig
from tml.optimizers.schedules import learning_rate_at

DEFAULT_GROUP = "default"


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _group_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    groups: dict[str, tuple[list[str], LearningRate]] | None,
    default: LearningRate,
) -> list[tuple[str, LearningRate, list[torch.Tensor]]]:
    params = [(n, p) for n, p in named_parameters if p.requires_grad and not is_in_backward(p)]
    if not groups:
        return [(DEFAULT_GROUP, default, [p for _, p in params])]
    members: dict[str, list[torch.Tensor]] = {group: [] for group in groups}
    for name, param in params:
        hits = [g for g, (prefixes, _) in groups.items() if any(_matches(name, p) for p in prefixes)]
        if len(hits) != 1:
            what = "no group" if not hits else f"several groups ({', '.join(hits)})"
            listed = {g: prefixes for g, (prefixes, _) in groups.items()}
            raise ValueError(f"parameter '{name}' matches {what}; group prefixes: {listed}")
        members[hits[0]].append(param)
    empty = [g for g, ps in members.items() if not ps]
    if empty:
        raise ValueError(f"optimizer groups {empty} match no parameter; check their module-name prefixes")
    return [(g, groups[g][1], members[g]) for g in groups]


def build_optimizer(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    config: OptimizerConfig,
    groups: dict[str, tuple[list[str], LearningRate]] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Build the dense optimizer and its per-group LR scheduler.

    Args:
        named_parameters: (name, parameter) pairs, e.g. `model.named_parameters()`.
        config: algorithm, default schedule and clipping (done by the optimizer, before each step).
        groups: group name -> (module-name prefixes, schedule); every trainable parameter must match
            exactly one group. None: one group "default" with `config.learning_rate`.

    Returns:
        (optimizer, scheduler); each param group carries its `name`. Call `scheduler.step()` after
        every `optimizer.step()`.
    """
    grouped = _group_parameters(named_parameters, groups, config.learning_rate)
    param_groups = [{"params": params, "name": name, "lr": 1.0} for name, _, params in grouped]
    kind, algo = which_one(config, OptimizerConfig.exactly_one_of[0])
    params = [p for group in param_groups for p in group["params"]]
    if kind == "adam":
        cls = torch.optim.AdamW if algo.weight_decay > 0 else torch.optim.Adam
        optimizer = cls(
            param_groups,
            lr=1.0,
            betas=(algo.beta_1, algo.beta_2),
            eps=algo.epsilon,
            weight_decay=algo.weight_decay,
            **_implementation(params, fused_devices=("cpu", "cuda")),
        )
    elif kind == "sgd":
        optimizer = torch.optim.SGD(
            param_groups,
            lr=1.0,
            momentum=algo.momentum,
            weight_decay=algo.weight_decay,
            **_implementation(params, fused_devices=("cpu", "cuda")),
        )
    else:
        optimizer = torch.optim.Adagrad(
            param_groups,
            lr=1.0,
            eps=algo.epsilon,
            initial_accumulator_value=algo.initial_accumulator_value,
            weight_decay=algo.weight_decay,
            **_implementation(params, fused_devices=("cpu",)),
        )
    if config.clip_grad_norm is not None:
        _clip_before_each_step(optimizer, config.clip_grad_norm)
    lambdas = [(lambda step, s=schedule: learning_rate_at(s, step)) for _, schedule, _ in grouped]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambdas)
    return optimizer, scheduler


def _clip_before_each_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(_optimizer, _args, _kwargs) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    optimizer.register_step_pre_hook(clip)


def embedding_optimizer(config: EmbeddingOptimizerConfig) -> TableOptimizer:
    """The table optimizer as (class, torch kwargs); the same pair drives the fused kernel and the ordinary
    fallback optimizer (torchrec maps the class to the FBGEMM algorithm)."""
    kind, algo = which_one(config, EmbeddingOptimizerConfig.exactly_one_of[0])
    if kind == "sgd":
        return TableOptimizer(torch.optim.SGD, {"lr": algo.learning_rate})
    if kind == "adagrad":
        return TableOptimizer(torch.optim.Adagrad, {"lr": algo.learning_rate, "eps": algo.epsilon})
    if kind == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return TableOptimizer(RowWiseAdagrad, {"lr": algo.learning_rate, "eps": algo.epsilon})
    return TableOptimizer(torch.optim.Adam, {"lr": algo.learning_rate, "eps": algo.epsilon})


def _implementation(params: list[torch.Tensor], fused_devices: tuple[str, ...]) -> dict[str, bool]:
    """torch's fused kernel (one kernel over all parameters) where it exists for these parameters'
    device and dtype, else the multi-tensor one; torch's default on CPU is a per-parameter Python loop,
    which costs ~15% of a small model's step."""
    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    if params and floats and len(devices) == 1 and devices <= set(fused_devices):
        return {"fused": True}
    return {"foreach": True} if params and floats else {}
