"""DLRM (Naumov et al. 2019, arXiv 1906.00091): bottom MLP on dense features, pairwise dot interactions
between the bottom output and every embedding vector, top MLP on [bottom output, interactions].

The input is one flat tensor whose last N*E columns are the N embedding vectors (the recap model puts the
embedding segments last), so DLRM plugs in wherever a [B, F] -> [B, D] module does.

Shapes: B = batch, F = dense width + N*E, N = embedding vectors, E = embedding dim, D = top MLP width.

Example:
    net = Dlrm(dense_width=6, num_vectors=2, embedding_dim=4, bottom_mlp=Mlp(6, [4]),
               top_mlp=Mlp(4 + 3, [1]))
    net(torch.randn(5, 6 + 2 * 4)).shape  # (5, 1)
"""

from __future__ import annotations

import torch
from torch import nn


def num_interactions(num_vectors: int) -> int:
    """Pairwise dots among the bottom output and `num_vectors` embeddings (diagonal excluded)."""
    n = num_vectors + 1
    return n * (n - 1) // 2


class Dlrm(nn.Module):
    """Bottom MLP, dot interactions, top MLP.

    Args:
        dense_width: width of the leading dense part of the input.
        num_vectors: N embedding vectors at the end of the input.
        embedding_dim: E; the bottom MLP must output E.
        bottom_mlp: [B, dense_width] -> [B, E].
        top_mlp: [B, E + num_interactions(N)] -> [B, D].

    Shapes: [B, dense_width + N*E] -> [B, D].

    Example: see the module docstring.
    """

    def __init__(
        self,
        dense_width: int,
        num_vectors: int,
        embedding_dim: int,
        bottom_mlp: nn.Module,
        top_mlp: nn.Module,
    ) -> None:
        super().__init__()
        assert bottom_mlp.out_features == embedding_dim, "bottom MLP must output the embedding dim"
        self.dense_width = dense_width
        self.num_vectors = num_vectors
        self.embedding_dim = embedding_dim
        self.bottom_mlp = bottom_mlp
        self.top_mlp = top_mlp
        rows, cols = torch.triu_indices(num_vectors + 1, num_vectors + 1, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.in_features = dense_width + num_vectors * embedding_dim
        self.out_features = top_mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom_mlp(x[:, : self.dense_width])
        # unflatten, not reshape: always a view, so an exported program does not specialise the batch size.
        vectors = x[:, self.dense_width :].unflatten(1, (self.num_vectors, self.embedding_dim))
        stacked = torch.cat([bottom.unsqueeze(1), vectors], dim=1)  # [B, N+1, E]
        dots = torch.bmm(stacked, stacked.transpose(1, 2))  # [B, N+1, N+1]
        interactions = dots[:, self._rows, self._cols]
        return self.top_mlp(torch.cat([bottom, interactions], dim=1))
