"""Synthetic TwHIN edges drawn from a latent-factor graph, so that link prediction has something to learn.

Every entity (row of an entity table) gets a latent vector: the centroid of one of `num_communities` shared
communities plus noise, and a popularity bias. An edge (u, r, v) of relation r is likely when
`z_u . (z_v + t_r) + b_v` is large, the score TwHIN itself uses (translation operator), with `t_r` a
per-relation vector. Edges are sampled by picking the relation and u uniformly, then v by a softmax of that
score over `num_candidates` random rows of the rhs table (a sampled softmax keeps the cost O(edges)).

Output: Parquet files `part-NNNNN.parquet` with int64 columns `lhs`, `rel` (index into `relations`), `rhs`
(row ids in the relation's lhs / rhs table). `generate_splits` draws once, drops repeated edges and deals
the rest at random into disjoint splits (train / valid / test), optionally as string keys
(`<table>-<id>`, for the vocabulary path).

Example:
    generate_edges({"user": 1000, "tweet": 500}, [("fav", "user", "tweet"), ("follow", "user", "user")],
                   num_edges=100_000, output_dir="/tmp/twhin")
    generate_splits(tables, relations, {"train": 90_000, "valid": 5_000}, "/tmp/twhin")  # train/, valid/
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_CHUNK = 65536


@dataclasses.dataclass
class LatentGraph:
    """The hidden model the edges are drawn from (D = latent dim).

    Args:
        factors: table name -> [rows, D] float32 latent vectors.
        biases: table name -> [rows] float32 popularity of being an edge's rhs.
        translations: [num_relations, D] float32 per-relation vectors.
    """

    factors: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    translations: np.ndarray

    def score(self, lhs: np.ndarray, rel: np.ndarray, rhs: np.ndarray, relations: list) -> np.ndarray:
        """Latent score of edges [E] (lhs, rel, rhs int arrays); higher means likelier."""
        out = np.empty(len(lhs), dtype=np.float32)
        for index, (_, lhs_table, rhs_table) in enumerate(relations):
            mask = rel == index
            u = self.factors[lhs_table][lhs[mask]]
            v = self.factors[rhs_table][rhs[mask]] + self.translations[index]
            out[mask] = np.einsum("ed,ed->e", u, v) + self.biases[rhs_table][rhs[mask]]
        return out


def _check(num_entities: dict[str, int], relations: list, num_edges: int, num_files: int) -> None:
    for table, rows in num_entities.items():
        if int(rows) < 1:
            raise ValueError(f"num_entities[{table!r}] must be >= 1, got {rows}")
    for relation in relations:
        if len(relation) != 3:
            raise ValueError(f"each relation must be (name, lhs_table, rhs_table), got {relation!r}")
        name, lhs_table, rhs_table = relation
        for side, table in (("lhs", lhs_table), ("rhs", rhs_table)):
            if table not in num_entities:
                raise ValueError(
                    f"relation {name!r}: {side} table {table!r} is not in num_entities "
                    f"({sorted(num_entities)})"
                )
    if not relations:
        raise ValueError("relations must not be empty")
    if num_edges < 0 or num_files < 1:
        raise ValueError(f"need num_edges >= 0 and num_files >= 1, got {num_edges} and {num_files}")


def latent_graph(
    num_entities: dict[str, int],
    num_relations: int,
    seed: int = 0,
    dim: int = 16,
    num_communities: int = 32,
) -> LatentGraph:
    """Build the latent model `generate_edges` uses for this seed (deterministic)."""
    rng = np.random.default_rng([seed, 0])
    # Scaled so that two members of one community have a dot product of about 4 and strangers about 0:
    # strong enough for the sampled softmax to prefer them, noisy enough that the graph is not trivial.
    centroids = rng.normal(0.0, 2.0 / np.sqrt(dim), size=(num_communities, dim))
    factors, biases = {}, {}
    for table in sorted(num_entities):
        rows = int(num_entities[table])
        community = rng.integers(0, num_communities, size=rows)
        noise = rng.normal(0.0, 0.7 / np.sqrt(dim), size=(rows, dim))
        factors[table] = (centroids[community] + noise).astype(np.float32)
        biases[table] = rng.normal(0.0, 0.75, size=rows).astype(np.float32)
    translations = rng.normal(0.0, 0.5 / np.sqrt(dim), size=(num_relations, dim)).astype(np.float32)
    return LatentGraph(factors, biases, translations)


def _sample_chunk(
    rng: np.random.Generator, graph: LatentGraph, relations: list, size: int, num_candidates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rel = rng.integers(0, len(relations), size=size)
    lhs = np.empty(size, dtype=np.int64)
    rhs = np.empty(size, dtype=np.int64)
    for index, (_, lhs_table, rhs_table) in enumerate(relations):
        mask = np.flatnonzero(rel == index)
        lhs_rows = len(graph.factors[lhs_table])
        rhs_factors, rhs_bias = graph.factors[rhs_table], graph.biases[rhs_table]
        u = rng.integers(0, lhs_rows, size=len(mask))
        candidates = rng.integers(0, len(rhs_factors), size=(len(mask), num_candidates))
        query = graph.factors[lhs_table][u]
        logits = np.einsum("ed,ecd->ec", query, rhs_factors[candidates] + graph.translations[index])
        logits += rhs_bias[candidates]
        # Gumbel-max draws one candidate per edge from softmax(logits) without a per-row loop.
        gumbel = -np.log(-np.log(rng.random(logits.shape)))
        pick = np.argmax(logits + gumbel, axis=1)
        lhs[mask] = u
        rhs[mask] = candidates[np.arange(len(mask)), pick]
    return lhs, rel.astype(np.int64), rhs


def generate_edges(
    num_entities: dict[str, int],
    relations: list[tuple[str, str, str]],
    num_edges: int,
    output_dir: str,
    seed: int = 0,
    num_files: int = 2,
    num_candidates: int = 64,
) -> None:
    """Write `num_edges` edges as `num_files` Parquet files under `output_dir` (same seed, same files).

    Args:
        num_entities: entity table name -> number of rows.
        relations: (name, lhs_table, rhs_table) per relation; `rel` is the index in this list.
        num_edges: total edges over all files.
        output_dir: created if missing.
        seed: everything (latent model and edges) derives from it.
        num_files: shards `part-00000.parquet` ...
        num_candidates: rhs rows the sampled softmax chooses among (more: sharper communities).
    """
    _check(num_entities, relations, num_edges, num_files)
    graph = latent_graph(num_entities, len(relations), seed)
    os.makedirs(output_dir, exist_ok=True)
    schema = pa.schema([("lhs", pa.int64()), ("rel", pa.int64()), ("rhs", pa.int64())])
    for file_index in range(num_files):
        rows = num_edges // num_files + (1 if file_index < num_edges % num_files else 0)
        rng = np.random.default_rng([seed, 1, file_index])
        path = os.path.join(output_dir, f"part-{file_index:05d}.parquet")
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, rows, _CHUNK):
                lhs, rel, rhs = _sample_chunk(
                    rng, graph, relations, min(_CHUNK, rows - start), num_candidates
                )
                writer.write_table(pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}, schema=schema))
            if rows == 0:
                writer.write_table(schema.empty_table())


def _write_files(columns: dict[str, np.ndarray | pa.Array], output_dir: str, num_files: int) -> None:
    os.makedirs(output_dir, exist_ok=True)
    table = pa.table(columns)
    for file_index in range(num_files):
        start = table.num_rows * file_index // num_files
        stop = table.num_rows * (file_index + 1) // num_files
        path = os.path.join(output_dir, f"part-{file_index:05d}.parquet")
        pq.write_table(table.slice(start, stop - start), path, row_group_size=_CHUNK)


def generate_splits(
    num_entities: dict[str, int],
    relations: list[tuple[str, str, str]],
    split_edges: dict[str, int],
    output_dir: str,
    seed: int = 0,
    num_files: int = 2,
    string_keys: bool = False,
    num_candidates: int = 64,
) -> dict[str, int]:
    """Write disjoint splits `<output_dir>/<split>/part-NNNNN.parquet` of one latent graph.

    Args:
        num_entities / relations / seed / num_candidates: as for `generate_edges`.
        split_edges: split name -> edges wanted. Repeated draws are dropped and more are drawn, so splits
            hold distinct edges; a graph too small for that many shrinks every split by the same factor.
        num_files: files per split.
        string_keys: write `lhs` / `rhs` as keys `<table>-<id>` and `rel` as the relation name.

    Returns:
        split name -> edges written.
    """
    total = sum(split_edges.values())
    _check(num_entities, relations, total, num_files)
    graph = latent_graph(num_entities, len(relations), seed)
    rng = np.random.default_rng([seed, 2])
    edges = np.zeros((0, 3), np.int64)
    # Popular rows repeat: draw until there are enough distinct edges, or until draws stop adding new ones.
    while len(edges) < total:
        need = min(max(total - len(edges), _CHUNK), 4 * total)
        parts = [
            _sample_chunk(rng, graph, relations, min(_CHUNK, need - s), num_candidates)
            for s in range(0, need, _CHUNK)
        ]
        drawn = np.stack([np.concatenate([p[i] for p in parts]) for i in range(3)], axis=1)
        before = len(edges)
        edges = np.unique(np.concatenate([edges, drawn]), axis=0)
        if len(edges) - before < 0.01 * need:
            break
    edges = edges[rng.permutation(len(edges))]
    if len(edges) < total:
        # A saturated graph: every split shrinks by the same factor.
        scale = len(edges) / total
        split_edges = {split: int(wanted * scale) for split, wanted in split_edges.items()}
    written, start = {}, 0
    for split, wanted in split_edges.items():
        chunk = edges[start : start + wanted]
        start += len(chunk)
        lhs, rel, rhs = chunk[:, 0], chunk[:, 1], chunk[:, 2]
        columns: dict = {"lhs": lhs, "rel": rel, "rhs": rhs}
        if string_keys:
            names = np.array([name for name, _, _ in relations], dtype=object)
            lhs_tables = np.array([t for _, t, _ in relations], dtype=object)
            rhs_tables = np.array([t for _, _, t in relations], dtype=object)
            columns = {
                "lhs": pa.array([f"{t}-{i}" for t, i in zip(lhs_tables[rel], lhs, strict=True)]),
                "rel": pa.array(names[rel].tolist()),
                "rhs": pa.array([f"{t}-{i}" for t, i in zip(rhs_tables[rel], rhs, strict=True)]),
            }
        _write_files(columns, os.path.join(output_dir, split), num_files)
        written[split] = len(chunk)
    return written
