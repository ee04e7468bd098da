"""The ranking batch: what the ranking decoder (tml.reader.ranking) yields and the recap models consume.

Shapes: B = batch size, T = number of tasks. See docs/design.md for the contract. Other decoders bring
their own batch types; `register_pipelineable` serves them all.
The class follows TorchRec's `Pipelineable` protocol (`to`, `record_stream`, `pin_memory`) without
importing torchrec, so dense-only models run on a bare torch; `register_pipelineable()` makes
`isinstance(batch, Pipelineable)` true for the train pipelines that check it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _map(value: Any, fn) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: fn(item) for key, item in value.items()}
    return fn(value)


@dataclasses.dataclass
class SparseValues:
    """One sparse continuous feature of B rows: row i owns ids[offsets[i]:offsets[i + 1]] and their values.

    Args:
        ids: [N] int64, each in [0, num_buckets) of its feature.
        values: [N] float32, the value of each id.
        offsets: [B + 1] int64.
    """

    ids: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor

    def _apply(self, fn) -> SparseValues:
        return SparseValues(fn(self.ids), fn(self.values), fn(self.offsets))

    def to(self, device: torch.device, non_blocking: bool = False) -> SparseValues:
        return self._apply(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> SparseValues:
        return self._apply(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for tensor in (self.ids, self.values, self.offsets):
            tensor.record_stream(stream)


@dataclasses.dataclass
class RecapBatch:
    """One batch of ranking examples.

    Args:
        dense: named dense tensors, each [B, width] (`continuous`, `binary`, `discrete`, embedding vectors...).
        labels: [B, T] float32, one column per task in the order the reader was given the task names.
        weights: [B, T] float32 per-task example weights (weight column x that task's downsampling weight).
        sparse: KeyedJaggedTensor of sparse id features, or None.
        ids: passthrough id columns, each [B] int64.
        sparse_continuous: sparse continuous (id -> value) features by name, each a SparseValues of B rows.

    Example:
        batch = RecapBatch(dense={"continuous": torch.zeros(4, 3)}, labels=torch.zeros(4, 2),
                           weights=torch.ones(4, 2))
        batch = batch.to(torch.device("cpu"), non_blocking=True)
    """

    dense: dict[str, torch.Tensor]
    labels: torch.Tensor
    weights: torch.Tensor
    sparse: Any = None
    ids: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    sparse_continuous: dict[str, SparseValues] = dataclasses.field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def _apply(self, fn) -> RecapBatch:
        return RecapBatch(
            dense=_map(self.dense, fn),
            labels=fn(self.labels),
            weights=fn(self.weights),
            sparse=_map(self.sparse, fn),
            ids=_map(self.ids, fn),
            sparse_continuous={name: item._apply(fn) for name, item in self.sparse_continuous.items()},
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> RecapBatch:
        return self._apply(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> RecapBatch:
        return self._apply(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for tensor in [*self.dense.values(), self.labels, self.weights, *self.ids.values()]:
            tensor.record_stream(stream)
        if self.sparse is not None:
            self.sparse.record_stream(stream)
        for item in self.sparse_continuous.values():
            item.record_stream(stream)


def register_pipelineable(*classes: type) -> None:
    """Declare batch classes as torchrec `Pipelineable` (call where torchrec is imported anyway)."""
    from torchrec.streamable import Pipelineable

    for cls in classes:
        Pipelineable.register(cls)
