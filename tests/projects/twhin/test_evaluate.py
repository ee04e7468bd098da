"""Filtered ranking: the evaluator's ranks, metrics and random baseline equal a brute-force reference."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.core.distributed import DistEnv
from tml.projects.twhin import build
from tml.projects.twhin.config import TwhinConfig
from tml.projects.twhin.evaluate import KS, LinkEvaluator, random_expectations

pytestmark = pytest.mark.unit

ROWS = {"user": 23, "tweet": 17}
RELATIONS = [("fav", "user", "tweet", "translation"), ("follow", "user", "user", "complex_diagonal"),
             ("by", "tweet", "user", "none"), ("reply", "user", "tweet", "diagonal")]  # fmt: skip


def config_for(tmp_path, comparator: str, chunk: int) -> TwhinConfig:
    sgd = {"sgd": {"learning_rate": 0.1}}
    return TwhinConfig.model_validate(
        {
            "training": {"save_dir": str(tmp_path / "run"), "num_train_steps": 1},
            "model": {
                "embeddings": {
                    "tables": [
                        {"name": n, "num_embeddings": r, "embedding_dim": 8, "optimizer": sgd}
                        for n, r in ROWS.items()
                    ]
                },
                "relations": [{"name": n, "lhs": a, "rhs": b, "operator": o} for n, a, b, o in RELATIONS],
                "comparator": comparator,
                "translation_optimizer": {"sgd": {}, "learning_rate": {"constant": 0.1}},
            },
            "train_data": {"inputs": str(tmp_path / "train"), "global_batch_size": 8},
            "validation_data": {"valid": {"inputs": str(tmp_path / "valid"), "global_batch_size": 6}},
            "evaluation": {"candidate_chunk_size": chunk},
        }
    )


def write_edges(folder, count: int, seed: int, files: int = 2) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    edges = []
    for _ in range(count):
        r = int(torch.randint(0, len(RELATIONS), (1,), generator=g))
        _, lhs, rhs, _ = RELATIONS[r]
        # Few ids, so that many queries share known edges (the filter has work to do).
        edges.append(
            (
                int(torch.randint(0, min(ROWS[lhs], 6), (1,), generator=g)),
                r,
                int(torch.randint(0, ROWS[rhs], (1,), generator=g)),
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-count // files)
    for f in range(files):
        part = edges[f * per : (f + 1) * per]
        pq.write_table(
            pa.table({k: [e[i] for e in part] for i, k in enumerate(("lhs", "rel", "rhs"))}),
            folder / f"p{f}.parquet",
        )
    return edges


def random_model(config: TwhinConfig, seed: int):
    torch.manual_seed(seed)
    module = build.build_model(config)
    with torch.no_grad():
        for table in module.model.ebc.embedding_bags.values():
            table.weight.normal_()
        module.model.relations.vectors.normal_()
    return module


def brute_force(config, module, train, valid) -> dict[str, float]:
    model = module.model
    tables = {n: model.ebc.embedding_bags[n].weight.detach() for n in ROWS}
    known = set(train) | set(valid)
    ranks = {}  # (relation, side) -> [ranks]; candidates likewise
    counts = {}
    for lhs, r, rhs in valid:
        _, lt, rt, _ = RELATIONS[r]
        rel = torch.tensor([r])
        true = model.score(tables[lt][lhs : lhs + 1], rel, tables[rt][rhs : rhs + 1])[0]
        for side, table, truth in (("rhs", rt, rhs), ("lhs", lt, lhs)):
            rows = tables[table]
            if side == "rhs":
                scores = model.score(tables[lt][lhs].expand(len(rows), -1), rel.expand(len(rows)), rows)
                keep = [c for c in range(len(rows)) if c != truth and (lhs, r, c) not in known]
            else:
                scores = model.score(rows, rel.expand(len(rows)), tables[rt][rhs].expand(len(rows), -1))
                keep = [c for c in range(len(rows)) if c != truth and (c, r, rhs) not in known]
            s = scores[keep]
            rank = 1 + float((s > true).sum()) + 0.5 * float((s == true).sum())
            ranks.setdefault((RELATIONS[r][0], side), []).append(rank)
            counts.setdefault((RELATIONS[r][0], side), []).append(len(keep) + 1)
    out = {}
    for scope in ["all", *(r[0] for r in RELATIONS)]:
        for side in (None, "rhs", "lhs"):
            chosen = [
                k for k in ranks if (scope == "all" or k[0] == scope) and (side is None or k[1] == side)
            ]
            r = torch.tensor([x for k in chosen for x in ranks[k]], dtype=torch.float64)
            n = torch.tensor([x for k in chosen for x in counts[k]], dtype=torch.float64)
            prefix = "eval/valid/" + (f"side={side}/" if side else "") + scope
            out[f"{prefix}/mrr"] = float((1 / r).mean()) if len(r) else math.nan
            for k in KS:
                out[f"{prefix}/hits_at_{k}"] = float((r <= k).double().mean()) if len(r) else math.nan
                out[f"{prefix}/random_hits_at_{k}"] = (
                    float(torch.clamp(k / n, max=1).mean()) if len(r) else math.nan
                )
            harmonic = torch.tensor(
                [sum(1 / i for i in range(1, int(m) + 1)) for m in n], dtype=torch.float64
            )
            out[f"{prefix}/random_mrr"] = float((harmonic / n).mean()) if len(r) else math.nan
            out[f"{prefix}/candidates"] = float(n.mean()) if len(r) else math.nan
            out[f"{prefix}/count"] = float(len(r))
    return out


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize(("comparator", "chunk"), [("dot", 5), ("cos", 64)])
def test_filtered_ranks_match_brute_force(tmp_path, comparator, chunk):
    train = write_edges(tmp_path / "train", 150, seed=1)
    valid = write_edges(tmp_path / "valid", 40, seed=2, files=3)
    config = config_for(tmp_path, comparator, chunk)
    module = random_model(config, seed=3)
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    evaluator = LinkEvaluator(config, env)
    _close(evaluator(module, 0), brute_force(config, module, train, valid))
    # A second evaluation reuses the known edges, not the vectors: new weights give new, right results.
    with torch.no_grad():
        module.model.ebc.embedding_bags["tweet"].weight.mul_(-1.5)
    _close(evaluator(module, 1), brute_force(config, module, train, valid))


def test_random_baseline_formula():
    got = random_expectations(torch.tensor([1, 2, 4]))
    torch.testing.assert_close(
        got["random_mrr"], torch.tensor([1.0, 0.75, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4], dtype=torch.float64)
    )
    torch.testing.assert_close(got["random_hits_at_3"], torch.tensor([1.0, 1.0, 0.75], dtype=torch.float64))


def build_model_like(config: TwhinConfig, weights: dict[str, torch.Tensor], relations: torch.Tensor):
    """An unsharded train module holding the given table weights and relation vectors."""
    module = build.build_model(config)
    with torch.no_grad():
        for name, weight in weights.items():
            module.model.ebc.embedding_bags[name].weight.copy_(weight)
        module.model.relations.vectors.copy_(relations)
    return module
