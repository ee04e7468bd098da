"""CUDA checks, skipped without a GPU: the production dense model in bf16 with fused Adam, save + resume on
CUDA (fused Adam wants its `step` tensors on the GPU), pinned host memory for the batch copies.

Dense models only: they need no torchrec, so these run on a GPU box with a bare torch too.
    .venv/bin/python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import pathlib

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ROOT = pathlib.Path(__file__).resolve().parents[2]
PROD = ROOT / "projects/home/recap/config/prod.yaml"


def _prod_batches(config, batch_size: int, count: int, seed: int = 0):
    from tml.reader.batch import RecapBatch
    from tml.reader.config import dense_widths

    widths = dense_widths(config.train_data)
    tasks = len(config.model.tasks)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        dense = {name: torch.randn(batch_size, width, generator=gen) for name, width in widths.items()}
        dense["binary"] = (dense["binary"] > 0).float()
        labels = (torch.rand(batch_size, tasks, generator=gen) < 0.2).float()
        yield RecapBatch(dense=dense, labels=labels, weights=torch.ones(batch_size, tasks))


def _prod_job(save_dir: str) -> dict:
    from tml.core.config.loader import load_config
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.run import training_states
    from tml.core.state import LoopState
    from tml.core.train_loop import LoopOptions, train
    from tml.projects.home.recap import build
    from tml.projects.home.recap.config import RecapConfig
    from tml.reader.batch import RecapBatch

    config = load_config(RecapConfig, str(PROD), [f"training.save_dir={save_dir}"])
    env = init_distributed("nccl", "cuda")

    def build_run():
        from tml.core.checkpoint import Checkpointer

        torch.manual_seed(0)
        sharded = build.build_sharded(config, env)
        optimizer, scheduler = build.build_recap_optimizer(config, sharded)
        loop = LoopState()
        states = training_states(sharded, optimizer, scheduler, loop)
        return sharded, optimizer, scheduler, loop, Checkpointer(save_dir, env, states, every_n=2)

    result = {}
    sharded, optimizer, scheduler, loop, ckpt = build_run()
    result["fused"] = bool(optimizer.defaults.get("fused"))
    options = LoopOptions(num_train_steps=3, bf16=True, train_log_every_n=1, batch_type=RecapBatch)
    first = train(sharded.module, [optimizer], scheduler, _prod_batches(config, 256, 3), env, options, None,
                  ckpt, state=loop)  # fmt: skip
    result["losses"] = first.losses
    # Resume into fresh objects: the fused kernel rejects `step` tensors left on the CPU at its first step.
    sharded, optimizer, scheduler, loop, ckpt = build_run()
    result["restored"] = ckpt.restore_latest()
    result["step_devices"] = sorted({s["step"].device.type for s in optimizer.state.values()})
    options = LoopOptions(num_train_steps=5, bf16=True, train_log_every_n=1, batch_type=RecapBatch)
    resumed = train(sharded.module, [optimizer], scheduler, _prod_batches(config, 256, 2, seed=1), env,
                    options, None, ckpt, state=loop)  # fmt: skip
    result["resumed_losses"] = resumed.losses
    shutdown()
    return result


def test_production_dense_model_bf16_fused_adam_save_and_resume(run_ranks, tmp_path):
    (result,) = run_ranks(_prod_job, 1, str(tmp_path / "run"))
    assert result["fused"]
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["restored"] == 3
    assert result["step_devices"] == ["cuda"]
    assert len(result["resumed_losses"]) == 2 and all(torch.isfinite(torch.tensor(result["resumed_losses"])))


def test_pinned_batches_copy_asynchronously_and_exactly():
    from tml.core.config.loader import load_config
    from tml.core.train_loop import _pinned
    from tml.projects.home.recap.config import RecapConfig

    config = load_config(RecapConfig, str(PROD))
    (batch,) = list(_pinned(_prod_batches(config, 8, 1)))
    tensors = [*batch.dense.values(), batch.labels, batch.weights]
    assert all(t.is_pinned() for t in tensors)
    on_gpu = batch.to(torch.device("cuda"), non_blocking=True)
    torch.cuda.synchronize()
    for name, tensor in batch.dense.items():
        assert torch.equal(on_gpu.dense[name].cpu(), tensor)
