"""TwHIN feeding the ranker: recap AUROC with and without attached TwHIN user / author vectors.

For each seed, end to end with the user commands (subprocesses) except the recap data, whose generator
option is Python only:
1. a synthetic graph: users and authors, relations fav and follow (user -> author, translation), written by
   `tml-twhin generate-data` from a config derived from projects/twhin/config/local.yaml;
2. `tml-twhin train` and `tml-twhin export`;
3. recap data in projects/home/recap/config/local.yaml's schema whose labels depend, beside the usual
   features, on the (user, author) pair's affinity in the same latent graph: the graph's own fav score
   z_u . (z_a + t_fav) + b_a (`synthetic.Affinity`; user ids in [0, users), author ids in [0, authors));
4. `tml-twhin attach` of the user vectors (by meta.user_id) and of the author vectors (by meta.author_id) to
   the recap train and valid files (`user_twhin`, `author_twhin`);
5. `tml-recap train` twice on those files, the same config except that one lists the two attached vectors in
   its `seg_dense_schema` and `model.dense_embeddings.names` (order alternating between seeds).
It prints per-task validation AUROC of both and the difference, over the seeds with their range, and what
explains the figure: the AUROC of the true affinity alone and of TwHIN's score of the pair alone (does the
graph inform the labels? does TwHIN recover the factors?), the correlation of the two, the oracle AUROC, and
TwHIN's filtered MRR.

    .venv/bin/python benchmarks/bench_twhin_to_recap.py [--seeds 0 1] [--recap-steps 2000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWHIN_CONFIG = os.path.join(ROOT, "projects/twhin/config/local.yaml")
RECAP_CONFIG = os.path.join(ROOT, "projects/home/recap/config/local.yaml")
BIN = os.path.dirname(sys.executable)
RELATIONS = ["fav", "follow"]  # the recap affinity is the score of the first


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _write(config: dict, path: str) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Ties share their mean rank.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    positives = labels.sum()
    return float(
        (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (len(labels) - positives))
    )


def twhin_config(work: str, args) -> dict:
    with open(TWHIN_CONFIG) as f:
        config = yaml.safe_load(f)
    tables = config["model"]["embeddings"]["tables"]
    tables[0].update(name="user", num_embeddings=args.users, embedding_dim=args.dim)
    tables[1].update(name="author", num_embeddings=args.authors, embedding_dim=args.dim)
    config["model"]["relations"] = [
        {"name": name, "lhs": "user", "rhs": "author", "operator": "translation"} for name in RELATIONS
    ]
    data = os.path.join(work, "graph")
    config["training"].update(
        save_dir=os.path.join(work, "twhin"),
        num_train_steps=args.twhin_steps,
        checkpoint_every_n=args.twhin_steps,
        eval_every_n=args.twhin_steps,
        train_log_every_n=max(1, args.twhin_steps // 10),
    )
    config["train_data"]["inputs"] = os.path.join(data, "train", "*.parquet")
    config["validation_data"] = {
        "valid": {"inputs": os.path.join(data, "valid", "*.parquet"), "global_batch_size": 512}
    }
    return config


def recap_config(work: str, name: str, steps: int, with_twhin: bool, dim: int) -> dict:
    with open(RECAP_CONFIG) as f:
        # Anchors resolved into separate objects (aliases would share one schema between the sections).
        config = json.loads(json.dumps(yaml.safe_load(f)))
    config["training"].update(
        save_dir=os.path.join(work, f"recap_{name}"),
        num_train_steps=steps,
        checkpoint_every_n=steps,
        eval_every_n=steps,
        train_log_every_n=max(1, steps // 10),
    )
    lrs = config["optimizer"]["multi_task_learning_rates"]
    for schedule in [lrs["backbone_learning_rate"], *lrs["tower_learning_rates"].values()]:
        schedule["linear_ramp_to_cosine"]["final_num_steps"] = steps
    sections = [config["train_data"], *config["validation_data"].values()]
    config["train_data"]["inputs"] = os.path.join(work, "recap_attached", "train", "*.parquet")
    config["validation_data"]["valid"]["inputs"] = os.path.join(work, "recap_attached", "valid", "*.parquet")
    if with_twhin:
        for section in sections:
            section["seg_dense_schema"]["features"] += [
                {"name": f"{table}_twhin", "length": dim, "dtype": "float32"} for table in ("user", "author")
            ]
        config["model"]["dense_embeddings"]["names"] += ["user_twhin", "author_twhin"]
    return config


def one_seed(seed: int, args) -> dict:
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.data.synthetic import Affinity, generate_splits
    from tml.projects.twhin.data.synthetic import latent_graph
    from tml.projects.twhin.embeddings import load

    work = os.path.join(args.work, f"seed{seed}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    timings = {}

    # 1-2. The graph and TwHIN.
    started = time.monotonic()
    twhin = _write(twhin_config(work, args), os.path.join(work, "twhin.yaml"))
    _run(
        f"{BIN}/tml-twhin",
        "generate-data",
        "--config",
        twhin,
        "--num-edges",
        str(args.graph_edges),
        "--validation-fraction",
        "0.05",
        "--seed",
        str(seed),
        "--output",
        os.path.join(work, "graph"),
    )
    _run(f"{BIN}/tml-twhin", "train", "--config", twhin)
    export = os.path.join(work, "export")
    _run(f"{BIN}/tml-twhin", "export", "--config", twhin, "--output", export)
    timings["twhin_s"] = time.monotonic() - started
    with open(os.path.join(work, "twhin", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    twhin_mrr = [line for line in lines if "eval/valid/fav/mrr" in line][-1]["eval/valid/fav/mrr"]

    # 3. Recap data sharing the graph's factors (the generator's latent graph for this seed and tables).
    started = time.monotonic()
    graph = latent_graph({"user": args.users, "author": args.authors}, len(RELATIONS), seed)
    affinity = Affinity(
        "meta.user_id",
        graph.factors["user"],
        "meta.author_id",
        graph.factors["author"] + graph.translations[0],
        graph.biases["author"],
        weight=args.affinity_weight,
    )
    base = load_config(RecapConfig, RECAP_CONFIG, env={"TML_DATA": work})
    summaries = generate_splits(
        base.train_data,
        base.validation_data,
        args.recap_examples,
        os.path.join(work, "recap"),
        seed,
        validation_fraction=args.validation_fraction,
        affinity=affinity,
    )
    oracle = {s.name: s.oracle_auc for s in summaries}["valid"]

    # 4. Attach both tables' vectors to both splits.
    for split in ("train", "valid"):
        source = os.path.join(work, "recap", split, "*.parquet")
        with_user = os.path.join(work, "recap_user", split)
        _run(
            f"{BIN}/tml-twhin",
            "attach",
            "--export",
            export,
            "--type",
            "user",
            "--input",
            source,
            "--id-column",
            "meta.user_id",
            "--name",
            "user_twhin",
            "--output",
            with_user,
        )
        _run(
            f"{BIN}/tml-twhin",
            "attach",
            "--export",
            export,
            "--type",
            "author",
            "--input",
            os.path.join(with_user, "*.parquet"),
            "--id-column",
            "meta.author_id",
            "--name",
            "author_twhin",
            "--output",
            os.path.join(work, "recap_attached", split),
        )
    timings["data_s"] = time.monotonic() - started

    # Diagnostics on the validation rows: the true affinity and TwHIN's score of the same pair, alone.
    valid = pa.concat_tables(
        pq.read_table(p)
        for p in sorted(glob.glob(os.path.join(work, "recap_attached", "valid", "*.parquet")))
    )
    users, authors = valid["meta.user_id"].to_numpy(), valid["meta.author_id"].to_numpy()
    true_score = affinity.score(users, authors)
    emb = load(export)
    fav = np.asarray(emb.relations["fav"]["vector"], dtype=np.float32)
    u = emb.lookup("user", ids=users).numpy()
    a = emb.lookup("author", ids=authors).numpy()
    twhin_score = np.einsum("nd,nd->n", u, a + fav)
    tasks = list(base.train_data.tasks)
    diagnostics = {
        "pearson_true_vs_twhin": float(np.corrcoef(true_score, twhin_score)[0, 1]),
        "auc_true_affinity": {t: _auc(true_score, valid[t].to_numpy()) for t in tasks},
        "auc_twhin_score": {t: _auc(twhin_score, valid[t].to_numpy()) for t in tasks},
    }

    # 5. Recap with and without the vectors, in alternating order.
    auroc, wall = {}, {}
    variants = ["with", "without"] if seed % 2 == 0 else ["without", "with"]
    for name in variants:
        config = recap_config(work, name, args.recap_steps, name == "with", args.dim)
        path = _write(config, os.path.join(work, f"recap_{name}.yaml"))
        started = time.monotonic()
        _run(f"{BIN}/tml-recap", "train", "--config", path)
        wall[name] = time.monotonic() - started
        with open(os.path.join(work, f"recap_{name}", "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if f"eval/valid/{tasks[0]}/auroc" in line][-1]
        auroc[name] = {t: last[f"eval/valid/{t}/auroc"] for t in tasks}
    timings.update({f"recap_{k}_s": v for k, v in wall.items()})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "seed": seed,
        "auroc": auroc,
        "oracle": oracle,
        "twhin_valid_fav_mrr": twhin_mrr,
        **diagnostics,
        "timings": timings,
    }


def summarize(results: list[dict]) -> None:
    """The table of with / without AUROC over seeds (median and range) and the diagnostics."""
    tasks = list(results[0]["auroc"]["with"])
    print(f"\nvalidation AUROC over seeds {[r['seed'] for r in results]}: median (range)")
    print(
        "| task | without TwHIN | with TwHIN | difference | oracle | true affinity alone | TwHIN score alone |"
    )
    print("|---|---|---|---|---|---|---|")

    def cell(values) -> str:
        return f"{np.median(values):.4f} ({min(values):.4f} - {max(values):.4f})"

    for task in tasks:
        without = [r["auroc"]["without"][task] for r in results]
        with_ = [r["auroc"]["with"][task] for r in results]
        diff = [w - o for w, o in zip(with_, without, strict=True)]
        print(
            f"| {task.rsplit('.', 1)[-1]} | {cell(without)} | {cell(with_)} | "
            f"{np.median(diff):+.4f} ({min(diff):+.4f} - {max(diff):+.4f}) | "
            f"{cell([r['oracle'][task] for r in results])} | "
            f"{cell([r['auc_true_affinity'][task] for r in results])} | "
            f"{cell([r['auc_twhin_score'][task] for r in results])} |"
        )
    print(
        "Pearson r of TwHIN's fav score with the true affinity: "
        + cell([r["pearson_true_vs_twhin"] for r in results])
        + "; TwHIN valid fav MRR: "
        + cell([r["twhin_valid_fav_mrr"] for r in results])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--authors", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=16, help="TwHIN dim (the attached vectors' length)")
    parser.add_argument("--graph-edges", type=int, default=400_000)
    parser.add_argument("--twhin-steps", type=int, default=2000)
    parser.add_argument("--recap-examples", type=int, default=1_000_000)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--recap-steps", type=int, default=2000)
    parser.add_argument("--affinity-weight", type=float, default=1.0)
    parser.add_argument("--work", default="/tmp/tml-bench-twhin-recap")
    parser.add_argument("--keep", action="store_true", help="keep each seed's folder")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        with open("/proc/loadavg") as f:
            load_average = f.read().split()[:3]
        result = one_seed(seed, args)
        results.append(result)
        print(f"seed {seed} (load average before {load_average}): {json.dumps(result)}", flush=True)
    summarize(results)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
