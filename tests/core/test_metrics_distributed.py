"""Two gloo ranks that split the data report the same metrics as one process that sees all of it."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tml.core.metrics import RankingMetrics, RankMetrics

TASKS = ["a", "b"]
SEGMENTS = ["country=2"]


def _country_is_2(batch: dict) -> torch.Tensor:
    return (batch["discrete"][:, 1] == 2)[:, None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(11)
    logit = torch.randn(900, 2, generator=g) * 1.5
    labels = (torch.rand(900, 2, generator=g) < torch.sigmoid(logit)).float()
    weights = torch.rand(900, 2, generator=g) + 0.5
    discrete = torch.randint(0, 3, (900, 3), generator=g)
    pos, neg = torch.randn(120, generator=g), torch.randn(120, 7, generator=g)
    return torch.sigmoid(logit), labels, weights, discrete, pos, neg


def _evaluate(row_chunks, edge_rows) -> dict[str, float]:
    p, y, w, discrete, pos, neg = _data()
    ranking = RankingMetrics(TASKS, SEGMENTS, _country_is_2, num_bins=500)
    for rows in row_chunks:
        batch = {"discrete": discrete[rows]}
        ranking.update(batch, {"probabilities": p[rows], "labels": y[rows], "weights": w[rows]})
    link = RankMetrics(ks=(1, 3))
    if edge_rows is not None:
        link.update_scores(pos[edge_rows], neg[edge_rows])
    return {**ranking.compute(), **{f"link/{k}": v for k, v in link.compute().items()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.arange(900)
        # Uneven shares, several batches on one rank, and rank 1 sees no edges at all.
        chunks = [rows[:200]] if rank == 0 else [rows[200:500], rows[500:]]
        edges = torch.arange(120) if rank == 0 else None
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(_evaluate(chunks, edges), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _evaluate([torch.arange(900)], torch.arange(120))
    assert "country=2/b/nrce" in expected and "link/hits_at_3" in expected
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert not math.isnan(value), key
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, key)
