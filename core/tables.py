"""Whole-table views of sharded embedding tables: deterministic initialisation, loading and gathering.

A table's weight is [num_embeddings, D]. Sharded, each rank holds rectangles of it (row-wise: row ranges,
column-wise: column ranges, table-wise: all of it on one rank), as a ShardedTensor or DTensor in the
module's state_dict; replicated (data_parallel), every rank holds it all. These functions work on a rank's
pieces only, so no rank ever allocates a whole production table.

Initialisation is independent of the sharding: rows are filled in blocks of `INIT_BLOCK_ROWS`, each from its
own generator seeded by (seed, table, block), so a table starts with the same values on 1 rank or 64, under
any sharding type, and a resharded run starts where a differently sharded one would have.

Example:
    init_tables(sharded.module, {"user": uniform_bound}, seed=0)
    load_full_table(sharded.module, "user", pretrained)        # [N, D] on CPU
    full = gather_full_table(sharded.module, "user")            # a collective when sharded
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tml.core.distributed import hash_seed

INIT_BLOCK_ROWS = 1 << 16


def local_pieces(tensor) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, local tensor) of each piece of `tensor` this rank holds (views; offsets per dimension)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, ShardedTensor):
        for shard in tensor.local_shards():
            yield tuple(shard.metadata.shard_offsets), shard.tensor
    elif isinstance(tensor, DTensor):
        local = tensor.to_local()
        if hasattr(local, "local_shards"):  # torchrec's LocalShardsWrapper: several rectangles, or none
            shards = local.local_shards()
            for piece, offsets in zip(shards, local.local_offsets()[: len(shards)], strict=True):
                yield tuple(offsets), piece
        elif local.numel():
            raise NotImplementedError("a DTensor table without LocalShardsWrapper shards")
    else:
        yield (0,) * tensor.dim(), tensor


def _is_distributed(tensor) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, (ShardedTensor, DTensor))


def table_state_key(module: nn.Module, table: str) -> str:
    keys = [k for k in module.state_dict() if k.endswith(f"embedding_bags.{table}.weight")]
    if len(keys) != 1:
        raise ValueError(f"model has no (or several) embedding table '{table}': {keys}")
    return keys[0]


def default_init(num_embeddings: int) -> Callable[[torch.Tensor], None]:
    """torchrec's default: uniform in +-sqrt(1 / num_embeddings)."""
    bound = math.sqrt(1.0 / num_embeddings)
    return lambda weight: nn.init.uniform_(weight, -bound, bound)


@torch.no_grad()
def init_tables(module: nn.Module, inits: dict[str, Callable[[torch.Tensor], None]], seed: int) -> None:
    """Fill each table's local pieces with values that depend only on (seed, table, row), see module doc.

    Args:
        module: the sharded (or plain) model.
        inits: table name -> in-place initialiser of a [rows, D] float32 block (drawn from torch's global
            generator, which is seeded per block here).
        seed: the run's seed.
    """
    state = module.state_dict()
    for table, init in inits.items():
        weight = state[table_state_key(module, table)]
        rows, dim = weight.shape
        for (row, col), piece in local_pieces(weight):
            if piece.device.type == "meta" or not piece.numel():
                continue
            first, last = row, row + piece.shape[0]
            for block in range(first // INIT_BLOCK_ROWS, (last - 1) // INIT_BLOCK_ROWS + 1):
                start = block * INIT_BLOCK_ROWS
                stop = min(start + INIT_BLOCK_ROWS, rows)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash_seed(seed, "table", table, block))
                    values = torch.empty(stop - start, dim)
                    init(values)
                lo, hi = max(first, start), min(last, stop)
                piece[lo - first : hi - first].copy_(
                    values[lo - start : hi - start, col : col + piece.shape[1]]
                )


@torch.no_grad()
def load_full_table(module: nn.Module, table: str, weight: torch.Tensor) -> None:
    """Copy a full [num_embeddings, D] tensor (or a memory-mapped array) into this rank's pieces of `table`."""
    target = module.state_dict()[table_state_key(module, table)]
    if tuple(target.shape) != tuple(weight.shape):
        raise ValueError(f"table '{table}' has shape {tuple(target.shape)}, got {tuple(weight.shape)}")
    for (row, col), piece in local_pieces(target):
        rows, cols = piece.shape
        part = torch.as_tensor(weight[row : row + rows, col : col + cols])
        piece.copy_(part.to(piece.dtype))


@torch.no_grad()
def gather_full_table(module: nn.Module, table: str) -> torch.Tensor:
    """The full [num_embeddings, D] weight of `table` on every rank (a collective when sharded)."""
    source = module.state_dict()[table_state_key(module, table)]
    if not _is_distributed(source):
        return source.detach().clone().cpu()
    pieces = list(local_pieces(source))
    # NCCL reduces only CUDA tensors.
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    full = torch.zeros(tuple(source.shape), dtype=source.dtype, device=device)
    for (row, col), piece in pieces:
        rows, cols = piece.shape
        full[row : row + rows, col : col + cols] = piece.to(device)
    # Shards do not overlap, so a sum assembles the whole table on every rank.
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)
    return full.cpu()
