"""A block of decoded rows (one row group, or a shuffle window) and the row operations batching needs.

A `TensorChunk` of n rows holds named tensors whose first dimension is n ([n], [n, width], ...) and named
jagged columns, each flat values [N] with offsets [n + 1] (row i owns values[offsets[i]:offsets[i + 1]]).
It implements the `Chunk` protocol of tml.reader.decoder for any decoder. Slicing keeps views where it
can; concatenation and `take` copy.

Example:
    chunk = TensorChunk(3, {"label": torch.tensor([0.0, 1.0, 1.0])},
                        {"tags": (torch.tensor([7, 8, 9]), torch.tensor([0, 2, 2, 3]))})
    both = TensorChunk.concat([chunk, chunk])   # 6 rows
    first = both.slice(0, 4).take(torch.tensor([3, 0]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import torch


@dataclasses.dataclass
class TensorChunk:
    """Decoded rows.

    Args:
        num_rows: n.
        tensors: key -> tensor [n, ...].
        jagged: key -> (values [N], offsets [n + 1] int64).
    """

    num_rows: int
    tensors: dict[Hashable, torch.Tensor]
    jagged: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def slice(self, start: int, stop: int) -> TensorChunk:
        if start == 0 and stop == self.num_rows:
            return self
        jagged = {}
        for key, (values, offsets) in self.jagged.items():
            begin, end = int(offsets[start]), int(offsets[stop])
            jagged[key] = (values[begin:end], offsets[start : stop + 1] - begin)
        tensors = {key: tensor[start:stop] for key, tensor in self.tensors.items()}
        return TensorChunk(stop - start, tensors, jagged)

    def take(self, rows: torch.Tensor) -> TensorChunk:
        # index_select, not tensor[rows]: advanced indexing is 3-7x slower on CPU for these shapes, and this
        # gather is a third of the reader's time when shuffling (benchmarks/RESULTS.md, "End to end").
        jagged = {}
        for key, (values, offsets) in self.jagged.items():
            width = _fixed_width(values, offsets)
            if width is not None:  # every row holds `width` values (a scalar id column: 1): a row gather
                picked = values.reshape(-1, width).index_select(0, rows).reshape(-1) if width else values[:0]
                jagged[key] = (picked, torch.arange(len(rows) + 1) * width)
                continue
            starts = offsets[:-1].index_select(0, rows)
            lengths = offsets[1:].index_select(0, rows) - starts
            new_offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=new_offsets[1:])
            # Position of every output value in `values`: its row's old start plus its rank within the row.
            shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths)
            positions = shift + torch.arange(int(new_offsets[-1]))
            jagged[key] = (values.index_select(0, positions), new_offsets)
        tensors = {key: tensor.index_select(0, rows) for key, tensor in self.tensors.items()}
        return TensorChunk(len(rows), tensors, jagged)

    @classmethod
    def concat(cls, chunks: Sequence[TensorChunk]) -> TensorChunk:
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        jagged = {}
        for key in first.jagged:
            parts, base = [torch.zeros(1, dtype=torch.int64)], 0
            for chunk in chunks:
                offsets = chunk.jagged[key][1]
                parts.append(offsets[1:] + base)
                base += int(offsets[-1])
            jagged[key] = (torch.cat([chunk.jagged[key][0] for chunk in chunks]), torch.cat(parts))
        tensors = {key: torch.cat([chunk.tensors[key] for chunk in chunks]) for key in first.tensors}
        return cls(sum(chunk.num_rows for chunk in chunks), tensors, jagged)


def _fixed_width(values: torch.Tensor, offsets: torch.Tensor) -> int | None:
    """The number of values every row holds when it is the same for all rows (and there are rows), else None.

    The general jagged gather costs about 2 ms per 16k-row window (five passes and a repeat_interleave);
    most sparse id columns hold one id per row, for which a row gather gives the same result.
    """
    rows = len(offsets) - 1
    if rows == 0 or len(values) % rows:
        return None
    width = len(values) // rows
    lengths = offsets[1:] - offsets[:-1]
    return width if bool((lengths == width).all()) else None
