"""Sharded (2 ranks: one table table-wise, one row-wise) equals the unsharded model on 1 process."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "tiny_model", pathlib.Path(__file__).with_name("tiny_model.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

LR, STEPS, GLOBAL_B = 0.5, 4, 8


def _reference_losses() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch on one process: SGD over every parameter, full global batches."""
    model = tiny.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        loss, _ = model(tiny.make_batch(step, GLOBAL_B))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = {name: model.ebc.embedding_bags[name].weight.detach().clone() for name in ("a", "b")}
    return losses, {"mlp": model.mlp[0].weight.detach().clone(), **weights}


def _sharded_run() -> dict:
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.sharding import shard_model
    from tml.core.tables import gather_full_table, load_full_table
    from tml.optimizers.build import build_optimizer, embedding_optimizer
    from tml.optimizers.config import EmbeddingOptimizerConfig, OptimizerConfig

    env = init_distributed("gloo", "cpu")
    reference = tiny.make_model()
    sgd = embedding_optimizer(EmbeddingOptimizerConfig(sgd={"learning_rate": LR}))
    sharded = shard_model(
        tiny.make_model(),
        env,
        {"a": ("table_wise", "fused"), "b": ("row_wise", None)},
        {"a": sgd, "b": sgd},
    )
    for name in ("a", "b"):
        load_full_table(sharded.module, name, reference.ebc.embedding_bags[name].weight.detach())
    config = OptimizerConfig(sgd={}, learning_rate={"constant": LR})
    optimizer, _ = build_optimizer(sharded.dense_named_parameters(), config)
    share = GLOBAL_B // env.world_size
    losses = []
    for step in range(STEPS):
        batch = tiny.slice_batch(tiny.make_batch(step, GLOBAL_B), env.rank * share, (env.rank + 1) * share)
        loss, _ = sharded.module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss)
        losses.append(global_loss.item() / env.world_size)
    mlp = dict(sharded.module.named_parameters())
    mlp_weight = next(v for k, v in mlp.items() if k.endswith("mlp.0.weight")).detach().clone()
    result = {"losses": losses, "mlp": mlp_weight}
    result.update({name: gather_full_table(sharded.module, name) for name in ("a", "b")})
    result["pipelines"] = {kind: _loop_losses(env, kind) for kind in ("eager", "base", "sparse_dist")}
    result.update(_uneven_data(env))
    shutdown()
    return result


def _loop_losses(env, pipeline: str) -> list[float]:
    from tml.core.train_loop import LoopOptions, train
    from tml.reader.batch import RecapBatch

    sharded, optimizer, scheduler = tiny.build_training(
        env, shardings={"a": ("table_wise", None)}, accumulation=2, clip_grad_norm=1.0
    )
    options = LoopOptions(
        num_train_steps=5, gradient_accumulation=2, pipeline=pipeline, batch_type=RecapBatch
    )
    result = train(sharded.module, [optimizer], scheduler, tiny.rank_batches(env, 0, 100), env, options)
    assert result.batches_trained == 10
    return result.losses


def _uneven_data(env) -> dict:
    """Rank 0 has more batches than rank 1: training stops together, evaluation covers every batch."""
    from tml.core.eval_loop import evaluate
    from tml.core.train_loop import LoopOptions, train

    sharded, optimizer, scheduler = tiny.build_training(env)
    mine = 5 if env.rank == 0 else 3
    trained = train(
        sharded.module,
        [optimizer],
        scheduler,
        tiny.rank_batches(env, 0, mine),
        env,
        LoopOptions(num_train_steps=10),
    )
    eval_share = 3 if env.rank == 0 else 1
    results = evaluate(
        sharded.module, tiny.rank_batches(env, 50, 50 + eval_share), tiny.CountMetrics(), None, env
    )
    limited = evaluate(
        sharded.module, tiny.rank_batches(env, 50, 50 + eval_share), tiny.CountMetrics(), 2, env
    )
    return {"uneven_steps": trained.step, "eval": results, "eval_limited": limited, "nan": _nan_error(env)}


def _nan_error(env) -> str:
    from tml.core.train_loop import LoopOptions, NonFiniteLossError, train

    sharded, optimizer, scheduler = tiny.build_training(env)

    def poisoned():
        for i, batch in enumerate(tiny.rank_batches(env, 0, 10)):
            if i == 2 and env.rank == 1:
                batch.dense["continuous"][0, 0] = float("nan")
            yield batch

    try:
        train(sharded.module, [optimizer], scheduler, poisoned(), env, LoopOptions(num_train_steps=5))
    except NonFiniteLossError as error:
        return str(error)
    return "no error"


@pytest.mark.distributed
def test_two_ranks_match_unsharded(run_ranks):
    losses, weights = _reference_losses()
    results = run_ranks(_sharded_run, 2)
    for result in results:
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for name, expected in weights.items():
            torch.testing.assert_close(result[name], expected, rtol=1e-5, atol=1e-6)
        # The pipelines wrap the same step: identical losses, and the losses move.
        eager = torch.tensor(result["pipelines"]["eager"])
        assert len(eager) == 5 and eager.std() > 0
        for kind in ("base", "sparse_dist"):
            torch.testing.assert_close(torch.tensor(result["pipelines"][kind]), eager, rtol=1e-6, atol=1e-7)
        assert result["uneven_steps"] == 3
        assert result["eval"]["examples"] == (3 + 1) * 4
        assert result["eval_limited"]["examples"] == (2 + 1) * 4
        assert "NaN/inf at step 3" in result["nan"] and "last good checkpoint: none" in result["nan"]
