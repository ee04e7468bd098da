"""Embedding inputs of the recap model: small tables over `discrete` columns, TorchRec embedding bags over
`batch.sparse`, the position-debias embedding and the LayerNorm-ed dense vectors (TwHIN).

TorchRec is imported only inside `LargeEmbeddings`, so dense-only models run on a bare torch.

Shapes: B = batch, K = discrete width, E = an embedding dim, N = number of vectors.

Example:
    small = SmallEmbeddings([SmallTable("author_type", num_embeddings=10, embedding_dim=4, index=2)])
    small(torch.randint(0, 20, (8, 5)))  # {"author_type": [8, 4]}; ids outside [0, 10) use row 10
"""

from __future__ import annotations

import dataclasses

import fsspec
import torch
from torch import nn

from tml.core.config.loader import ConfigError
from tml.projects.home.recap.model.mlp import LayerNorm


def _reserve_unknown(ids: torch.Tensor, num_valid: int) -> torch.Tensor:
    # Ids the table has no row for (new categories, -1 for missing) share one extra row instead of crashing.
    return torch.where((ids >= 0) & (ids < num_valid), ids, torch.full_like(ids, num_valid))


@dataclasses.dataclass(frozen=True)
class SmallTable:
    name: str
    num_embeddings: int
    embedding_dim: int
    index: int


class SmallEmbeddings(nn.Module):
    """One nn.Embedding(num_embeddings + 1, E) per table over column `index` of `discrete` [B, K].

    Row num_embeddings is reserved for ids outside [0, num_embeddings).

    Args:
        tables: the tables.

    Shapes: [B, K] int -> {table name: [B, E]}.
    """

    def __init__(self, tables: list[SmallTable]) -> None:
        super().__init__()
        self.tables = list(tables)
        self.embeddings = nn.ModuleDict(
            {t.name: nn.Embedding(t.num_embeddings + 1, t.embedding_dim) for t in self.tables}
        )
        self.layout = [(t.name, t.embedding_dim) for t in self.tables]

    def forward(self, discrete: torch.Tensor) -> dict[str, torch.Tensor]:
        discrete = discrete.long()
        return {
            t.name: self.embeddings[t.name](_reserve_unknown(discrete[:, t.index], t.num_embeddings))
            for t in self.tables
        }


class PositionDebias(nn.Module):
    """Learned embedding of the display position, so the rest of the model need not explain position bias.

    Positions in [0, max_position) have their own row; anything else (and every dropped position) uses the
    "unknown" row max_position. In training each example's position is dropped to unknown with probability
    drop_probability; in eval mode every position is unknown, so predictions are position-neutral.

    Args:
        max_position: number of learned positions.
        num_dims: E.
        drop_probability: training-time drop rate.
        position_feature_index: column of `discrete` holding the position.

    Shapes: [B, K] int -> [B, E].
    """

    def __init__(
        self, max_position: int, num_dims: int, drop_probability: float, position_feature_index: int
    ) -> None:
        super().__init__()
        self.max_position = max_position
        self.drop_probability = drop_probability
        self.position_feature_index = position_feature_index
        self.embedding = nn.Embedding(max_position + 1, num_dims)
        self.out_features = num_dims

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        positions = _reserve_unknown(discrete[:, self.position_feature_index].long(), self.max_position)
        if not self.training:
            positions = torch.full_like(positions, self.max_position)
        elif self.drop_probability > 0:
            drop = torch.rand(positions.shape, device=positions.device) < self.drop_probability
            positions = torch.where(drop, torch.full_like(positions, self.max_position), positions)
        return self.embedding(positions)


class DenseVectorNorms(nn.Module):
    """LayerNorm each named dense vector separately (the production model does this to the TwHIN vectors).

    Args:
        widths: (name, width) of each vector.
        layer_norm: False passes the vectors through unchanged.

    Shapes: {name: [B, width]} -> {name: [B, width]}.
    """

    def __init__(self, widths: list[tuple[str, int]], layer_norm: bool) -> None:
        super().__init__()
        self.layout = list(widths)
        self.norms = nn.ModuleDict({name: LayerNorm(w) for name, w in widths}) if layer_norm else None

    def forward(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, _ in self.layout:
            x = dense[name].float()
            out[name] = self.norms[name](x) if self.norms is not None else x
        return out


@dataclasses.dataclass(frozen=True)
class LargeTable:
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    pooling: str = "sum"
    pretrained_uri: str | None = None
    pretrained_name: str | None = None


def read_pretrained(uri: str, emb_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Read tensor `emb_name` from a torch.save'd dict at `uri`, checking its shape."""
    with fsspec.open(uri, "rb") as f:
        data = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or emb_name not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{uri}: no tensor {emb_name!r} (pretrained.emb_name); found {keys}")
    tensor = data[emb_name]
    if tuple(tensor.shape) != tuple(shape):
        raise ConfigError(
            f"{uri}: {emb_name!r} has shape {tuple(tensor.shape)}, the table needs {shape} "
            "(pretrained.emb_name, num_embeddings x embedding_dim)"
        )
    return tensor


class LargeEmbeddings(nn.Module):
    """A TorchRec EmbeddingBagCollection over `batch.sparse`; one pooled vector per sparse feature.

    Args:
        tables: table specs (feature_names: the KJT keys each table embeds).
        device: where to allocate the tables ("meta" lets the core shard before allocating).

    Shapes: KeyedJaggedTensor (batch B) -> {feature name: [B, E]}.

    Example:
        emb = LargeEmbeddings([LargeTable("user", 100, 8, ("user_id",))])
    """

    def __init__(self, tables: list[LargeTable], device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        self.tables = list(tables)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    feature_names=list(t.feature_names),
                    pooling=pooling[t.pooling],
                )
                for t in self.tables
            ],
            device=torch.device(device),
        )
        self.layout = [(f, t.embedding_dim) for t in self.tables for f in t.feature_names]
        if torch.device(device).type != "meta":
            self.load_pretrained()

    def load_pretrained(self) -> None:
        """Copy the pretrained rows into the tables that name a file (call again after materialising)."""
        for t in self.tables:
            if t.pretrained_uri is None:
                continue
            assert t.pretrained_name is not None
            weight = self.ebc.embedding_bags[t.name].weight
            rows = read_pretrained(t.pretrained_uri, t.pretrained_name, (t.num_embeddings, t.embedding_dim))
            with torch.no_grad():
                weight.copy_(rows.to(weight.dtype))

    def forward(self, sparse) -> dict[str, torch.Tensor]:
        return self.ebc(sparse).to_dict()
