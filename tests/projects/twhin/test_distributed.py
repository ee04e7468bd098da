"""TwHIN on 2 gloo ranks, one launch for every check:
- sharded training (user row-wise, tweet table-wise) equals the unsharded model trained on the same
  per-rank batches, negatives included;
- a run killed after a checkpoint and resumed equals the uninterrupted run (atol 0), through run.fit;
- the 2-rank filtered ranking (uneven shares, chunked candidate slices) equals the 1-rank one;
- the 2-rank export holds every row of every table, as the loader reads it back.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "twhin_eval", pathlib.Path(__file__).with_name("test_evaluate.py")
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

pytestmark = pytest.mark.distributed
STEPS, LR = 4, 0.3


def _config(folder: str, **training):
    config = reference.config_for(pathlib.Path(folder), "dot", chunk=5)
    tables = config.model.embeddings.tables
    tables[0].sharding = {"sharding_type": "row_wise"}
    tables[1].sharding = {"sharding_type": "table_wise"}
    for table in tables:
        table.optimizer = {"sgd": {"learning_rate": LR}}
    config.model.translation_optimizer = {"sgd": {}, "learning_rate": {"constant": LR}}
    config.train_data.global_batch_size = 16
    config.train_data.in_batch_negatives = 3
    config.train_data.global_negatives = 2
    config.train_data.shuffle.buffer_size = 32
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def _rank_streams(config):
    """Both ranks' TwhinBatches, built in any process (readers need no process group)."""
    from tml.core.distributed import DistEnv
    from tml.projects.twhin import build

    envs = [DistEnv(r, 2, r, torch.device("cpu"), "gloo") for r in range(2)]
    return [iter(build.build_train_data(config, env)) for env in envs]


def _sharded_equals_unsharded(config, env) -> dict:
    from tml.core.tables import gather_full_table
    from tml.projects.twhin import build

    torch.manual_seed(0)
    sharded = build.build_sharded(config, env)
    optimizer, _ = build.build_twhin_optimizer(config, sharded)
    plain = build.build_model(config)
    names = config.table_names()
    with torch.no_grad():
        for name in names:
            plain.model.ebc.embedding_bags[name].weight.copy_(gather_full_table(sharded.module, name))
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    mine, both = _rank_streams(config)[env.rank], _rank_streams(config)
    losses, reference_losses = [], []
    for _ in range(STEPS):
        loss, _ = sharded.module(next(mine))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / 2)
        # The unsharded model on the two ranks' batches: the mean of their losses, one SGD step.
        plain_loss = sum(plain(next(stream))[0] for stream in both) / 2
        plain_optimizer.zero_grad()
        plain_loss.backward()
        plain_optimizer.step()
        reference_losses.append(plain_loss.item())
    relations = build.unwrap(sharded.module).model.relations.vectors.detach().clone()
    return {
        "losses": (losses, reference_losses),
        "relations": (relations, plain.model.relations.vectors.detach().clone()),
        "tables": {
            n: (
                gather_full_table(sharded.module, n),
                plain.model.ebc.embedding_bags[n].weight.detach().clone(),
            )
            for n in names
        },
    }


class _Killed(Exception):
    pass


class _DiesAfter:
    """The training stream, dying (like a killed job) when batch `after` is fetched."""

    def __init__(self, data, after: int | None) -> None:
        self.data, self.after = data, after

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i == self.after:
                raise _Killed
            yield batch

    def state_dict(self, batches=None):
        return self.data.state_dict(batches)

    def load_state_dict(self, state, all_states=None):
        self.data.load_state_dict(state, all_states)


def _fit(config, env, steps: int, save_dir: str, die_after: int | None = None):
    from tml.core import run
    from tml.core.tables import gather_full_table
    from tml.projects.twhin import build
    from tml.projects.twhin.data.batch import TwhinBatch

    config = config.model_copy(deep=True)
    config.training.save_dir, config.training.num_train_steps = save_dir, steps
    torch.manual_seed(config.training.seed)  # what run.start does
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_twhin_optimizer(config, sharded)
    data = _DiesAfter(build.build_train_data(config, env), die_after)
    job = run.TrainJob(config, config.training, sharded, optimizer, scheduler, data, TwhinBatch)
    try:
        losses = run.fit(job, env).losses
    except _Killed:
        return None, None, None
    weights = {n: gather_full_table(sharded.module, n) for n in config.table_names()}
    weights["relations"] = build.unwrap(sharded.module).model.relations.vectors.detach().clone()
    return losses, weights, sharded


def _resume_is_exact(config, env, folder: str) -> dict:
    """Checkpoints every 3 steps; one run dies fetching batch 6 (after the step-3 save, with batches
    prefetched past it), a second resumes from step 3; both must end where an uninterrupted run ends."""
    config = config.model_copy(deep=True)
    config.training.checkpoint_every_n = 3
    uninterrupted, full, _ = _fit(config, env, 2 * STEPS, f"{folder}/whole")
    _fit(config, env, 2 * STEPS, f"{folder}/parts", die_after=6)
    resumed_losses, resumed, sharded = _fit(config, env, 2 * STEPS, f"{folder}/parts")
    return {"losses": (uninterrupted[3:], resumed_losses), "weights": (full, resumed), "sharded": sharded}


def _two_ranks(folder: str) -> dict:
    from tml.core.distributed import init_distributed
    from tml.core.tables import gather_full_table
    from tml.projects.twhin import build
    from tml.projects.twhin.evaluate import LinkEvaluator
    from tml.projects.twhin.export import write_export

    env = init_distributed("gloo", "cpu")
    config = _config(folder, checkpoint_every_n=STEPS, train_log_every_n=1)
    out = {"sharded": _sharded_equals_unsharded(config, env)}
    resume = _resume_is_exact(config, env, folder)
    sharded = resume.pop("sharded")
    out["resume"] = resume
    out["eval"] = LinkEvaluator(config, env)(sharded.module, 0)
    write_export(config, sharded.module, env, 8, f"{folder}/export", overwrite=False)
    out["weights"] = {n: gather_full_table(sharded.module, n) for n in config.table_names()}
    out["relations"] = build.unwrap(sharded.module).model.relations.vectors.detach().clone()
    return out


def test_two_ranks(run_ranks, tmp_path):
    reference.write_edges(tmp_path / "train", 300, seed=1, files=3)
    reference.write_edges(tmp_path / "valid", 47, seed=2, files=3)  # uneven rank shares
    results = run_ranks(_two_ranks, 2, str(tmp_path))
    for result in results:
        sharded, plain = result["sharded"]["losses"]
        assert len(sharded) == STEPS and sharded[0] != sharded[-1]
        torch.testing.assert_close(sharded, plain, rtol=1e-5, atol=1e-6)
        for got, want in [result["sharded"]["relations"], *result["sharded"]["tables"].values()]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        uninterrupted, resumed = result["resume"]["losses"]
        assert uninterrupted == resumed and len(resumed) == 2 * STEPS - 3
        full, again = result["resume"]["weights"]
        assert all(torch.equal(full[k], again[k]) for k in full)
    # Both ranks report the same metrics; they equal one process ranking with the same weights.
    assert results[0]["eval"] == results[1]["eval"]
    config = _config(str(tmp_path))
    module = reference.build_model_like(config, results[0]["weights"], results[0]["relations"])
    from tml.core.distributed import DistEnv
    from tml.projects.twhin.evaluate import LinkEvaluator

    single = LinkEvaluator(config, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))(module, 0)
    for key, value in single.items():
        got = results[0]["eval"][key]
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-9), key
    assert single["eval/valid/all/count"] == 2 * 47
    # The export: every row of both tables, from both ranks' parts.
    from tml.projects.twhin.embeddings import load

    emb = load(str(tmp_path / "export"))
    assert sorted(p.name for p in (tmp_path / "export/user").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    for name, weight in results[0]["weights"].items():
        torch.testing.assert_close(emb.vectors(name), weight.float(), rtol=0, atol=0)
    vectors = [r["vector"] for r in emb.manifest["relations"]]
    assert vectors[2] is None and torch.allclose(torch.tensor(vectors[0]), results[0]["relations"][0])
