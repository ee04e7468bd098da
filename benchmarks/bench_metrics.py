"""Throughput of RankingMetrics (update per batch + one compute) against exact AUROC on the same data.

References measured in the same run:
  - `auroc_exact` (numpy sort, weighted Mann-Whitney) over all examples, one call per task;
  - torchmetrics' `BinaryAUROC(thresholds=None)` (exact, unweighted: it takes no sample weights) and
    `BinaryAUROC(thresholds=--bins)` (binned at the same number of thresholds as RankingMetrics' bins),
    one instance per task, fed batch by batch, if torchmetrics is importable.
RankingMetrics computes ten metrics per task (and per segment), the references only AUROC, so a ratio
above 1 means the full metric set is still cheaper than AUROC alone. The AUROC differences are measured
against the exact unweighted AUROC for torchmetrics (it ignores weights) and the exact weighted one for
RankingMetrics.

Usage:
    .venv/bin/python benchmarks/bench_metrics.py [--examples 2000000] [--tasks 4] [--batch 4096]
        [--bins 10000] [--binned-examples 100000] [--stratifiers 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from tml.core.metrics import RankingMetrics, auroc_exact
from tml.projects.home.recap.model.stratifiers import stratifier_segments
from tml.reader.batch import RecapBatch


def _data(n: int, tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(n, tasks, generator=g) * 1.5 - 2.0
    labels = (torch.rand(n, tasks, generator=g) < torch.sigmoid(0.8 * logit)).float()
    weights = torch.rand(n, tasks, generator=g) + 0.5
    discrete = torch.randint(0, 4, (n, 8), generator=g)
    return torch.sigmoid(logit), labels, weights, discrete


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=2_000_000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--bins", type=int, default=10_000)
    parser.add_argument(
        "--binned-examples", type=int, default=100_000, help="rows fed to torchmetrics' binned AUROC"
    )
    parser.add_argument("--stratifiers", type=int, default=2, help="segments besides 'all rows'")
    # One thread by default: on a shared machine, intra-op threads waiting on busy cores dominate the
    # timings of small per-batch ops; numpy's sort is single-threaded anyway.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p, y, w, discrete = _data(args.examples, args.tasks)
    batches = torch.arange(args.examples).split(args.batch)
    tasks = [f"task{t}" for t in range(args.tasks)]
    n = args.examples

    def run_ours(stratifiers):
        metrics = RankingMetrics(tasks, *stratifier_segments(stratifiers), num_bins=args.bins)
        for rows in batches:
            batch = RecapBatch(dense={"discrete": discrete[rows]}, labels=y[rows], weights=w[rows])
            metrics.update(batch, {"probabilities": p[rows], "labels": y[rows], "weights": w[rows]})
        return metrics.compute()

    plain, plain_s = _timed(lambda: run_ours([]))
    strata = [(f"s{i}", i, 1) for i in range(args.stratifiers)]
    _, strat_s = _timed(lambda: run_ours(strata))
    exact, exact_s = _timed(lambda: [auroc_exact(p[:, t], y[:, t], w[:, t]) for t in range(args.tasks)])
    gap = max(abs(plain[f"{task}/auroc"] - exact[t]) for t, task in enumerate(tasks))

    print(
        f"{n} examples x {args.tasks} tasks, batch {args.batch}, {args.bins} bins, {torch.get_num_threads()} threads"
    )
    print(f"  RankingMetrics, all metrics:          {n / plain_s:12,.0f} examples/s")
    print(f"  RankingMetrics, +{args.stratifiers} segments:          {n / strat_s:12,.0f} examples/s")
    print(f"  auroc_exact (numpy), AUROC only:      {n / exact_s:12,.0f} examples/s")
    print(f"  ratio RankingMetrics / auroc_exact:   {exact_s / plain_s:8.2f}x   (max |AUROC diff| {gap:.1e})")
    print(f"  ratio with segments / auroc_exact:    {exact_s / strat_s:8.2f}x")
    try:
        from torchmetrics.classification import BinaryAUROC
    except ImportError:
        print("  torchmetrics not importable: no torchmetrics reference")
        return

    def run_torchmetrics(thresholds, some_batches):
        aurocs = [BinaryAUROC(thresholds=thresholds) for _ in tasks]
        for rows in some_batches:
            for t, auroc in enumerate(aurocs):
                auroc.update(p[rows, t], y[rows, t].long())
        return [float(auroc.compute()) for auroc in aurocs]

    # torchmetrics' binned AUROC compares every example with every threshold (O(N x thresholds)): it is
    # timed on the first --binned-examples rows only, and compared with the exact AUROC of those rows.
    binned_batches = batches[: max(1, args.binned_examples // args.batch)]
    binned_n = sum(len(rows) for rows in binned_batches)
    for label, thresholds, some in [
        ("exact", None, batches),
        (f"{args.bins} thresholds, first {binned_n:,} rows", args.bins, binned_batches),
    ]:
        rows_n = sum(len(rows) for rows in some)
        unweighted = [
            auroc_exact(p[:rows_n, t], y[:rows_n, t], torch.ones(rows_n)) for t in range(args.tasks)
        ]
        values, tm_s = _timed(lambda thresholds=thresholds, some=some: run_torchmetrics(thresholds, some))
        tm_gap = max(abs(v - u) for v, u in zip(values, unweighted, strict=True))
        tm_s *= n / rows_n  # seconds for all n examples at this rate
        print(
            f"  torchmetrics BinaryAUROC ({label}): {n / tm_s:12,.0f} examples/s   "
            f"(max |AUROC diff| from exact {tm_gap:.1e})"
        )
        print(f"  ratio RankingMetrics / torchmetrics ({label}): {tm_s / plain_s:8.2f}x")


if __name__ == "__main__":
    main()
