"""Every shipped TwHIN config trains through TorchRec's train pipelines exactly as through the eager loop:
TrainPipelineSparseDist (it fx-traces TwhinTrainModule and TwhinModel to find the tables' input, which
must be `batch.lookups` itself) and TrainPipelineBase, on 1 and 2 gloo ranks, step-for-step equal losses.

Configs are shrunk (tables to 64 rows, dims to 8, batches of 16) and read tiny synthetic edges written in
their own schema (string keys and a vocabulary where the config has one); one launch per world size runs
all of them. The one-rank launch also plans prod.yaml with a 500M-row user table on the meta device.
"""

from __future__ import annotations

import copy
import math
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG_DIR = ROOT / "projects/twhin/config"
CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
STEPS = 3
BATCH = 16

pytestmark = pytest.mark.distributed


def _shrink(node, key: str | None = None):
    if isinstance(node, dict):
        return {k: _shrink(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_shrink(item) for item in node]
    if isinstance(node, bool) or not isinstance(node, int):
        return node
    if key == "num_embeddings":
        return min(node, 64)
    if key == "embedding_dim":
        return min(node, 8)
    if key in ("global_batch_size", "in_batch_negatives", "global_negatives"):
        return min(node, BATCH if key == "global_batch_size" else 4)
    if key in ("limit", "offset"):
        return None if key == "limit" else 0
    return node


def tiny_config(name: str, folder: str):
    """`name` shrunk, reading edges (and a vocabulary) written under `folder` in its own schema."""
    from tml.core.config.loader import load_config
    from tml.projects.twhin.config import TwhinConfig
    from tml.projects.twhin.data.synthetic import generate_splits
    from tml.projects.twhin.data.vocab import build_vocabularies

    env = {"TML_DATA": "/unused/data", "TML_RUNS": "/unused/runs"}
    config = load_config(TwhinConfig, str(CONFIG_DIR / name), env=env)
    config = TwhinConfig.model_validate(_shrink(config.model_dump(mode="json")))
    data = pathlib.Path(folder) / name.replace("/", "_")
    tables = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    relations = [(r.name, r.lhs, r.rhs) for r in config.model.relations]
    keys = config.train_data.vocabulary is not None
    if not data.exists():  # rank 0 and rank 1 write the same files; the first one wins
        generate_splits(tables, relations, {"train": 400}, str(data), num_files=2, string_keys=keys)
        if keys:
            build_vocabularies([str(data / "train")], relations, tables, str(data / "vocab"))
    config.train_data.inputs = str(data / "train")
    config.train_data.vocabulary = str(data / "vocab") if keys else None
    config.validation_data = {}
    return config


def _train(config, env, pipeline: str) -> tuple[list[float], list[bool]]:
    import threading

    from torchrec.distributed.types import ShardedModule

    from tml.core.train_loop import LoopOptions, train
    from tml.projects.twhin import build
    from tml.projects.twhin.data.batch import TwhinBatch

    torch.manual_seed(0)
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_twhin_optimizer(config, sharded)
    data = build.build_train_data(config, env, build.build_vocabularies(config))
    options = LoopOptions(
        num_train_steps=STEPS, train_log_every_n=1, pipeline=pipeline, batch_type=TwhinBatch
    )
    kept = _KeepIterators(data)
    result = train(sharded.module, [optimizer], scheduler, kept, env, options)
    # With its iterator still referenced (as a pipeline may keep it), train() itself stopped the reader.
    readers = [t.name for t in threading.enumerate() if t.name == "tml-reader-driver" and t.is_alive()]
    assert kept.iterators and not readers, f"{pipeline}: reader threads running after train(): {readers}"
    pipelined = [bool(m.is_pipelined) for m in sharded.module.modules() if isinstance(m, ShardedModule)]
    return result.losses, pipelined


class _KeepIterators:
    """`batches`, keeping a reference to every iterator handed out."""

    def __init__(self, batches) -> None:
        self.batches, self.iterators = batches, []

    def __iter__(self):
        self.iterators.append(iter(self.batches))
        return self.iterators[-1]


def _run_all(folder: str) -> dict:
    from tml.core.distributed import init_distributed

    env = init_distributed("gloo", "cpu")
    if env.rank == 0:
        configs = [tiny_config(name, folder) for name in CONFIGS]
    torch.distributed.barrier()  # the data exists before rank 1 reads it
    configs = [tiny_config(name, folder) for name in CONFIGS]
    results = {
        name: {kind: _train(config, env, kind) for kind in ("eager", "base", "sparse_dist")}
        for name, config in zip(CONFIGS, configs, strict=True)
    }
    # Shares the one-rank launch (a launch costs seconds of torchrec import).
    huge = _huge_tables_plan_on_meta(env) if env.world_size == 1 else None
    return results, huge


def _huge_tables_plan_on_meta(env) -> dict:
    """prod.yaml with a 500M-row user table (8 GB in fp32) plans and shards on the meta device of one rank (the
    dense part is wrapped in DDP on several, which a meta tensor cannot be)."""
    import resource

    from tml.core.config.loader import load_config
    from tml.core.sharding import shard_model
    from tml.core.tables import local_pieces
    from tml.optimizers.build import embedding_optimizer
    from tml.projects.twhin import build
    from tml.projects.twhin.config import TwhinConfig

    config = load_config(
        TwhinConfig,
        str(CONFIG_DIR / "prod.yaml"),
        env={},
    )
    config.model.embeddings.tables[0].num_embeddings = 500_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tables = config.model.embeddings.tables
    sharded = shard_model(
        build.build_model(config, device="meta"),
        env,
        {"user": ("row_wise", None), "tweet": ("table_wise", None)},
        {t.name: embedding_optimizer(t.optimizer) for t in tables},
        device=torch.device("meta"),
        memory_bytes=2**40,
    )
    weight = sharded.module.state_dict()["model.ebc.embedding_bags.user.weight"]
    shards = [tuple(piece.shape) for _, piece in local_pieces(weight)]
    return {
        "shape": tuple(weight.shape),
        "shards": shards,
        "grown_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }


def _check(results: dict) -> None:
    assert set(results) == set(CONFIGS)
    for name, runs in results.items():
        eager, _ = runs["eager"]
        assert len(eager) == STEPS and all(math.isfinite(v) for v in eager), (name, eager)
        for kind in ("base", "sparse_dist"):
            losses, pipelined = runs[kind]
            torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-6, msg=f"{name}: {kind} vs eager")
        _, pipelined = runs["sparse_dist"]
        assert pipelined and all(pipelined), f"{name}: the table collection was not pipelined"


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_config_pipelined_equals_eager(run_ranks, tmp_path, world_size):
    for results, huge in run_ranks(_run_all, world_size, str(tmp_path)):
        _check(copy.deepcopy(results))
        if world_size == 1:  # and prod.yaml with a 500M-row table plans and shards without allocating it
            assert huge["shape"] == (500_000_000, 4) and huge["shards"] == [(500_000_000, 4)]
            assert huge["grown_mib"] < 512  # the table alone would be 8 GB
