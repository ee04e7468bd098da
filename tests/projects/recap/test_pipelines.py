"""Every shipped and example recap config trains through TorchRec's train pipelines exactly as through the
eager loop: TrainPipelineSparseDist (and TrainPipelineBase) for models with TorchRec tables, TrainPipelineBase
for dense-only ones, on 1 and 2 gloo ranks, step-for-step equal losses.

TrainPipelineSparseDist fx-traces every forward that holds a sharded table (RecapTrainModule, RecapModel,
LargeEmbeddings); a config whose model cannot be traced fails here, and so does one whose table is not
pipelined (its input must be `batch.sparse` itself). Configs are shrunk (widths, table and layer sizes) so
each trains in well under a second; one launch per world size runs all of them.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG_DIR = ROOT / "projects/home/recap/config"
CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
ENV = {"TML_DATA": "/unused/data", "TML_RUNS": "/unused/runs"}
STEPS = 3
BATCH = 16
BF16_CONFIG = "local.yaml"  # also trained under bf16 autocast, eager and TrainPipelineSparseDist

pytestmark = pytest.mark.distributed


def _shrink(node, key: str | None = None):
    """The same config at toy size: every width, table and layer at most a few units."""
    if isinstance(node, dict):
        return {k: _shrink(v, k) for k, v in node.items()}
    if isinstance(node, list):
        if key == "layer_sizes":
            # A tower's final 1 (its logit) and DLRM's bottom width (= the embedding dim) must stay.
            return [min(size, 8) for size in node]
        return [_shrink(item) for item in node]
    if isinstance(node, bool) or not isinstance(node, int):
        return node
    if key in ("aggregation_size", "output_size", "projection_dim"):
        return min(node, 8)
    if key == "length":
        return min(node, 16)
    if key in ("continuous_feature_truncation", "binary_feature_truncation"):
        return min(node, 12)
    if key in ("num_embeddings", "num_buckets"):
        return min(node, 64)
    if key == "global_batch_size":
        return BATCH
    return node


def tiny_boundaries(config, path: str) -> None:
    """A boundaries file for `config`'s discretizer: every feature cut at -1, 0 and 1 (ids 0 and 1 of a
    sparse continuous feature only; the others have one bin)."""
    from tml.projects.home.recap.model.discretizer import (
        FORMAT,
        VERSION,
        discretized_inputs,
        write_boundaries,
    )
    from tml.projects.home.recap.model.sparse_linear import calibration_settings

    d = config.model.discretizer
    inputs = discretized_inputs(d.features, config.train_data)
    keys = [k for i in inputs for k in (i.keys if i.keys is not None else [f"{i.name}:0", f"{i.name}:1"])]
    cut = {"levels": [1, 2, 3], "boundaries": [-1.0, 0.0, 1.0], "count": 100}
    document = {"format": FORMAT, "version": VERSION, "calibration": calibration_settings(d),
                "inputs": [i.describe() for i in inputs], "features": dict.fromkeys(keys, cut)}  # fmt: skip
    write_boundaries(path, document)


def tiny_config(name: str, stats_dir: str):
    """`name` (relative to the config folder) shrunk, with z-score stats and discretizer boundaries
    written for its widths."""
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.model.stats import ContinuousStats, save_stats
    from tml.reader.config import dense_widths

    config = load_config(RecapConfig, str(CONFIG_DIR / name), env=ENV)
    config = RecapConfig.model_validate(_shrink(config.model_dump(mode="json")))
    z = config.model.featurization_config.z_score_log_config
    if z is not None:
        width = dense_widths(config.train_data)["continuous"]
        path = str(pathlib.Path(stats_dir) / (name.replace("/", "_") + ".json"))
        save_stats(ContinuousStats([0.5] * width, [2.0] * width, [100] * width), path)
        z.analysis_path = path
    if config.model.discretizer is not None:
        path = str(pathlib.Path(stats_dir) / (name.replace("/", "_") + ".boundaries.json"))
        tiny_boundaries(config, path)
        config.model.discretizer.boundaries_path = path
    return config


def random_batches(config, rank: int, world_size: int, steps: int):
    """`steps` RecapBatches of this rank's share, in the train_data schema (ids within num_buckets)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from tml.reader.batch import RecapBatch, SparseValues
    from tml.reader.schema import resolve_dense_specs

    data = config.train_data
    rows = data.global_batch_size // world_size
    tasks = len(config.model.tasks)
    g = torch.Generator().manual_seed(1000 * rank + 7)
    for _ in range(steps):
        dense = {}
        for spec in resolve_dense_specs(data):
            if spec.dtype == "int64":
                dense[spec.name] = torch.randint(0, 12, (rows, spec.width), generator=g)
            else:
                dense[spec.name] = torch.randn(rows, spec.width, generator=g) * 3.0
        sparse = None
        if data.sparse_features:
            lengths = torch.randint(0, 3, (len(data.sparse_features) * rows,), generator=g)
            values = torch.cat(
                [
                    torch.randint(
                        0, f.num_buckets, (int(lengths[i * rows : (i + 1) * rows].sum()),), generator=g
                    )
                    for i, f in enumerate(data.sparse_features)
                ]
            )
            sparse = KeyedJaggedTensor.from_lengths_sync(
                keys=[f.name for f in data.sparse_features], values=values, lengths=lengths
            )
        continuous = {}
        for f in data.sparse_continuous_features:
            lengths = torch.randint(0, 4, (rows,), generator=g)
            n = int(lengths.sum())
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            ids = torch.randint(0, f.num_buckets, (n,), generator=g)
            continuous[f.name] = SparseValues(ids, torch.randn(n, generator=g) * 10.0, offsets)
        labels = (torch.rand(rows, tasks, generator=g) < 0.3).float()
        weights = torch.rand(rows, tasks, generator=g) + 0.5
        yield RecapBatch(
            dense=dense, labels=labels, weights=weights, sparse=sparse, sparse_continuous=continuous
        )


def _train(config, env, pipeline: str, bf16: bool = False) -> tuple[list[float], list[bool]]:
    """Step losses of STEPS steps, and for each sharded table module whether the pipeline took it over."""
    from torchrec.distributed.types import ShardedModule

    from tml.core.train_loop import LoopOptions, train
    from tml.projects.home.recap import build
    from tml.reader.batch import RecapBatch

    torch.manual_seed(0)
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_recap_optimizer(config, sharded)
    torch.manual_seed(1)  # dropout and position drops draw the same numbers in every run
    result = train(
        sharded.module,
        [optimizer, *sharded.table_optimizers.values()],
        scheduler,
        random_batches(config, env.rank, env.world_size, STEPS),
        env,
        LoopOptions(
            num_train_steps=STEPS, train_log_every_n=1, pipeline=pipeline, batch_type=RecapBatch, bf16=bf16
        ),
    )
    pipelined = [bool(m.is_pipelined) for m in sharded.module.modules() if isinstance(m, ShardedModule)]
    return result.losses, pipelined


def _run_all(stats_dir: str) -> dict:
    from tml.core.distributed import init_distributed

    env = init_distributed("gloo", "cpu")
    # Each rank writes its own stats and boundaries files: ranks writing one path race (a rank read a
    # file another was rewriting).
    stats_dir = os.path.join(stats_dir, f"rank{env.rank}")
    os.makedirs(stats_dir, exist_ok=True)
    results = {}
    for name in CONFIGS:
        config = tiny_config(name, stats_dir)
        has_tables = config.model.large_embeddings is not None
        runs = {kind: _train(config, env, kind) for kind in ["eager", "base"]}
        if has_tables:
            runs["sparse_dist"] = _train(config, env, "sparse_dist")
        results[name] = {"has_tables": has_tables, **runs}
    # bf16 autocast, what `training.mixed_precision: auto` picks on CUDA and on CPUs with AMX, through the
    # pipeline a GPU run takes, whether or not this CPU has AMX.
    config = tiny_config(BF16_CONFIG, stats_dir)
    results["bf16"] = {kind: _train(config, env, kind, bf16=True) for kind in ["eager", "sparse_dist"]}
    return results


def _check(results: dict) -> None:
    bf16 = results.pop("bf16")
    eager, _ = bf16["eager"]
    losses, pipelined = bf16["sparse_dist"]
    assert len(eager) == STEPS and all(math.isfinite(v) for v in eager), eager
    torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-6, msg="bf16: sparse_dist vs eager")
    assert pipelined and all(pipelined), "bf16: a sharded table was not pipelined"
    assert eager != results[BF16_CONFIG]["eager"][0], "bf16: the same losses as fp32 (no autocast?)"
    assert set(results) == set(CONFIGS)
    for name, runs in results.items():
        eager, _ = runs["eager"]
        assert len(eager) == STEPS and all(math.isfinite(v) for v in eager), (name, eager)
        kinds = ["base", "sparse_dist"] if runs["has_tables"] else ["base"]
        for kind in kinds:
            losses, pipelined = runs[kind]
            torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-6, msg=f"{name}: {kind} vs eager")
            if kind == "sparse_dist":
                assert pipelined and all(pipelined), f"{name}: a sharded table was not pipelined"


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_config_pipelined_equals_eager(run_ranks, tmp_path, world_size):
    per_rank = run_ranks(_run_all, world_size, str(tmp_path))
    for results in per_rank:
        _check(copy.deepcopy(results))
