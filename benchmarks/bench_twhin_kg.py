"""TwHIN vs PyKEEN on PyKEEN's bundled Nations and UMLS knowledge graphs: filtered MRR / Hits@10 and edges/s.

TwHIN `translation` is compared with PyKEEN's TransE and TwHIN `diagonal` with PyKEEN's DistMult (the same
score function: sum_k h_k r_k t_k), at the same embedding dim, negatives per positive, epochs and batch
size, trained one after the other in this run, each with a small grid of its own optimizer's learning rate
and two losses of its own (the same number of points), chosen by filtered validation MRR; the chosen point
is reported on the test split. Both sides use one thread (the box is shared).

- TwHIN runs as a user runs it: PyKEEN's triples written as Parquet with string keys, a config derived from
  projects/twhin/config/examples/nations.yaml (one entity table, one relation entry per relation), then
  `tml-twhin build-vocab`, `tml-twhin train` and `tml-twhin export` as subprocesses.
- PyKEEN: its TransE / DistMult with their default options, trained by its `SLCWATrainingLoop` with its
  `BasicNegativeSampler` (2K negatives per positive, half heads, half tails: TwHIN draws K per side with
  `negative_sides: both`).
- Negatives: TwHIN's uniform `global_negatives` (Nations / UMLS batches hold 2-3 edges of each relation,
  too few for in-batch negatives); PyKEEN's uniform corruption. Neither filters out true triples.
- Evaluation: one shared evaluator in this file ranks both models' test triples, both sides, against every
  entity, filtered with train + valid + test; ties count half (the rank 1 + #higher + #tied / 2, PyKEEN's
  "realistic" rank). TwHIN is scored from its export (vectors, relation vectors and operators from
  manifest.json, combined by tml's own operator code), PyKEEN with its model's `score_t` / `score_h`. As a
  check, each side's own evaluator is printed beside it (TwHIN's `eval/test/all/mrr` from training's final
  evaluation, PyKEEN's RankBasedEvaluator).
- Edges/s: positive training edges per second, after the first tenth of training (TwHIN: its
  `train/examples_per_s` log windows after the first; PyKEEN: epoch end times).

Needs PyKEEN (not a dependency of tml), installed without letting pip touch torch:
    echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')" > /tmp/torch.txt
    .venv/bin/pip install -c /tmp/torch.txt pykeen==1.11.1
Run:
    .venv/bin/python benchmarks/bench_twhin_kg.py [--datasets nations umls] [--dim 32] [--epochs 100]
Write a data set's triples as TwHIN edge files (train/ valid/ test/; used by config/examples/nations.yaml):
    .venv/bin/python benchmarks/bench_twhin_kg.py --write-edges nations data/nations
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "projects/twhin/config/examples/nations.yaml")
SPLITS = ("train", "valid", "test")
INSTALL = (
    "PyKEEN is not installed. Install it without replacing torch:\n"
    "  echo \"torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')\" > /tmp/torch.txt\n"
    "  .venv/bin/pip install -c /tmp/torch.txt pykeen==1.11.1"
)
# TwHIN operator -> the PyKEEN model with that kind of score.
PEERS = {"translation": "TransE", "diagonal": "DistMult"}


def dataset_dir(name: str) -> str:
    """The folder of PyKEEN's bundled triples (found without importing pykeen)."""
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(INSTALL)
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", name)
    if not all(os.path.exists(os.path.join(folder, f"{split}.txt")) for split in SPLITS):
        sys.exit(f"{folder}: no {'/'.join(SPLITS)}.txt (PyKEEN {name!r} data set)")
    return folder


def read_triples(name: str) -> dict[str, np.ndarray]:
    """split -> [n, 3] object array of (head, relation, tail) labels."""
    folder = dataset_dir(name)
    out = {}
    for split in SPLITS:
        with open(os.path.join(folder, f"{split}.txt")) as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        out[split] = np.array(rows, dtype=object)
    return out


def write_edges(triples: dict[str, np.ndarray], output: str) -> None:
    """`<output>/<split>/part-00000.parquet` with string columns lhs, rel, rhs."""
    for split, rows in triples.items():
        folder = os.path.join(output, split)
        os.makedirs(folder, exist_ok=True)
        columns = {
            name: pa.array(rows[:, i].tolist(), pa.string()) for i, name in enumerate(("lhs", "rel", "rhs"))
        }
        pq.write_table(pa.table(columns), os.path.join(folder, "part-00000.parquet"))


# --------------------------------------------------------------------------- the shared evaluator


class Graph:
    """Integer triples over one entity / relation numbering (sorted labels) and the filter set."""

    def __init__(self, triples: dict[str, np.ndarray]) -> None:
        every = np.concatenate(list(triples.values()))
        self.entities = sorted(set(every[:, 0]) | set(every[:, 2]))
        self.relations = sorted(set(every[:, 1]))
        entity = {e: i for i, e in enumerate(self.entities)}
        relation = {r: i for i, r in enumerate(self.relations)}
        self.ids = {
            split: np.array(
                [[entity[h], relation[r], entity[t]] for h, r, t in rows], dtype=np.int64
            ).reshape(-1, 3)
            for split, rows in triples.items()
        }
        self.known = {tuple(row) for rows in self.ids.values() for row in rows.tolist()}


def filtered_ranks(graph: Graph, split: str, score_tails, score_heads) -> np.ndarray:
    """[2 n] filtered ranks of the split's triples: tails given (h, r), then heads given (r, t).

    score_tails(h [q], r [q]) -> [q, entities]; score_heads(r [q], t [q]) -> [q, entities].
    """
    triples = graph.ids[split]
    n = len(graph.entities)
    ranks = []
    for side in ("tail", "head"):
        with torch.no_grad():
            if side == "tail":
                scores = score_tails(torch.from_numpy(triples[:, 0]), torch.from_numpy(triples[:, 1]))
            else:
                scores = score_heads(torch.from_numpy(triples[:, 1]), torch.from_numpy(triples[:, 2]))
        scores = scores.double().numpy()
        target = triples[:, 2] if side == "tail" else triples[:, 0]
        for q, (h, r, t) in enumerate(triples.tolist()):
            row = scores[q]
            true = row[target[q]]
            others = np.ones(n, dtype=bool)
            for c in range(n):
                edge = (h, r, c) if side == "tail" else (c, r, t)
                if c == target[q] or edge in graph.known:
                    others[c] = False
            higher = (row[others] > true).sum()
            tied = (row[others] == true).sum()
            ranks.append(1.0 + higher + 0.5 * tied)
    return np.array(ranks)


def metrics(ranks: np.ndarray) -> dict[str, float]:
    return {"mrr": float(np.mean(1.0 / ranks)), "hits_at_10": float(np.mean(ranks <= 10))}


# --------------------------------------------------------------------------- TwHIN


def twhin_config(
    graph: Graph, data: str, run: str, operator: str, loss: str, lr: float, args
) -> tuple[dict, int]:
    """The example config, re-pointed at this data set and grid point; also returns the steps."""
    with open(EXAMPLE) as f:
        config = yaml.safe_load(f)
    train_edges = len(graph.ids["train"])
    steps = args.epochs * math.ceil(train_edges / args.batch_size)
    config["training"].update(
        save_dir=run,
        num_train_steps=steps + args.epochs,  # the data ends first (epochs may end in a short batch)
        checkpoint_every_n=steps + args.epochs,
        train_log_every_n=max(1, steps // 10),
        num_threads=1,
        seed=args.seed,
    )
    table = config["model"]["embeddings"]["tables"][0]
    table.update(name="entity", num_embeddings=len(graph.entities), embedding_dim=args.dim)
    table["optimizer"] = {"adagrad": {"learning_rate": lr}}
    config["model"]["relations"] = [
        {"name": r, "lhs": "entity", "rhs": "entity", "operator": operator} for r in graph.relations
    ]
    config["model"]["loss"] = loss
    config["model"]["translation_optimizer"] = {"adagrad": {}, "learning_rate": {"constant": lr}}
    config["train_data"].update(
        inputs=os.path.join(data, "train", "*.parquet"),
        vocabulary=os.path.join(data, "vocab"),
        global_batch_size=args.batch_size,
        num_epochs=args.epochs,
        in_batch_negatives=0,
        global_negatives=args.negatives,
    )
    for split in ("valid", "test"):
        config["validation_data"][split]["inputs"] = os.path.join(data, split, "*.parquet")
    return config, steps


def _tml(mode: str, config_path: str, *extra: str) -> None:
    cmd = [os.path.join(os.path.dirname(sys.executable), "tml-twhin"), mode, "--config", config_path, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")


def run_twhin(graph: Graph, data: str, work: str, operator: str, loss: str, lr: float, args) -> dict:
    from tml.projects.twhin.embeddings import load
    from tml.projects.twhin.model.operators import RelationOperators, compare

    run = os.path.join(work, f"twhin-{operator}-{loss}-{lr}")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    config, _ = twhin_config(graph, data, os.path.join(run, "run"), operator, loss, lr, args)
    path = os.path.join(run, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    if not os.path.exists(os.path.join(data, "vocab")):
        _tml("build-vocab", path)
    started = time.monotonic()
    _tml("train", path)
    wall = time.monotonic() - started
    export = os.path.join(run, "export")
    _tml("export", path, "--output", export)
    with open(os.path.join(run, "run", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    rates = [line["train/examples_per_s"] for line in lines if "train/examples_per_s" in line]
    own = [line for line in lines if "eval/test/all/mrr" in line][-1]

    emb = load(export)
    vectors = emb.lookup("entity", keys=graph.entities)
    manifest = emb.manifest
    ops = RelationOperators([r["operator"] for r in manifest["relations"]], vectors.shape[1])
    learned = [r["vector"] for r in manifest["relations"] if r["vector"] is not None]
    ops.vectors.data = torch.tensor(learned, dtype=torch.float32)
    by_name = {r["name"]: i for i, r in enumerate(manifest["relations"])}
    order = torch.tensor([by_name[name] for name in graph.relations])
    comparator = manifest["comparator"]

    def tails(h, r):
        rel = order[r]
        candidates = torch.stack([ops.of_relation(int(i), vectors) for i in rel])  # [q, n, D]
        return compare(vectors[h].unsqueeze(1), candidates, comparator)

    def heads(r, t):
        given = ops(order[r], vectors[t])  # [q, D]
        return compare(vectors.unsqueeze(0), given.unsqueeze(1), comparator)

    evaluate = {split: metrics(filtered_ranks(graph, split, tails, heads)) for split in ("valid", "test")}
    steady = len(rates[1:]) / sum(1 / r for r in rates[1:])
    return {
        **evaluate,
        "own_test_mrr": own["eval/test/all/mrr"],
        "own_test_hits_at_10": own["eval/test/all/hits_at_10"],
        "edges_per_s": steady,
        "train_wall_s": wall,
    }


# --------------------------------------------------------------------------- PyKEEN


def run_pykeen(
    graph: Graph, triples: dict[str, np.ndarray], model_name: str, loss: str, lr: float, args
) -> dict:
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import model_resolver
    from pykeen.training import SLCWATrainingLoop
    from pykeen.training.callbacks import TrainingCallback
    from pykeen.triples import TriplesFactory

    torch.set_num_threads(1)
    entity_to_id = {e: i for i, e in enumerate(graph.entities)}
    relation_to_id = {r: i for i, r in enumerate(graph.relations)}
    factories = {
        split: TriplesFactory.from_labeled_triples(
            rows.astype(str), entity_to_id=entity_to_id, relation_to_id=relation_to_id
        )
        for split, rows in triples.items()
    }
    train = factories["train"]
    model = model_resolver.make(
        model_name, triples_factory=train, embedding_dim=args.dim, loss=loss, random_seed=args.seed
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loop = SLCWATrainingLoop(
        model=model,
        triples_factory=train,
        optimizer=optimizer,
        negative_sampler="basic",
        negative_sampler_kwargs={"num_negs_per_pos": 2 * args.negatives},
    )
    ends: list[float] = []

    class EpochTimes(TrainingCallback):
        def post_epoch(self, epoch: int, epoch_loss: float, **kwargs) -> None:
            ends.append(time.monotonic())

    started = time.monotonic()
    loop.train(
        triples_factory=train,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        use_tqdm=False,
        callbacks=[EpochTimes()],
    )
    wall = time.monotonic() - started
    first = max(1, args.epochs // 10)
    edges_per_s = (args.epochs - first) * train.num_triples / (ends[-1] - ends[first - 1])
    model.eval()

    def tails(h, r):
        return model.score_t(torch.stack([h, r], dim=1))

    def heads(r, t):
        return model.score_h(torch.stack([r, t], dim=1))

    evaluate = {split: metrics(filtered_ranks(graph, split, tails, heads)) for split in ("valid", "test")}
    own = RankBasedEvaluator(filtered=True).evaluate(
        model,
        factories["test"].mapped_triples,
        additional_filter_triples=[train.mapped_triples, factories["valid"].mapped_triples],
        use_tqdm=False,
        batch_size=256,
    )
    return {
        **evaluate,
        "own_test_mrr": float(own.get_metric("both.realistic.inverse_harmonic_mean_rank")),
        "own_test_hits_at_10": float(own.get_metric("both.realistic.hits_at_10")),
        "edges_per_s": edges_per_s,
        "train_wall_s": wall,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-edges", nargs=2, metavar=("DATASET", "OUTPUT"), help="only write edge files")
    parser.add_argument("--datasets", nargs="+", default=["nations", "umls"])
    parser.add_argument("--operators", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=16, help="K per corrupted side (2K per positive)")
    parser.add_argument("--twhin-lrs", type=float, nargs="+", default=[0.05, 0.2, 0.5], help="Adagrad")
    parser.add_argument("--twhin-losses", nargs="+", default=["softmax", "logistic"])
    parser.add_argument("--pykeen-lrs", type=float, nargs="+", default=[0.001, 0.01, 0.05], help="Adam")
    parser.add_argument("--pykeen-losses", nargs="+", default=["marginranking", "softplus"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/tml-bench-twhin-kg")
    parser.add_argument("--output", help="also write every result as JSON here")
    args = parser.parse_args()
    if args.write_edges:
        name, output = args.write_edges
        write_edges(read_triples(name), output)
        print(f"{name}: {', '.join(SPLITS)} edges -> {output}")
        return
    if importlib.util.find_spec("pykeen") is None:
        sys.exit(INSTALL)
    with open("/proc/loadavg") as f:
        print(f"torch {torch.__version__}; load average {f.read().split()[:3]}")
    results = []
    for name in args.datasets:
        triples = read_triples(name)
        graph = Graph(triples)
        data = os.path.join(args.work, name, "data")
        shutil.rmtree(data, ignore_errors=True)
        write_edges(triples, data)
        print(
            f"\n{name}: {len(graph.entities)} entities, {len(graph.relations)} relations, "
            + " / ".join(f"{len(graph.ids[s])}" for s in SPLITS)
            + f" triples; dim {args.dim}, {args.epochs} epochs of batch {args.batch_size}, "
            f"{2 * args.negatives} negatives per positive"
        )
        for operator in args.operators:
            grids = {
                "twhin": [(loss, lr) for loss in args.twhin_losses for lr in args.twhin_lrs],
                "pykeen": [(loss, lr) for loss in args.pykeen_losses for lr in args.pykeen_lrs],
            }
            # Alternate the two sides point by point, so load on the shared box hits both alike.
            for index in range(max(len(g) for g in grids.values())):
                for side, grid in grids.items():
                    if index >= len(grid):
                        continue
                    loss, lr = grid[index]
                    if side == "twhin":
                        figures = run_twhin(
                            graph, data, os.path.join(args.work, name), operator, loss, lr, args
                        )
                        model = f"TwHIN {operator}"
                    else:
                        figures = run_pykeen(graph, triples, PEERS[operator], loss, lr, args)
                        model = f"PyKEEN {PEERS[operator]}"
                    row = {"dataset": name, "side": side, "model": model, "loss": loss, "lr": lr, **figures}
                    results.append(row)
                    print(
                        f"  {model:22s} {loss:13s} lr {lr:<6g} valid MRR {figures['valid']['mrr']:.4f}  "
                        f"test MRR {figures['test']['mrr']:.4f} H@10 {figures['test']['hits_at_10']:.4f} "
                        f"(own evaluator {figures['own_test_mrr']:.4f} / {figures['own_test_hits_at_10']:.4f})  "
                        f"{figures['edges_per_s']:.0f} edges/s",
                        flush=True,
                    )
    print("\nchosen by validation MRR (test figures):")
    print("| data set | model | loss, lr | test MRR | test Hits@10 | edges/s |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        for operator in args.operators:
            for model in (f"TwHIN {operator}", f"PyKEEN {PEERS[operator]}"):
                rows = [r for r in results if r["dataset"] == name and r["model"] == model]
                best = max(rows, key=lambda r: r["valid"]["mrr"])
                print(
                    f"| {name} | {model} | {best['loss']}, {best['lr']:g} | {best['test']['mrr']:.4f} | "
                    f"{best['test']['hits_at_10']:.4f} | {best['edges_per_s']:.0f} |"
                )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
