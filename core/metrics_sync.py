"""Cross-rank reduction of metric state: one SUM all_reduce, or nothing when not distributed.

Every accumulating metric in `tml.core.metrics` keeps its state as one tensor of sufficient statistics
(sums), so adding the tensors of all ranks gives the state of the whole data set. This module is the only
place the metrics touch `torch.distributed`.

Example:
    state = all_reduce_sum(local_state.clone())  # world size 1: returned unchanged
"""

from __future__ import annotations

import torch


def world_size() -> int:
    """The default process group's size, or 1 when torch.distributed is absent or not initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (and return it); a no-op at world size 1.

    Every rank must call this, in the same order, with a tensor of the same shape and dtype: a rank that
    saw no data still contributes its zeros.

    Args:
        tensor: the local state (any shape); it is overwritten with the global sum.

    Returns:
        The same tensor object, holding the sum over ranks.
    """
    if world_size() == 1:
        return tensor
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        # NCCL reduces device memory only; a rank that never moved its state to the GPU
        # (no batches seen) must still join the collective.
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        tensor.copy_(on_device)
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
