"""TrainingConfig and EmbeddingShardingConfig reject inconsistent settings."""

import pydantic
import pytest

from tml.core.config.training import EmbeddingShardingConfig, TrainingConfig

pytestmark = pytest.mark.unit


def test_training_defaults_and_errors():
    config = TrainingConfig(save_dir="runs/x", num_train_steps=10)
    assert config.mixed_precision == "auto" and config.gradient_accumulation == 1
    with pytest.raises(pydantic.ValidationError, match="nccl"):
        TrainingConfig(save_dir="x", num_train_steps=1, device="cpu", backend="nccl")
    with pytest.raises(pydantic.ValidationError, match="extra"):
        TrainingConfig(save_dir="x", num_train_steps=1, eval_timeout_in_s=5)


@pytest.mark.parametrize("steps", [0, -2])
def test_num_eval_steps_that_evaluate_nothing_are_rejected(steps):
    with pytest.raises(pydantic.ValidationError) as error:
        TrainingConfig(save_dir="x", num_train_steps=1, num_eval_steps=steps)
    [problem] = error.value.errors()
    assert problem["loc"] == ("num_eval_steps",)
    assert "use null or -1 for a full pass" in problem["msg"] and "a positive number" in problem["msg"]
    for fine in (None, -1, 1, 500):
        assert TrainingConfig(save_dir="x", num_train_steps=1, num_eval_steps=fine).num_eval_steps == fine


def test_sharding_kernel_combinations():
    assert EmbeddingShardingConfig(sharding_type="row_wise").compute_kernel is None
    with pytest.raises(pydantic.ValidationError, match="data_parallel"):
        EmbeddingShardingConfig(sharding_type="row_wise", compute_kernel="dense")
    with pytest.raises(pydantic.ValidationError, match="dense"):
        EmbeddingShardingConfig(sharding_type="data_parallel", compute_kernel="fused")


def test_run_distributed_exits_nonzero_on_error(capsys):
    from tml.core.distributed import run_distributed

    with pytest.raises(SystemExit) as exit_info:
        run_distributed(lambda: 1 / 0)
    assert exit_info.value.code == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert run_distributed(lambda: 7) == 7


@pytest.mark.parametrize(
    "mode, device, amx, expected",
    [
        ("auto", "cuda", False, True),
        ("auto", "cpu", True, True),
        ("auto", "cpu", False, False),
        ("none", "cuda", True, False),
        ("none", "cpu", True, False),
        ("bf16", "cpu", False, True),
    ],
)
def test_mixed_precision_auto_is_bf16_on_cuda_and_on_amx_cpus(monkeypatch, mode, device, amx, expected):
    import torch

    from tml.core import run
    from tml.core.distributed import DistEnv

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    env = DistEnv(0, 1, 0, torch.device(device), "gloo")
    config = TrainingConfig(save_dir="x", num_train_steps=1, mixed_precision=mode)
    assert run.use_bf16(config, env) is expected


def test_no_amx_detection_means_no_amx(monkeypatch):
    import torch

    from tml.core import run

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert run.cpu_has_amx() is False
