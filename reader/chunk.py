"""A block of decoded rows (one row group, or a shuffle window) and the row operations batching needs.

Shapes for a chunk of n rows: dense tensors [n, width], labels / weights [n, T], ids [n], and per sparse
feature flat values [N_f] with offsets [n + 1]. Slicing keeps views where it can; concatenation and
permutation copy.

Example:
    both = Chunk.concat([chunk_a, chunk_b])
    batch = both.slice(0, 512).to_batch(sparse_keys=["user_topics"])
"""

from __future__ import annotations

import dataclasses

import torch

from tml.reader.batch import RecapBatch
from tml.reader.sparse import build_kjt


@dataclasses.dataclass
class Chunk:
    """Decoded rows; `nonfinite` counts non-finite dense values met while decoding (per dense name)."""

    dense: dict[str, torch.Tensor]
    labels: torch.Tensor
    weights: torch.Tensor
    ids: dict[str, torch.Tensor]
    sparse_values: list[torch.Tensor]
    sparse_offsets: list[torch.Tensor]
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, start: int, stop: int) -> Chunk:
        if start == 0 and stop == self.num_rows:
            return self
        values, offsets = [], []
        for flat, offset in zip(self.sparse_values, self.sparse_offsets, strict=True):
            begin, end = int(offset[start]), int(offset[stop])
            values.append(flat[begin:end])
            offsets.append(offset[start : stop + 1] - begin)
        return Chunk(
            dense={name: tensor[start:stop] for name, tensor in self.dense.items()},
            labels=self.labels[start:stop],
            weights=self.weights[start:stop],
            ids={name: tensor[start:stop] for name, tensor in self.ids.items()},
            sparse_values=values,
            sparse_offsets=offsets,
        )

    def take(self, rows: torch.Tensor) -> Chunk:
        """Rows in the order of the int64 index tensor `rows`."""
        values, offsets = [], []
        for flat, offset in zip(self.sparse_values, self.sparse_offsets, strict=True):
            lengths = (offset[1:] - offset[:-1])[rows]
            new_offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=new_offsets[1:])
            # Position of every output value in `flat`: its row's old start plus its rank within the row.
            shift = torch.repeat_interleave(offset[:-1][rows] - new_offsets[:-1], lengths)
            values.append(flat[shift + torch.arange(int(new_offsets[-1]))])
            offsets.append(new_offsets)
        return Chunk(
            dense={name: tensor[rows] for name, tensor in self.dense.items()},
            labels=self.labels[rows],
            weights=self.weights[rows],
            ids={name: tensor[rows] for name, tensor in self.ids.items()},
            sparse_values=values,
            sparse_offsets=offsets,
        )

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        values, offsets = [], []
        for key in range(len(first.sparse_values)):
            values.append(torch.cat([chunk.sparse_values[key] for chunk in chunks]))
            parts, base = [torch.zeros(1, dtype=torch.int64)], 0
            for chunk in chunks:
                parts.append(chunk.sparse_offsets[key][1:] + base)
                base += int(chunk.sparse_offsets[key][-1])
            offsets.append(torch.cat(parts))
        return Chunk(
            dense={name: torch.cat([chunk.dense[name] for chunk in chunks]) for name in first.dense},
            labels=torch.cat([chunk.labels for chunk in chunks]),
            weights=torch.cat([chunk.weights for chunk in chunks]),
            ids={name: torch.cat([chunk.ids[name] for chunk in chunks]) for name in first.ids},
            sparse_values=values,
            sparse_offsets=offsets,
        )

    def to_batch(self, sparse_keys: list[str]) -> RecapBatch:
        sparse = None
        if sparse_keys:
            lengths = [offset[1:] - offset[:-1] for offset in self.sparse_offsets]
            sparse = build_kjt(sparse_keys, self.sparse_values, lengths)
        return RecapBatch(
            dense=self.dense, labels=self.labels, weights=self.weights, sparse=sparse, ids=self.ids
        )
