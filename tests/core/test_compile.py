"""training.compile: the dense parts are compiled in place (names unchanged), train to the eager losses through
every pipeline on 2 ranks, and a compiled run's checkpoint resumes exactly and loads into an eager model."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from tml.core.config.base import BaseConfig

_spec = importlib.util.spec_from_file_location(
    "tiny_model", pathlib.Path(__file__).with_name("tiny_model.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        x = self.norm(x)
        return torch.cat([tower(x) for tower in self.towers.values()], dim=1)


@pytest.mark.unit
def test_the_dense_parts_are_compiled_in_place_under_their_own_names():
    from tml.core.compile import compile_dense

    model = tiny.make_model()  # an EmbeddingBagCollection and an MLP
    keys = list(model.state_dict())
    assert compile_dense(model) == ["mlp"]
    assert list(model.state_dict()) == keys and not any("_orig_mod" in key for key in keys)
    assert model.mlp._compiled_call_impl is not None and model.ebc._compiled_call_impl is None

    dense = _Towers()
    assert compile_dense(dense) == [""]  # no table: the whole model

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = tiny.make_model().ebc
            self.heads = _Towers().towers  # a ModuleDict is never called: its members are compiled

    assert compile_dense(WithTable()) == ["heads.a", "heads.b"]


class _Config(BaseConfig):
    """What a project's config holds for `fit`: the training section and a model section."""

    training: dict
    model: dict


def _fit(env, folder: str, name: str, compile: str, pipeline: str, steps: int, dropout: float = 0.0):
    from tml.core.config.training import TrainingConfig
    from tml.core.run import TrainJob, fit
    from tml.reader.batch import RecapBatch

    sharded, optimizer, scheduler = tiny.build_training(env, dropout=dropout)
    training = TrainingConfig(
        save_dir=f"{folder}/{name}",
        num_train_steps=steps,
        checkpoint_every_n=3,
        compile=compile,
        pipeline=pipeline,
    )
    config = _Config(training=training.model_dump(), model={"dropout": dropout})
    job = TrainJob(config, training, sharded, optimizer, scheduler, tiny.RankStream(env, 50), RecapBatch)
    losses = fit(job, env).losses
    compiled = [n for n, m in sharded.module.named_modules() if getattr(m, "_compiled_call_impl", None)]
    return losses, compiled


def _compile_job(folder: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    from tml.core.distributed import init_distributed, shutdown

    env = init_distributed("gloo", "cpu")
    out = {"eager": _fit(env, folder, "eager", "none", "eager", 6)}
    for pipeline in ("eager", "base", "sparse_dist"):
        out[f"compiled/{pipeline}"] = _fit(env, folder, f"compiled-{pipeline}", "dense", pipeline, 6)
    # With dropout: compiled kernels draw their masks from torch's generator, restored on resume.
    out["whole"] = _fit(env, folder, "whole", "dense", "eager", 6, dropout=0.25)
    _fit(env, folder, "parts", "dense", "eager", 3, dropout=0.25)
    out["resumed"] = _fit(env, folder, "parts", "dense", "eager", 6, dropout=0.25)
    out["keys"] = sorted(
        FileSystemReader(f"{folder}/parts/checkpoints/step-6").read_metadata().state_dict_metadata
    )
    out["eager_from_compiled"] = _fit(env, folder, "parts", "none", "eager", 7, dropout=0.25)
    shutdown()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_compiled_training_equals_eager_and_resumes(run_ranks, tmp_path):
    for result in run_ranks(_compile_job, 2, str(tmp_path), timeout=900):
        eager, uncompiled = result["eager"]
        assert uncompiled == []
        for pipeline in ("eager", "base", "sparse_dist"):
            losses, compiled = result[f"compiled/{pipeline}"]
            assert [name.rsplit(".", 1)[-1] for name in compiled] == ["mlp"]  # inside DMP and DDP
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-4, atol=1e-6)
        resumed, whole = result["resumed"][0], result["whole"][0]
        assert len(resumed) == 3
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole[3:]), rtol=0, atol=0)
        assert not any("_orig_mod" in key for key in result["keys"])
        assert any(key.startswith("model.mlp.") for key in result["keys"])
        assert len(result["eager_from_compiled"][0]) == 1
