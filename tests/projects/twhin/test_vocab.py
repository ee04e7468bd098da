"""String keys: build-vocab numbers them per table, the decoder maps them, unknown keys and missing files are
named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.core.errors import UserError
from tml.projects.twhin.data.edges import build_edge_dataset
from tml.projects.twhin.data.vocab import Vocabulary, build_vocabularies, load_vocabulary
from tml.reader.decoder import DataError

pytestmark = pytest.mark.unit

RELATIONS = [("fav", "user", "tweet"), ("follow", "user", "user")]
ROWS = {"user": 10, "tweet": 5}


def _write(path, lhs, rel, rhs):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}), path)


def _vocabs(folder):
    vocab = {t: load_vocabulary(str(folder), t, n) for t, n in ROWS.items()}
    return [(vocab[lhs], vocab[rhs]) for _, lhs, rhs in RELATIONS]


def test_build_numbers_keys_per_table_by_count_and_the_decoder_maps_them(tmp_path):
    _write(
        tmp_path / "train/a.parquet",
        ["bo", "al", "al", "cy"],
        ["fav", "fav", "follow", "follow"],
        ["t1", "t2", "bo", "al"],
    )
    _write(tmp_path / "valid/b.parquet", ["al"], ["fav"], ["t3"])
    sizes = build_vocabularies(
        [str(tmp_path / "train"), str(tmp_path / "valid")], RELATIONS, ROWS, str(tmp_path / "vocab")
    )
    assert sizes == {"user": 3, "tweet": 3}
    users = pq.read_table(tmp_path / "vocab/user.parquet").to_pydict()
    # al: 4 edges, bo: 2, cy: 1 (descending count, ties by key)
    assert users == {"key": ["al", "bo", "cy"], "id": [0, 1, 2], "count": [4, 2, 1]}
    assert pq.read_table(tmp_path / "vocab/tweet.parquet").column("key").to_pylist() == ["t1", "t2", "t3"]
    edges = list(build_edge_dataset(str(tmp_path / "train"), [("fav", 10, 5), ("follow", 10, 10)], 8,
                                    num_epochs=1, shuffle=False, vocabularies=_vocabs(tmp_path / "vocab")))  # fmt: skip
    batch = edges[0]
    assert (
        batch.lhs.tolist() == [1, 0, 0, 2]
        and batch.rhs.tolist() == [0, 1, 1, 0]
        and batch.rel.tolist() == [0, 0, 1, 1]
    )


def test_unknown_keys_integer_columns_and_missing_vocabularies_are_named(tmp_path):
    _write(tmp_path / "train/a.parquet", ["al", "bo"], ["fav", "fav"], ["t1", "t2"])
    build_vocabularies([str(tmp_path / "train")], RELATIONS, ROWS, str(tmp_path / "vocab"))
    _write(tmp_path / "new/a.parquet", ["al", "zed"], ["fav", "follow"], ["t1", "al"])
    with pytest.raises(
        DataError,
        match=r"a\.parquet \(row group 0\): column 'lhs' row 1: key 'zed' is not in the vocabulary of table 'user'",
    ):
        list(
            build_edge_dataset(
                str(tmp_path / "new"),
                [("fav", 10, 5), ("follow", 10, 10)],
                8,
                num_epochs=1,
                vocabularies=_vocabs(tmp_path / "vocab"),
            )
        )
    _write(tmp_path / "ints/a.parquet", [1], [0], [2])
    with pytest.raises(DataError, match="column 'lhs' is int64, but a vocabulary is set"):
        build_edge_dataset(
            str(tmp_path / "ints"),
            [("fav", 10, 5), ("follow", 10, 10)],
            8,
            vocabularies=_vocabs(tmp_path / "vocab"),
        )
    with pytest.raises(DataError, match="column 'lhs' holds string keys; they need a vocabulary"):
        build_edge_dataset(str(tmp_path / "train"), [("fav", 10, 5), ("follow", 10, 10)], 8)
    with pytest.raises(
        FileNotFoundError, match=r"vocabulary '.*/nowhere/user.parquet' .*tml-twhin build-vocab"
    ):
        load_vocabulary(str(tmp_path / "nowhere"), "user", 10)
    with pytest.raises(UserError, match="2 keys, but table 'user' has num_embeddings 1"):
        load_vocabulary(str(tmp_path / "vocab"), "user", 1)
    with pytest.raises(
        UserError, match="table 'user': the edges hold 2 distinct keys, more than its num_embeddings 1"
    ):
        build_vocabularies([str(tmp_path / "new")], RELATIONS, {"user": 1, "tweet": 5}, str(tmp_path / "v2"))


def test_lookup_confirms_hash_hits_against_the_key():
    vocab = Vocabulary("user", "mem", pa.array(["a", "b", "c"], pa.large_string()))
    ids, known = vocab.lookup(pa.array(["c", "x", "a", ""]))
    assert ids.tolist() == [2, -1, 0, -1] and known.tolist() == [True, False, True, False]
    # A key whose hash equals a known key's is still unknown: force it by faking the hash table.
    object.__setattr__(vocab, "_hashes", torch.zeros(3, dtype=torch.int64).numpy())
    ids, known = vocab.lookup(pa.array(["zzz"]))
    assert not known.any() and ids.tolist() == [-1]
