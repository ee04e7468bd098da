"""How close can any model get to the synthetic generator's oracle on N training rows?

    .venv/bin/python benchmarks/bench_synthetic_ceiling.py [--rows 2000000] [--epochs 2]

Draws rows from the generating model of `config/local.yaml`'s train_data (seed 0, as `generate-data`), and
trains a plain PyTorch MLP on the label function's exact inputs: the standardized numeric signal `phi`,
the informative discrete values and the sparse ids (embedded). It never sees the raw features, so it skips
every featurization problem the ranker has to solve; its held-out AUROC is a practical ceiling for a model
trained on that many rows, printed per task next to the oracle AUC and as the gap between them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

from tml.core.config.loader import load_config
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.data import synthetic
from tml.projects.home.recap.data.labels import SHARED_LATENT, AucHistogram

CONFIG = os.path.join(os.path.dirname(__file__), "..", "projects/home/recap/config/local.yaml")


def draw(world, rows: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
    """Exact label inputs [phi, discrete, ids...], labels [N, T] and the oracle's observable logits."""
    rng = np.random.default_rng(seed)
    inputs = synthetic._label_inputs(world, synthetic._sample_features(world, rng, rows))
    logits = world.labels.logits(*inputs)
    labels = rng.random(logits.shape, dtype=np.float32) < 1.0 / (1.0 + np.exp(-logits))
    phi = world.labels._phi(inputs[0])
    discrete = np.concatenate(inputs[1], axis=1) if inputs[1] else np.zeros((rows, 0), np.int64)
    features = [torch.from_numpy(phi), torch.from_numpy(discrete), *map(torch.from_numpy, inputs[2])]
    observable = logits - SHARED_LATENT * inputs[3][:, None]
    return features, torch.from_numpy(labels.astype(np.float32)), observable


class CeilingModel(nn.Module):
    """[phi, discrete, ids...] -> [B, T] logits: embeddings for categories and ids, a 256-128 MLP."""

    def __init__(self, phi_width: int, discrete_columns: int, id_vocabs: list[int], tasks: int) -> None:
        super().__init__()
        self.discrete = nn.ModuleList(nn.Embedding(100, 4) for _ in range(discrete_columns))
        self.ids = nn.ModuleList(nn.Embedding(vocab, 8) for vocab in id_vocabs)
        width = phi_width + 4 * discrete_columns + 8 * len(id_vocabs)
        self.mlp = nn.Sequential(
            nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, tasks)
        )

    def forward(self, phi: torch.Tensor, discrete: torch.Tensor, *ids: torch.Tensor) -> torch.Tensor:
        parts = [phi, *(table(discrete[:, k]) for k, table in enumerate(self.discrete))]
        parts += [table(column) for table, column in zip(self.ids, ids, strict=True)]
        return self.mlp(torch.cat(parts, dim=1))


def auc(scores: np.ndarray, labels: torch.Tensor) -> list[float]:
    histogram = AucHistogram(scores.shape[1])
    histogram.add(scores, labels.numpy() > 0.5)
    return histogram.auc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("TML_DATA", "unused")
    os.environ.setdefault("TML_RUNS", "unused")
    config = load_config(RecapConfig, CONFIG)
    world = synthetic.build_world(config.train_data, seed=0)
    train, labels, _ = draw(world, args.rows, seed=101)
    valid, valid_labels, observable = draw(world, 200_000, seed=102)
    torch.manual_seed(0)
    model = CeilingModel(
        train[0].shape[1], train[1].shape[1], [c.vocab for c in world.sparse.values()], labels.shape[1]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(args.epochs):
        order = torch.randperm(args.rows)
        for start in range(0, args.rows, args.batch_size):
            index = order[start : start + args.batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(*(f[index] for f in train)), labels[index]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(*valid).numpy()
    print(f"{args.rows} rows x {args.epochs} epochs; held-out 200k rows")
    print(f"{'task':45s} {'ceiling MLP':>12s} {'oracle':>8s} {'gap':>6s}")
    oracle = auc(observable, valid_labels)
    for task, got, best in zip(world.tasks, auc(scores, valid_labels), oracle, strict=True):
        print(f"{task:45s} {got:12.4f} {best:8.4f} {best - got:6.4f}")


if __name__ == "__main__":
    main()
