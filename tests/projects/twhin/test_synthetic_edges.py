"""Synthetic TwHIN edges: columns, id ranges, determinism, and that edges follow the latent model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.projects.twhin.data.synthetic import generate_edges, latent_graph

pytestmark = pytest.mark.unit

ENTITIES = {"user": 300, "tweet": 120}
RELATIONS = [("fav", "user", "tweet"), ("follow", "user", "user"), ("authored", "tweet", "user")]


def _read(directory) -> dict[str, np.ndarray]:
    files = sorted(directory.glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return {name: table[name].to_numpy() for name in table.column_names}


@pytest.fixture(scope="module")
def edges_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges")
    generate_edges(ENTITIES, RELATIONS, num_edges=20_001, output_dir=str(out), seed=3, num_files=2)
    return out


def test_files_columns_and_ranges(edges_dir):
    files = sorted(edges_dir.glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    schema = pq.read_schema(files[0])
    assert schema.names == ["lhs", "rel", "rhs"]
    assert all(t == pa.int64() for t in schema.types)
    edges = _read(edges_dir)
    assert len(edges["lhs"]) == 20_001
    assert set(np.unique(edges["rel"])) == {0, 1, 2}
    for index, (_, lhs_table, rhs_table) in enumerate(RELATIONS):
        mask = edges["rel"] == index
        assert edges["lhs"][mask].min() >= 0 and edges["lhs"][mask].max() < ENTITIES[lhs_table]
        assert edges["rhs"][mask].min() >= 0 and edges["rhs"][mask].max() < ENTITIES[rhs_table]


def test_deterministic_and_seed_dependent(edges_dir, tmp_path):
    generate_edges(ENTITIES, RELATIONS, num_edges=20_001, output_dir=str(tmp_path / "a"), seed=3, num_files=2)
    generate_edges(ENTITIES, RELATIONS, num_edges=20_001, output_dir=str(tmp_path / "b"), seed=4, num_files=2)
    again, first, other = _read(tmp_path / "a"), _read(edges_dir), _read(tmp_path / "b")
    assert all(np.array_equal(again[c], first[c]) for c in first)
    assert not np.array_equal(other["rhs"], first["rhs"])


def test_true_edges_outscore_random_pairs(edges_dir):
    edges = _read(edges_dir)
    graph = latent_graph(ENTITIES, len(RELATIONS), seed=3)
    true_scores = graph.score(edges["lhs"], edges["rel"], edges["rhs"], RELATIONS)
    rng = np.random.default_rng(0)
    rhs_rows = np.array([ENTITIES[rhs] for _, _, rhs in RELATIONS])[edges["rel"]]
    random_rhs = (rng.random(len(rhs_rows)) * rhs_rows).astype(np.int64)
    random_scores = graph.score(edges["lhs"], edges["rel"], random_rhs, RELATIONS)
    # Probability that a true edge outscores a random one (a pairwise AUC estimate).
    wins = (true_scores[:, None] > random_scores[None, :2000]).mean()
    assert wins > 0.75


def test_bad_relation_table_is_named(tmp_path):
    with pytest.raises(ValueError, match="relation 'x': rhs table 'post'"):
        generate_edges(ENTITIES, [("x", "user", "post")], 10, str(tmp_path))
