"""Feature samplers of the synthetic recap data: realistic-looking values plus what the label model sees.

Each block draws one group of columns for n rows (N = rows, C = columns of the block, K = latent dim):
- `ContinuousBlock` [N, C] float32: heavy-tailed counts (zero-inflated), positive and signed values of
  varied scales, a few NaN; `signal(x)` gives sign(x) * log1p(|x|) of its informative columns, NaN -> 0.
- `BinaryBlock` [N, C] 0/1 with varied base rates; `signal` is the centred informative bits.
- `DiscreteBlock` [N, C] int64 categories in [0, cardinality) (cardinality <= 100), Zipf-like.
- `EmbeddingBlock` [N, D] float32 unit-variance vectors (a stand-in for TwHIN embeddings).
- `IdColumn` [N] int64 ids in [0, vocab), a few ids are very popular (power law), scrambled.
- `SparseContinuousBlock`: per row a few distinct (id, value) pairs, ids power-law popular, values
  zero-inflated heavy-tailed counts; `signal` gives, for its most popular ids, `0.5 + log1p(value)` when
  present and 0 when absent (so a present 0 differs from an absent id).
Continuous, binary and embedding blocks are correlated through a per-row latent `h` [N, K], like real
features that share causes. Only the informative columns (a subset, within the part the model reads after
truncation) enter the label function; the rest is noise.

Example:
    block = ContinuousBlock.create(np.random.default_rng(0), width=64, visible=64)
    x = block.sample(rng, h)        # [N, 64] float32, with NaN
    phi = block.signal(x)           # [N, len(block.informative)]
"""

from __future__ import annotations

import dataclasses

import numpy as np

LATENT_DIM = 8
MAX_INFORMATIVE = 32
MAX_CARDINALITY = 100


def _informative(rng: np.random.Generator, visible: np.ndarray, limit: int) -> np.ndarray:
    """A sorted random subset of the visible column indices (those the model can read)."""
    count = min(len(visible), limit)
    return np.sort(rng.choice(visible, size=count, replace=False))


def _mix(rng: np.random.Generator, h: np.ndarray, loadings: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """[N, C] standard normals, column j correlated with `h @ loadings[:, j]` by rho[j]."""
    noise = rng.standard_normal((h.shape[0], loadings.shape[1]), dtype=np.float32)
    noise *= np.sqrt(1.0 - rho**2).astype(np.float32)
    noise += (h @ loadings) * rho
    return noise


def _unit_loadings(rng: np.random.Generator, width: int) -> np.ndarray:
    loadings = rng.standard_normal((LATENT_DIM, width)).astype(np.float32)
    return loadings / np.linalg.norm(loadings, axis=0, keepdims=True)


@dataclasses.dataclass
class ContinuousBlock:
    """Heavy-tailed real-valued columns; kind 0 = count, 1 = positive real, 2 = signed real."""

    kind: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    zero_rate: np.ndarray
    nan_rate: np.ndarray
    rho: np.ndarray
    loadings: np.ndarray
    informative: np.ndarray

    @classmethod
    def create(cls, rng: np.random.Generator, width: int, visible: np.ndarray) -> ContinuousBlock:
        kind = rng.choice(3, size=width, p=[0.6, 0.25, 0.15])
        # Log-scales from ~1 to ~1e5 so that raw values span many orders of magnitude across columns.
        mu = np.where(kind == 0, rng.uniform(0.0, 8.0, width), rng.uniform(-3.0, 6.0, width))
        has_nan = rng.random(width) < 0.3
        return cls(
            kind=kind,
            mu=mu.astype(np.float32),
            sigma=rng.uniform(0.5, 2.0, width).astype(np.float32),
            zero_rate=np.where(kind == 0, rng.uniform(0.0, 0.5, width), 0.0).astype(np.float32),
            nan_rate=np.where(has_nan, rng.uniform(0.001, 0.05, width), 0.0).astype(np.float32),
            rho=rng.uniform(0.0, 0.8, width).astype(np.float32),
            loadings=_unit_loadings(rng, width),
            informative=_informative(rng, visible, MAX_INFORMATIVE),
        )

    def sample(self, rng: np.random.Generator, h: np.ndarray) -> np.ndarray:
        x = _mix(rng, h, self.loadings, self.rho)
        x *= self.sigma
        x += self.mu
        np.exp(x, out=x)
        # Signed columns: sinh(sigma z) e^mu = (E - e^(2 mu) / E) / 2 with E = e^(sigma z + mu).
        signed = np.flatnonzero(self.kind == 2)
        x[:, signed] = 0.5 * (x[:, signed] - np.exp(2 * self.mu[signed]) / x[:, signed])
        np.copyto(x, np.floor(x), where=self.kind == 0)
        u = rng.random(x.shape, dtype=np.float32)
        x[u < self.nan_rate + self.zero_rate] = 0.0
        x[u < self.nan_rate] = np.nan
        return x

    def signal(self, x: np.ndarray) -> np.ndarray:
        picked = x[:, self.informative]
        return np.nan_to_num(np.sign(picked) * np.log1p(np.abs(picked)), nan=0.0)


@dataclasses.dataclass
class BinaryBlock:
    """0/1 columns with base rates from 0.5% to 50%, correlated with the latent `h`."""

    logit: np.ndarray
    strength: np.ndarray
    loadings: np.ndarray
    informative: np.ndarray

    @classmethod
    def create(cls, rng: np.random.Generator, width: int, visible: np.ndarray) -> BinaryBlock:
        rate = np.exp(rng.uniform(np.log(0.005), np.log(0.5), width))
        return cls(
            logit=np.log(rate / (1 - rate)).astype(np.float32),
            strength=rng.uniform(0.0, 1.5, width).astype(np.float32),
            loadings=_unit_loadings(rng, width),
            informative=_informative(rng, visible, MAX_INFORMATIVE),
        )

    def sample(self, rng: np.random.Generator, h: np.ndarray) -> np.ndarray:
        logits = (h @ self.loadings) * self.strength + self.logit
        return (rng.random(logits.shape, dtype=np.float32) * (1 + np.exp(-logits)) < 1).astype(np.int64)

    def signal(self, x: np.ndarray) -> np.ndarray:
        return x[:, self.informative] - 0.5


@dataclasses.dataclass
class DiscreteBlock:
    """Categorical int columns; values have Zipf-like frequencies."""

    cardinality: np.ndarray
    skew: np.ndarray
    informative: np.ndarray

    @classmethod
    def create(cls, rng: np.random.Generator, width: int, visible: np.ndarray) -> DiscreteBlock:
        cardinality = np.exp(rng.uniform(np.log(2), np.log(MAX_CARDINALITY), width)).astype(np.int64)
        return cls(
            cardinality=cardinality,
            skew=rng.uniform(1.0, 3.0, width).astype(np.float32),
            informative=_informative(rng, visible, 8),
        )

    def sample(self, rng: np.random.Generator, h: np.ndarray) -> np.ndarray:
        u = rng.random((h.shape[0], len(self.cardinality)), dtype=np.float32)
        return np.minimum((u**self.skew * self.cardinality).astype(np.int64), self.cardinality - 1)


@dataclasses.dataclass
class EmbeddingBlock:
    """A dense vector per row; half of its variance comes from the latent `h`."""

    projection: np.ndarray

    @classmethod
    def create(cls, rng: np.random.Generator, width: int) -> EmbeddingBlock:
        return cls(projection=_unit_loadings(rng, width))

    def sample(self, rng: np.random.Generator, h: np.ndarray) -> np.ndarray:
        return _mix(rng, h, self.projection, np.full(self.projection.shape[1], 0.7, dtype=np.float32))

    def signal(self, x: np.ndarray) -> np.ndarray:
        return x


@dataclasses.dataclass
class IdColumn:
    """Power-law distributed ids in [0, vocab), scrambled so popular ids are not the small numbers."""

    vocab: int
    multiplier: int
    offset: int

    @classmethod
    def create(cls, rng: np.random.Generator, vocab: int) -> IdColumn:
        multiplier = int(rng.integers(1, vocab)) if vocab > 1 else 1
        while np.gcd(multiplier, vocab) != 1:
            multiplier += 1
        return cls(vocab=vocab, multiplier=multiplier, offset=int(rng.integers(0, vocab)))

    def sample(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        rank = (rng.random(rows) ** 3 * self.vocab).astype(np.int64)
        return self.id_of_rank(rank)

    def id_of_rank(self, rank: np.ndarray) -> np.ndarray:
        """The id of each popularity rank (0 = most popular)."""
        # An affine map with a multiplier coprime to vocab is a bijection on [0, vocab).
        return (rank * self.multiplier + self.offset) % self.vocab

    def popularity_rank(self) -> np.ndarray:
        """[vocab]: the popularity rank of each id."""
        ranks = np.arange(self.vocab, dtype=np.int64)
        out = np.empty(self.vocab, dtype=np.int64)
        out[self.id_of_rank(ranks)] = ranks
        return out


@dataclasses.dataclass
class SparseContinuousBlock:
    """Sparse (id -> value) features of one column (module docstring)."""

    ids: IdColumn
    mean_entries: float
    mu: np.ndarray
    sigma: np.ndarray
    zero_rate: np.ndarray
    rho: np.ndarray
    loadings: np.ndarray
    informative: np.ndarray  # ids whose values enter the label function

    @classmethod
    def create(cls, rng: np.random.Generator, vocab: int) -> SparseContinuousBlock:
        ids = IdColumn.create(rng, vocab)
        return cls(
            ids=ids,
            mean_entries=float(rng.uniform(3.0, 8.0)),
            mu=rng.uniform(0.0, 6.0, vocab).astype(np.float32),
            sigma=rng.uniform(0.5, 1.5, vocab).astype(np.float32),
            zero_rate=rng.uniform(0.0, 0.3, vocab).astype(np.float32),
            rho=rng.uniform(0.2, 0.8, vocab).astype(np.float32),
            loadings=_unit_loadings(rng, vocab),
            informative=ids.id_of_rank(np.arange(min(vocab, MAX_INFORMATIVE))),
        )

    def sample(self, rng: np.random.Generator, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets [N + 1], ids [E], values [E] float32): distinct ids within each row, sorted."""
        rows = h.shape[0]
        draws = np.minimum(rng.poisson(self.mean_entries, rows), int(4 * self.mean_entries))
        row = np.repeat(np.arange(rows), draws)
        ids = self.ids.sample(rng, len(row))
        pairs = np.unique(row.astype(np.int64) * self.ids.vocab + ids)
        row, ids = pairs // self.ids.vocab, pairs % self.ids.vocab
        z = rng.standard_normal(len(ids)).astype(np.float32)
        z = (
            self.rho[ids] * np.einsum("ek,ke->e", h[row], self.loadings[:, ids])
            + np.sqrt(1 - self.rho[ids] ** 2) * z
        )
        values = np.floor(np.exp(self.mu[ids] + self.sigma[ids] * z)).astype(np.float32)
        values[rng.random(len(ids)) < self.zero_rate[ids]] = 0.0
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=rows), out=offsets[1:])
        return offsets, ids, values

    def signal(self, sample: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        offsets, ids, values = sample
        out = np.zeros((len(offsets) - 1, len(self.informative)), dtype=np.float32)
        column = np.full(self.ids.vocab, -1, dtype=np.int64)
        column[self.informative] = np.arange(len(self.informative))
        row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        hit = column[ids] >= 0
        out[row[hit], column[ids[hit]]] = 0.5 + np.log1p(values[hit])
        return out
