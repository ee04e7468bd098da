"""The training batch of TwHIN: edges, the KeyedJaggedTensor of every row they need, and their negatives.

Shapes: B = edges, T = tables, N = rows looked up, S = corrupted sides (1 or 2), K = negatives per side
(in_batch_negatives + global_negatives).

`TwhinBatchBuilder.build(edges, index)` turns an `EdgeBatch` into a `TwhinBatch`:
- lookups 0..B-1 are the edges' lhs rows, B..2B-1 their rhs rows, then the global negatives;
- in-batch negatives of edge e on the rhs side are the rhs rows of K other edges of e's relation: the
  edges of each relation are put in a random cyclic order and e takes the K edges that follow it, so they
  are distinct, never e itself, and a uniformly random K-subset of the others (all of them, the rest of
  the slots masked, when the relation has K or fewer other edges in the batch); the lhs side likewise with
  an order of its own;
- global negatives: per relation and side, `global_negatives` rows drawn uniformly from the target table,
  shared by every edge of that relation in the batch (as in PyTorch-BigGraph: G lookups per relation and
  side instead of B * G);
- a negative that names the positive's own row (the same tweet in two edges) is masked.

Everything random comes from one generator seeded by (seed, rank, index): `index` is the batch's position
in the rank's stream of the reader (epochs included), so a resumed run draws exactly the negatives the
uninterrupted one draws (`TwhinBatches` below keeps that position across checkpoints).

Example:
    builder = TwhinBatchBuilder(["user", "tweet"], [(0, 1)], [1000, 500], in_batch=10, global_=5,
                                sides=("rhs", "lhs"), seed=0, rank=0)
    batch = builder.build(EdgeBatch(lhs, rel, rhs), index=0)
    batch.lookups          # KeyedJaggedTensor, keys user, tweet, N bags of one id each
    batch.neg_index        # [B, 2, 15] rows of the lookups; batch.neg_mask [B, 2, 15]
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tml.core.config.loader import ConfigError
from tml.core.distributed import hash_seed
from tml.projects.twhin.data.edges import EdgeBatch
from tml.reader.state import ResumeError


def lookup_kjt(keys: Sequence[str], tables: torch.Tensor, ids: torch.Tensor, stride: int | None = None):
    """A KeyedJaggedTensor of `stride` bags (default N = len(ids)), bag i < N holding `ids[i]` under key
    `keys[tables[i]]`, the bags past N empty.

    The embedding bag collection then returns [stride, T * D] with bag i's vector in its table's columns and
    zeros in the others; `TwhinModel.embed` sums the T blocks. A fixed stride matters for row-wise sharded
    tables: their pooled outputs are reduce-scattered, which needs the same number of bags on every rank
    (a short last batch, or fewer global-negative lookups, would otherwise fail in the backward pass).
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = len(ids)
    stride = max(n, 1) if stride is None else stride
    if stride < n:
        raise ValueError(f"stride {stride} is smaller than the {n} lookups")
    order = torch.argsort(tables, stable=True)
    onehot = torch.zeros(len(keys), stride, dtype=torch.int32)
    onehot[tables, torch.arange(n)] = 1
    return KeyedJaggedTensor(keys=list(keys), values=ids[order], lengths=onehot.reshape(-1))


@dataclasses.dataclass
class TwhinBatch:
    """Edges, the rows they need and their negatives (a torchrec `Pipelineable`).

    Args:
        lookups: KeyedJaggedTensor of N bags, one id each (keys = table names); the pipelines move and
            all-to-all it ahead of the step.
        rel / lhs / rhs: [B] int64 relation index and row ids of each edge.
        lhs_index / rhs_index: [B] rows of the lookups holding each edge's lhs / rhs.
        neg_index: [B, S, K] rows of the lookups of each side's negatives.
        neg_mask: [B, S, K] bool, False for slots without a negative.
    """

    lookups: Any
    rel: torch.Tensor
    lhs: torch.Tensor
    rhs: torch.Tensor
    lhs_index: torch.Tensor
    rhs_index: torch.Tensor
    neg_index: torch.Tensor
    neg_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Edges (what train/examples_per_s counts)."""
        return int(self.rel.shape[0])

    def _apply(self, fn) -> TwhinBatch:
        return TwhinBatch(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> TwhinBatch:
        return self._apply(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> TwhinBatch:
        return self._apply(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).record_stream(stream)


class TwhinBatchBuilder:
    """EdgeBatch -> TwhinBatch with negatives (see the module docstring).

    Args:
        table_names: the T tables, KJT key order.
        relation_tables: per relation (lhs table index, rhs table index).
        table_rows: rows per table.
        in_batch / global_: negatives per side of each kind.
        sides: corrupted sides in order, from ("rhs", "lhs").
        seed / rank: with the batch index, the seed of every draw.
        batch_size: the most edges a batch holds (the rank's batch size): the lookups always have
            2 * batch_size + sides * relations * global_ bags, the same on every rank (see `lookup_kjt`).
    """

    def __init__(
        self,
        table_names: Sequence[str],
        relation_tables: Sequence[tuple[int, int]],
        table_rows: Sequence[int],
        in_batch: int,
        global_: int,
        sides: Sequence[str],
        seed: int,
        rank: int,
        batch_size: int | None = None,
    ) -> None:
        self.keys = list(table_names)
        self.lhs_table = torch.tensor([lhs for lhs, _ in relation_tables], dtype=torch.int64)
        self.rhs_table = torch.tensor([rhs for _, rhs in relation_tables], dtype=torch.int64)
        self.rows = torch.tensor(list(table_rows), dtype=torch.int64)
        self.in_batch, self.global_ = in_batch, global_
        self.sides = tuple(sides)
        self.seed, self.rank = seed, rank
        self.stride = None
        if batch_size is not None:
            self.stride = 2 * batch_size + len(self.sides) * len(relation_tables) * global_

    @property
    def num_negatives(self) -> int:
        return self.in_batch + self.global_

    def build(self, edges: EdgeBatch, index: int) -> TwhinBatch:
        generator = torch.Generator().manual_seed(hash_seed(self.seed, "negatives", self.rank, index))
        lhs, rel, rhs = edges.lhs, edges.rel, edges.rhs
        b = len(rel)
        tables = [self.lhs_table[rel], self.rhs_table[rel]]
        ids = [lhs, rhs]
        indices, masks = [], []
        next_row = 2 * b
        for side in self.sides:
            target = rhs if side == "rhs" else lhs
            table_of = self.rhs_table if side == "rhs" else self.lhs_table
            first = b if side == "rhs" else 0  # where this side's positives sit in the lookups
            index_parts, mask_parts = [], []
            if self.in_batch:
                others = self._in_batch(rel, generator)  # [B, k] edge indices, -1: none
                valid = others >= 0
                others = others.clamp(min=0)
                index_parts.append(first + others)
                mask_parts.append(valid & (target[others] != target.unsqueeze(1)))
            if self.global_:
                present = torch.unique(rel)
                base = torch.zeros(len(self.lhs_table), dtype=torch.int64)
                drawn = torch.zeros(len(self.lhs_table), self.global_, dtype=torch.int64)
                for r in present.tolist():
                    table = int(table_of[r])
                    drawn[r] = torch.randint(0, int(self.rows[table]), (self.global_,), generator=generator)
                    base[r] = next_row
                    tables.append(torch.full((self.global_,), table, dtype=torch.int64))
                    ids.append(drawn[r].clone())
                    next_row += self.global_
                index_parts.append(base[rel].unsqueeze(1) + torch.arange(self.global_))
                mask_parts.append(drawn[rel] != target.unsqueeze(1))
            indices.append(torch.cat(index_parts, dim=1))
            masks.append(torch.cat(mask_parts, dim=1))
        arange = torch.arange(b)
        return TwhinBatch(
            lookups=lookup_kjt(self.keys, torch.cat(tables), torch.cat(ids), self.stride),
            rel=rel,
            lhs=lhs,
            rhs=rhs,
            lhs_index=arange,
            rhs_index=arange + b,
            neg_index=torch.stack(indices, dim=1),
            neg_mask=torch.stack(masks, dim=1),
        )

    def _in_batch(self, rel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, in_batch] indices of the edges following each edge in a random cyclic order of its relation's
        edges; -1 where the relation has no more distinct edges."""
        b, k = len(rel), self.in_batch
        order = torch.argsort(torch.rand(b, generator=generator))
        order = order[torch.argsort(rel[order], stable=True)]  # grouped by relation, random within
        counts = torch.bincount(rel, minlength=len(self.lhs_table))
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty(b, dtype=torch.int64)
        position[order] = torch.arange(b) - starts[rel[order]]
        size = counts[rel].unsqueeze(1)
        step = torch.arange(1, k + 1).unsqueeze(0)
        others = order[starts[rel].unsqueeze(1) + (position.unsqueeze(1) + step) % size]
        return torch.where(step < size, others, torch.full_like(others, -1))


class TwhinBatches:
    """The training stream: the reader's EdgeBatch-es turned into TwhinBatch-es, resumable.

    Batches left empty by `offset` / `limit` are skipped. The checkpointed state is the reader's plus the
    count of batches yielded and the edge selection; the count maps the training loop's batch count to
    the reader position, and the reader position is the batch index that seeds the negatives.

    Args:
        dataset: the reader's ParquetDataset of EdgeBatch-es (this rank's share).
        builder: the TwhinBatchBuilder.
        selection: {"offset": ..., "limit": ...} of the edges read (checked on resume).
    """

    _MARKS = 4096  # (batches yielded, reader batches) pairs kept: far more than any loop prefetches

    def __init__(self, dataset, builder: TwhinBatchBuilder, selection: dict[str, int | None]) -> None:
        self.dataset, self.builder, self.selection = dataset, builder, dict(selection)
        self._start = 0  # batches yielded before the next resumed stream
        self._resume_next = False
        self._marks: collections.deque = collections.deque(maxlen=self._MARKS)

    @property
    def stats(self) -> dict[str, int]:
        return self.dataset.stats

    def __iter__(self) -> Iterator[TwhinBatch]:
        count = self._start if self._resume_next else 0
        self._resume_next = False
        stream = iter(self.dataset)
        position = int(self.dataset.state_dict()["position"]["batches"])
        self._marks.clear()
        self._marks.append((count, position))
        return self._batches(stream, count, position)

    def _batches(self, stream, count: int, position: int) -> Iterator[TwhinBatch]:
        epoch_batches = self.dataset.plan_epoch(0).num_batches(self.dataset.plan.batch_size)
        empty = 0
        for edges in stream:
            position += 1
            if edges.batch_size == 0:
                empty += 1
                if empty > epoch_batches:
                    raise ConfigError(
                        f"train_data offset/limit {self.selection} leave rank {self.dataset.plan.rank} no "
                        "edges for a whole epoch: select more edges, or fewer ranks"
                    )
                continue
            empty = 0
            count += 1
            self._marks.append((count, position))
            yield self.builder.build(edges, position - 1)

    def state_dict(self, batches: int | None = None) -> dict[str, Any]:
        """The state after `batches` yielded batches (None: all yielded so far)."""
        count, position = self._marks[-1] if self._marks else (0, None)
        if batches is not None and batches != count:
            found = [mark for mark in self._marks if mark[0] == batches]
            if not found:
                raise ValueError(f"batches {batches} is not among the last batches yielded ({count} so far)")
            count, position = found[0]
        return {
            "edges": self.dataset.state_dict(position),
            "batches": count,
            "selection": self.selection,
        }

    def load_state_dict(self, state: dict[str, Any], all_states: list[dict[str, Any]] | None = None) -> None:
        saved = state.get("selection") if isinstance(state, dict) else None
        if saved != self.selection:
            changed = [k for k in self.selection if (saved or {}).get(k) != self.selection[k]]
            raise ResumeError(
                f"reader state: train_data {', '.join(changed) or 'selection'} changed since the checkpoint "
                f"({saved} -> {self.selection}): the same edges must be read to resume"
            )
        others = [s["edges"] for s in all_states] if all_states is not None else None
        self.dataset.load_state_dict(state["edges"], others)
        self._start, self._resume_next = int(state["batches"]), True
