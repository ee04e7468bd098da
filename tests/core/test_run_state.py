"""What a GPU run depends on, checked on CPU: optimizer state lands where the optimizer expects it after a
resume, tables far larger than memory plan and shard on the meta device, ranks draw different random
masks, and a run folder must be a local path."""

from __future__ import annotations

import importlib.util
import pathlib
import resource

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "tiny_model", pathlib.Path(__file__).with_name("tiny_model.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

# a: fused row-wise Adagrad, b: fused SGD, c: Adam (no fused CPU kernel: a replicated table with an
# ordinary torch optimizer); the dense part: fused torch Adam.
TABLES = ("a", "b", "c")
ADAM_C = {"c": {"adam": {"learning_rate": 0.1}}}


def _tensor_kinds(sharded, optimizer) -> dict[str, tuple[str, torch.dtype]]:
    """(device type, dtype) of every optimizer state tensor: dense, table and fused optimizers."""
    from tml.core.tables import local_pieces

    kinds = {}
    optimizers = {"dense": optimizer, **{f"table/{k}": v for k, v in sharded.table_optimizers.items()}}
    for label, opt in optimizers.items():
        for index, state in enumerate(opt.state.values()):
            for name, value in state.items():
                if torch.is_tensor(value):
                    kinds[f"{label}/{index}/{name}"] = (value.device.type, value.dtype)
    fused = sharded.fused_optimizer.state_dict()["state"]
    for param, state in fused.items():
        for name, value in state.items():
            for _, local in local_pieces(value):
                kinds[f"fused/{param}/{name}"] = (local.device.type, local.dtype)
    return kinds


def _state_job(save_dir: str) -> dict:
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    result = {}
    # A run that trains 2 steps and saves; a fresh optimizer after one step is the reference.
    sharded, optimizer, scheduler = tiny.build_training(env, tables=TABLES, table_optimizers=ADAM_C)
    ckpt, loop = tiny.checkpointer(save_dir, env, sharded, optimizer, scheduler, 2)
    train(sharded.module, [optimizer, *sharded.table_optimizers.values()], scheduler,
          tiny.rank_batches(env, 0, 10), env, LoopOptions(num_train_steps=2), None, ckpt, state=loop)  # fmt: skip
    result["fresh"] = _tensor_kinds(sharded, optimizer)
    # A new process's worth of objects: restore, then compare before any step could fix things up.
    sharded, optimizer, scheduler = tiny.build_training(env, tables=TABLES, table_optimizers=ADAM_C)
    ckpt, loop = tiny.checkpointer(save_dir, env, sharded, optimizer, scheduler, 2)
    result["restored_step"] = ckpt.restore_latest()
    result["restored"] = _tensor_kinds(sharded, optimizer)
    result["table_optimizers"] = sorted(sharded.table_optimizers)
    result["huge"] = _huge_table(env)
    shutdown()
    return result


def _huge_table(env) -> dict:
    """A 2^31 x 128 table (1 TiB in fp32) planned and sharded on the meta device: nothing is allocated."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from tml.core.sharding import TableOptimizer, shard_model
    from tml.core.tables import local_pieces

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=2**31, feature_names=["f"])
            self.ebc = EmbeddingBagCollection(tables=[table], device=torch.device("meta"))
            self.linear = torch.nn.Linear(128, 1)

        def forward(self, kjt):
            return self.linear(self.ebc(kjt).values())

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shapes = {}
    for sharding in ("row_wise", "table_wise"):
        sharded = shard_model(
            Model(),
            env,
            {"t": (sharding, None)},
            {"t": TableOptimizer(torch.optim.SGD, {"lr": 0.1})},
            device=torch.device("meta"),
            memory_bytes=2**42,
        )
        weight = sharded.module.state_dict()["ebc.embedding_bags.t.weight"]
        shapes[sharding] = (tuple(weight.shape), [piece.device.type for _, piece in local_pieces(weight)])
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"shapes": shapes, "grown_mib": grown_kib / 1024}


@pytest.mark.distributed
def test_resumed_optimizer_state_and_huge_tables(run_ranks, tmp_path):
    (result,) = run_ranks(_state_job, 1, str(tmp_path / "run"))
    assert result["restored_step"] == 2
    assert result["table_optimizers"] == ["c"]
    fresh, restored = result["fresh"], result["restored"]
    assert {k.split("/")[0] for k in fresh} == {"dense", "table", "fused"}
    assert restored == fresh  # every state tensor: same device and dtype as the optimizer's own
    for sharding in ("row_wise", "table_wise"):
        assert result["huge"]["shapes"][sharding] == ((2**31, 128), ["meta"])
    assert result["huge"]["grown_mib"] < 512  # a shard of it on the CPU would be 1 TiB


@pytest.mark.unit
def test_ranks_draw_different_masks_from_one_seed():
    from tml.core.distributed import DistEnv, seed_ranks

    def masks(rank: int) -> torch.Tensor:
        env = DistEnv(rank, 2, rank, torch.device("cpu"), "gloo")
        with torch.random.fork_rng(devices=[]):
            seed_ranks(7, env)
            return torch.nn.functional.dropout(torch.ones(1000), 0.5)

    assert not torch.equal(masks(0), masks(1))
    assert torch.equal(masks(1), masks(1))


@pytest.mark.unit
def test_remote_save_dir_is_refused():
    from tml.core.config.loader import ConfigError
    from tml.core.run import check_save_dir

    check_save_dir("/tmp/runs/x")
    with pytest.raises(ConfigError, match="training.save_dir 's3://bucket/run'.*mount"):
        check_save_dir("s3://bucket/run")


def _profile_job(save_dir: str) -> dict:
    import json

    from tml.core.distributed import init_distributed, shutdown
    from tml.core.profiling import StepProfiler
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    sharded, optimizer, scheduler = tiny.build_training(env)
    profiler = StepProfiler(2, 2, f"{save_dir}/profile", env.rank)
    options = LoopOptions(num_train_steps=5, profiler=profiler)
    train(sharded.module, [optimizer], scheduler, tiny.rank_batches(env, 0, 10), env, options)
    traces = sorted(pathlib.Path(save_dir, "profile", f"rank{env.rank}").glob("*.pt.trace.json"))
    events = json.loads(traces[0].read_text())["traceEvents"] if traces else []
    names = [e.get("name") for e in events]
    shutdown()
    return {
        "files": len(traces),
        "ranges": {n: names.count(n) for n in ("data_wait", "forward", "backward", "optimizer")},
    }


@pytest.mark.distributed
def test_profile_writes_a_trace_of_the_asked_steps(run_ranks, tmp_path):
    results = run_ranks(_profile_job, 2, str(tmp_path))
    for result in results:
        assert result["files"] == 1
        # Two steps traced: one forward, backward and optimizer range each; data waits at least as many.
        assert result["ranges"]["forward"] == 2 and result["ranges"]["backward"] == 2
        assert result["ranges"]["optimizer"] == 2 and result["ranges"]["data_wait"] >= 2
