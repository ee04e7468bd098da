"""Use exported TwHIN vectors downstream: look them up by id or key, find nearest neighbours.

Reads what `tml-twhin export` wrote (tml.projects.twhin.export); needs neither torchrec nor a config.
Shapes: Q = queries, N = candidate rows, D = dim, k = neighbours.

Neighbours rank candidates of one table by `dot` (v . c) or `cos` (cosine). The torch path scores
`chunk_size` candidates at a time and keeps a running top-k, so memory stays at Q x (chunk_size + k);
with `pip install 'tml[faiss]'` the `faiss` backend (an exact inner-product index) does the same search.
`backend="auto"` uses FAISS when it is installed, torch otherwise. A query given by id or key of the table
it searches is left out of its own neighbours.

Example:
    emb = load("exports/local")
    emb.lookup("user", ids=[3, 7])                    # [2, D]
    emb.lookup("user", keys=["alice"])                # with a vocabulary
    result = emb.neighbors("user", ids=[3], k=10, among="tweet", metric="cos")
    result.ids, result.scores                         # [1, 10] each
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tml.core.errors import UserError
from tml.reader.fs import filesystem_for, open_input

FORMAT = "tml-twhin-embeddings"


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, D] float32 -> a fixed_size_list<float32>[D] array (what recap's dense features read)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


@dataclasses.dataclass
class Neighbors:
    """Top-k of each query: `ids` [Q, k] int64 rows of the searched table (best first), `scores` [Q, k],
    `keys` (with a vocabulary) the rows' keys, per query."""

    table: str
    ids: torch.Tensor
    scores: torch.Tensor
    keys: list[list[str | None]] | None = None


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class Embeddings:
    """The vectors of an export folder (see `load`); tables are read on first use and kept."""

    def __init__(self, path: str, manifest: dict) -> None:
        self.path, self.manifest = path, manifest
        self.tables = {t["name"]: t for t in manifest["tables"]}
        self.relations = {r["name"]: r for r in manifest["relations"]}
        self._vectors: dict[str, torch.Tensor] = {}
        self._keys: dict[str, pa.Array | None] = {}

    @property
    def dim(self) -> int:
        return next(iter(self.tables.values()))["embedding_dim"]

    def _table(self, name: str) -> dict:
        if name not in self.tables:
            raise UserError(
                f"export {self.path!r} has no table {name!r}; its tables are {sorted(self.tables)}"
            )
        return self.tables[name]

    def _read(self, name: str) -> None:
        table = self._table(name)
        fs, root = filesystem_for(self.path)
        folder = posixpath.join(root, name)
        files = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))
        rows, dim = table["num_embeddings"], table["embedding_dim"]
        vectors = torch.zeros(rows, dim, dtype=torch.float32)
        ids_parts, key_parts = [], []
        for path in files:
            with open_input(fs, path) as source:
                data = pq.read_table(source)
            ids = data.column("id").to_numpy().copy()  # writable, for torch
            flat = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors[torch.from_numpy(ids)] = torch.from_numpy(flat.reshape(len(ids), dim).copy())
            ids_parts.append(ids)
            if table["keys"]:
                key_parts.append(data.column("key").combine_chunks().cast(pa.large_string()))
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        if not np.array_equal(np.sort(ids), np.arange(rows)):
            raise UserError(
                f"export {self.path!r}: table {name!r} holds {len(ids)} rows in {folder}, expected ids 0..{rows - 1}"
            )
        self._vectors[name] = vectors
        keys = None
        if table["keys"]:
            keys = pa.concat_arrays(key_parts).take(pa.array(np.argsort(ids, kind="stable")))
        self._keys[name] = keys

    def vectors(self, table: str) -> torch.Tensor:
        """All rows [N, D] float32 of `table`."""
        if table not in self._vectors:
            self._read(table)
        return self._vectors[table]

    def keys(self, table: str) -> pa.Array | None:
        """The key of every row of `table` (None without a vocabulary; null for rows without a key)."""
        self.vectors(table)
        return self._keys[table]

    def ids_of(self, table: str, keys: Sequence[str] | pa.Array) -> torch.Tensor:
        """Rows [n] of `keys` (strings, or an Arrow string array) in `table`, -1 for a key it does not know."""
        known = self.keys(table)
        if known is None:
            raise UserError(
                f"export {self.path!r}: table {table!r} has ids only (it was trained without a vocabulary)"
            )
        keys = keys if isinstance(keys, pa.Array) else pa.array(list(keys), pa.large_string())
        rows = pc.index_in(keys.cast(pa.large_string()), value_set=known)
        return torch.from_numpy(rows.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))

    def _rows(self, table: str, ids, keys) -> torch.Tensor:
        if (ids is None) == (keys is None):
            raise UserError("give exactly one of ids / keys")
        if keys is not None:
            rows = self.ids_of(table, keys)
            missing = [k for k, r in zip(keys, rows.tolist(), strict=True) if r < 0]
            if missing:
                raise UserError(f"table {table!r} of {self.path!r} has no keys {missing[:5]}")
            return rows
        rows = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.int64).reshape(-1)
        count = self._table(table)["num_embeddings"]
        bad = rows[(rows < 0) | (rows >= count)]
        if len(bad):
            raise UserError(
                f"table {table!r} of {self.path!r} has rows [0, {count}); got ids {bad[:5].tolist()}"
            )
        return rows

    def lookup(self, table: str, ids=None, keys: Sequence[str] | None = None) -> torch.Tensor:
        """Vectors [n, D] of rows `ids` or of `keys` of `table`."""
        return self.vectors(table)[self._rows(table, ids, keys)]

    def neighbors(
        self,
        table: str,
        ids=None,
        keys: Sequence[str] | None = None,
        vectors: torch.Tensor | None = None,
        k: int = 10,
        among: str | None = None,
        metric: str = "dot",
        backend: str = "auto",
        chunk_size: int = 65536,
    ) -> Neighbors:
        """The k best rows of table `among` (default: `table`) for each query.

        Args:
            table: the queries' table (for ids / keys).
            ids / keys / vectors: the queries: rows or keys of `table`, or vectors [Q, D] (exactly one).
            k: neighbours per query (at most the candidates available).
            among: the searched table (default `table`).
            metric: "dot" or "cos".
            backend: "torch", "faiss" or "auto".
            chunk_size: candidates per scoring step of the torch backend.
        """
        if metric not in ("dot", "cos"):
            raise UserError(f"metric must be dot or cos, got {metric!r}")
        among = among or table
        given = [x is not None for x in (ids, keys, vectors)]
        if sum(given) != 1:
            raise UserError("give exactly one of ids / keys / vectors")
        self_rows = None
        if vectors is None:
            self_rows = self._rows(table, ids, keys)
            queries = self.vectors(table)[self_rows]
            if among != table:
                self_rows = None
        else:
            queries = torch.as_tensor(vectors, dtype=torch.float32).reshape(-1, self.dim)
        candidates = self.vectors(among)
        k = min(k, len(candidates) - (1 if self_rows is not None else 0))
        if k < 1:
            raise UserError(f"table {among!r} has no other rows to return")
        if backend == "auto":
            backend = "faiss" if faiss_available() else "torch"
        if backend == "faiss":
            scores, rows = _faiss_topk(queries, candidates, k, metric, self_rows)
        elif backend == "torch":
            scores, rows = _torch_topk(queries, candidates, k, metric, self_rows, chunk_size)
        else:
            raise UserError(f"backend must be auto, torch or faiss, got {backend!r}")
        known = self.keys(among)
        names = None
        if known is not None:
            names = [known.take(pa.array(row.tolist())).to_pylist() for row in rows]
        return Neighbors(among, rows, scores, names)


def _normalized(x: torch.Tensor, metric: str) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-8) if metric == "cos" else x


def _torch_topk(queries, candidates, k, metric, self_rows, chunk_size):
    """Exact top-k over `candidates` in chunks: a running [Q, k] best list merged with each chunk's top-k."""
    q = _normalized(queries, metric)
    best_scores = torch.full((len(q), 0), float("-inf"))
    best_rows = torch.zeros((len(q), 0), dtype=torch.int64)
    for start in range(0, len(candidates), chunk_size):
        block = _normalized(candidates[start : start + chunk_size], metric)
        scores = q @ block.T
        if self_rows is not None:
            inside = (self_rows >= start) & (self_rows < start + len(block))
            scores[torch.nonzero(inside).squeeze(1), self_rows[inside] - start] = float("-inf")
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_rows = keep.values, torch.gather(merged_rows, 1, keep.indices)
    return best_scores, best_rows


def _faiss_topk(queries, candidates, k, metric, self_rows):
    try:
        import faiss
    except ImportError as error:
        raise UserError("backend 'faiss' needs FAISS: pip install 'tml[faiss]'") from error
    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(_normalized(candidates, metric).numpy().astype(np.float32))
    extra = 1 if self_rows is not None else 0
    scores, rows = index.search(_normalized(queries, metric).numpy().astype(np.float32), k + extra)
    scores, rows = torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64))
    if self_rows is not None:
        # Drop each query's own row (or, when it is not among the results, the last one).
        own = rows == self_rows.unsqueeze(1)
        own[:, -1] |= ~own.any(1)
        keep = ~own
        scores = scores[keep].reshape(len(rows), k)
        rows = rows[keep].reshape(len(rows), k)
    return scores, rows


def load(path: str) -> Embeddings:
    """The export folder at `path` (local or fsspec URL), checked to be a complete TwHIN export."""
    fs, root = filesystem_for(path)
    manifest_path = posixpath.join(root, "manifest.json")
    if not fs.exists(manifest_path):
        raise FileNotFoundError(
            f"export {path!r} has no manifest.json: not a (complete) `tml-twhin export` folder"
        )
    with fs.open(manifest_path, "r") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise UserError(f"export {path!r}: manifest.json is not a TwHIN export ({manifest.get('format')!r})")
    return Embeddings(path, manifest)
