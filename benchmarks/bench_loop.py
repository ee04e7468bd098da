"""Training throughput of the core loop against a plain PyTorch loop on the same model and batches.

Both loops drive the same sharded model (an EmbeddingBagCollection of 2 tables + an MLP, fused table
SGD, dense Adam with torch's fused kernel, built by the same code) over the same in-memory batches, in one
process. The two run in turn, in alternating order, `--repeat` times (each on a freshly built model), so
drift on a shared machine cancels. Printed: median examples/s of each with the range over repeats and the
ratio loop / plain of each pair (near 1.0 means the loop's bookkeeping - agreement all_reduces, NaN checks,
logging - costs little). With bf16 autocast too where the CPU supports it, and on CUDA when present.

    python benchmarks/bench_loop.py [--steps 60] [--batch-size 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from tml.core.distributed import init_distributed, shutdown
from tml.core.sharding import shard_model
from tml.core.train_loop import LoopOptions, train
from tml.optimizers.build import build_optimizer, embedding_optimizer
from tml.optimizers.config import EmbeddingOptimizerConfig, OptimizerConfig
from tml.reader.batch import RecapBatch

ROWS, DIM, DENSE, TASKS = 20_000, 32, 64, 4


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        tables = [
            EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[t])
            for t in "uv"
        ]
        self.ebc = EmbeddingBagCollection(tables=tables)
        self.mlp = nn.Sequential(nn.Linear(DENSE + 2 * DIM, 256), nn.ReLU(), nn.Linear(256, TASKS))

    def forward(self, batch):
        x = torch.cat([batch.dense["continuous"], self.ebc(batch.sparse).values()], dim=1)
        logits = self.mlp(x).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, {"logits": logits, "labels": batch.labels}


def make_batches(n: int, size: int) -> list[RecapBatch]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, 5, (2 * size,), generator=gen)
        values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["u", "v"], values=values, lengths=lengths)
        labels = (torch.rand(size, TASKS, generator=gen) < 0.3).float()
        dense = torch.randn(size, DENSE, generator=gen)
        out.append(
            RecapBatch(
                dense={"continuous": dense}, labels=labels, weights=torch.ones_like(labels), sparse=kjt
            )
        )
    return out


def build(env):
    torch.manual_seed(0)
    sgd = embedding_optimizer(EmbeddingOptimizerConfig(sgd={"learning_rate": 0.01}))
    sharded = shard_model(Model(), env, None, {"u": sgd, "v": sgd})
    config = OptimizerConfig(adam={}, learning_rate={"constant": 1e-3})
    optimizer, scheduler = build_optimizer(sharded.dense_named_parameters(), config)
    return sharded.module, optimizer, scheduler


def plain(env, batches, bf16: bool) -> float:
    module, optimizer, _ = build(env)
    start = time.perf_counter()
    for batch in batches:
        batch = batch.to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()
    return len(batches) * batches[0].batch_size / (time.perf_counter() - start)


def core_loop(env, batches, bf16: bool) -> float:
    module, optimizer, scheduler = build(env)
    options = LoopOptions(num_train_steps=len(batches), train_log_every_n=10**9, bf16=bf16)
    start = time.perf_counter()
    train(module, [optimizer], scheduler, batches, env, options)
    return len(batches) * batches[0].batch_size / (time.perf_counter() - start)


def _range(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    env = init_distributed("auto", "auto")
    batches = make_batches(args.steps, args.batch_size)
    precisions = [False]
    try:
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            torch.ones(2, 2, device=env.device) @ torch.ones(2, 2, device=env.device)
        precisions.append(True)
    except RuntimeError:
        print("bf16 autocast not supported here; fp32 only")
    plain(env, batches[:5], False)  # warm-up: first-call allocations and kernel selection
    print(f"device {env.device}, {args.steps} steps x {args.batch_size} examples, {args.repeat} repeats")
    for bf16 in precisions:
        runs = {"plain": [], "core": []}
        for repeat in range(args.repeat):
            order = ["plain", "core"] if repeat % 2 == 0 else ["core", "plain"]
            for name in order:
                runs[name].append((plain if name == "plain" else core_loop)(env, batches, bf16))
        ratios = [c / p for p, c in zip(runs["plain"], runs["core"], strict=True)]
        cells = [f"{name} {_range(values, ',.0f')} ex/s" for name, values in runs.items()]
        precision = "bf16" if bf16 else "fp32"
        print(f"{precision}: {'  '.join(cells)}  ratio {_range(ratios, '.3f')}")
    shutdown()


if __name__ == "__main__":
    main()
