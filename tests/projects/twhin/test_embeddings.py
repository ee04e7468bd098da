"""The export loader: lookups by id and key, nearest neighbours in torch (always) and FAISS (when installed)
agreeing with a brute-force top-k."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.core.errors import UserError
from tml.projects.twhin.embeddings import FORMAT, load, vector_array

pytestmark = pytest.mark.unit


@pytest.fixture
def export(tmp_path):
    g = torch.Generator().manual_seed(0)
    tables = {"user": torch.randn(37, 8, generator=g), "tweet": torch.randn(23, 8, generator=g)}
    for name, weight in tables.items():
        (tmp_path / name).mkdir()
        for part, rows in enumerate((range(0, 20), range(20, len(weight)))):  # two ranks' parts
            ids = np.array(list(rows), dtype=np.int64)
            columns = {"type": [name] * len(ids), "id": ids, "key": [f"{name}-{i}" for i in ids]}
            table = pa.table({**columns, "vector": vector_array(weight[ids].numpy())})
            pq.write_table(table, tmp_path / name / f"part-{part:05d}.parquet")
    manifest = {
        "format": FORMAT,
        "version": 1,
        "step": 3,
        "comparator": "dot",
        "tables": [
            {"name": n, "num_embeddings": len(w), "embedding_dim": 8, "data_type": "fp32", "keys": True}
            for n, w in tables.items()
        ],
        "relations": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path), tables


def _brute(queries, candidates, k, metric, exclude=None):
    if metric == "cos":
        queries = torch.nn.functional.normalize(queries, dim=1)
        candidates = torch.nn.functional.normalize(candidates, dim=1)
    scores = queries @ candidates.T
    if exclude is not None:
        scores[torch.arange(len(exclude)), exclude] = float("-inf")
    return torch.topk(scores, k, dim=1)


def test_lookup_by_id_and_key(export):
    path, tables = export
    emb = load(path)
    torch.testing.assert_close(emb.lookup("user", ids=[3, 30]), tables["user"][[3, 30]])
    torch.testing.assert_close(emb.lookup("tweet", keys=["tweet-22"]), tables["tweet"][[22]])
    assert emb.ids_of("user", ["user-5", "nobody"]).tolist() == [5, -1]
    with pytest.raises(UserError, match=r"has no keys \['nobody'\]"):
        emb.lookup("user", keys=["nobody"])
    with pytest.raises(UserError, match=r"has rows \[0, 37\); got ids \[37\]"):
        emb.lookup("user", ids=[37])
    with pytest.raises(UserError, match=r"has no table 'post'; its tables are \['tweet', 'user'\]"):
        emb.vectors("post")


@pytest.mark.parametrize("metric", ["dot", "cos"])
def test_torch_neighbours_equal_brute_force(export, metric):
    path, tables = export
    emb = load(path)
    found = emb.neighbors("user", ids=[0, 5, 36], k=4, metric=metric, backend="torch", chunk_size=7)
    want = _brute(tables["user"][[0, 5, 36]], tables["user"], 4, metric, exclude=torch.tensor([0, 5, 36]))
    assert torch.equal(found.ids, want.indices) and torch.allclose(found.scores, want.values)
    assert found.keys[0] == [f"user-{i}" for i in want.indices[0].tolist()]
    across = emb.neighbors("user", ids=[2], k=30, among="tweet", metric=metric, backend="torch", chunk_size=5)
    want = _brute(tables["user"][[2]], tables["tweet"], 23, metric)  # k capped at the table's rows
    assert torch.equal(across.ids, want.indices)


@pytest.mark.parametrize("metric", ["dot", "cos"])
def test_faiss_neighbours_equal_torch(export, metric):
    pytest.importorskip("faiss")
    path, _ = export
    emb = load(path)
    torch_result = emb.neighbors("user", keys=["user-1", "user-9"], k=5, metric=metric, backend="torch")
    faiss_result = emb.neighbors("user", keys=["user-1", "user-9"], k=5, metric=metric, backend="faiss")
    assert torch.equal(torch_result.ids, faiss_result.ids)
    torch.testing.assert_close(torch_result.scores, faiss_result.scores, rtol=1e-5, atol=1e-5)
    vectors = emb.lookup("tweet", ids=[4])
    assert torch.equal(
        emb.neighbors("tweet", vectors=vectors, k=3, backend="faiss", metric=metric).ids,
        emb.neighbors("tweet", vectors=vectors, k=3, backend="torch", metric=metric).ids,
    )


def test_an_incomplete_export_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        load(str(tmp_path))
