"""Distributed reading: disjoint, complete, balanced shares; independent ends; a real 2-process run."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tml.reader.dataset import build_dataset
from tml.reader.sharding import Unit, assign_units

pytestmark = pytest.mark.unit


def test_assign_units_balanced_and_disjoint():
    units = [Unit(i, 0, rows) for i, rows in enumerate([100, 5, 7, 60, 40, 3, 33, 20])]
    shares = [assign_units(units, rank, 3) for rank in range(3)]
    assert sorted(u for share in shares for u in share) == sorted(units)
    loads = [sum(u.num_rows for u in share) for share in shares]
    assert max(loads) - min(loads) <= 100 and max(loads) == 100  # the largest unit alone on one rank
    for share in shares:  # each rank keeps the epoch order
        assert share == sorted(share, key=units.index)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_row_once_per_epoch_across_ranks(files, rd, world_size):
    config = rd.base_config(
        str(files), global_batch_size=6 * world_size, num_epochs=2, shuffle={"buffer_size": 8}
    )
    per_rank = []
    for rank in range(world_size):
        dataset = build_dataset(config, ["click"], rank=rank, world_size=world_size)
        batches = list(dataset)  # ends on its own: nothing waits for the other ranks
        assert len(batches) == dataset.num_batches()
        assert all(b.batch_size <= 6 for b in batches)
        per_rank.append([b.ids["uid"].numpy() for b in batches])
    for epoch in range(2):
        seen = []
        for rank, batches in enumerate(per_rank):
            dataset = build_dataset(config, ["click"], rank=rank, world_size=world_size)
            start = dataset.plan_epoch(0).num_batches(6) if epoch else 0
            count = dataset.plan_epoch(epoch).num_batches(6)
            seen.append(np.concatenate(batches[start : start + count]))
        everything = np.concatenate(seen)
        assert sorted(everything) == list(range(72))  # each example exactly once, none dropped
        assert max(map(len, seen)) - min(map(len, seen)) <= 16  # at most one row group apart


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inputs: str, config_json: str, result_path: str) -> None:
    from tml.reader.config import DataConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = DataConfig.model_validate_json(config_json)
    dataset = build_dataset(config, ["click"], rank=rank, world_size=world_size)
    ids = torch.cat([batch.ids["uid"] for batch in dataset])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, ids.tolist())
    if rank == 0:
        torch.save(gathered, result_path)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_read_disjoint_complete_shares(files, rd, tmp_path):
    config = rd.base_config(str(files), global_batch_size=4)
    result = tmp_path / "ids.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(files), config.model_dump_json(), str(result)), nprocs=2)
    shares = torch.load(result)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(72))
