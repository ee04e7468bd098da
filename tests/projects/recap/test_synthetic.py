"""Synthetic recap data: schema == config, determinism, base rates, oracle AUC, and learnable signal."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.projects.home.recap.data.synthetic import Affinity, generate
from tml.reader.config import DataConfig
from tml.reader.layout import with_nullable
from tml.reader.vectors import VECTOR_KEY, logical_schema, unpack_table

pytestmark = pytest.mark.unit

FAV = "recap.engagement.is_favorited"
RETWEET = "recap.engagement.is_retweeted"
OTHER = "my_label"  # an unknown name: 5% base rate


def _config(**overrides) -> DataConfig:
    raw = dict(
        inputs="unused",
        global_batch_size=8,
        seg_dense_schema=dict(
            features=[
                dict(name="continuous", length=24),
                dict(name="binary", length=12, dtype="int64"),
                dict(name="discrete", length=4, dtype="int64"),
                dict(name="user_embedding", length=8),
            ],
            renamed_features={"user_embedding": "twhin.user"},
        ),
        dense_columns=[
            dict(name="counts", columns=["num_likes", "num_views"], dtype="int64"),
            dict(name="scores", columns=["score_a"]),
        ],
        sparse_features=[dict(name="author", column="meta.author_id", num_buckets=500)],
        tasks={FAV: {}, RETWEET: {}, OTHER: {}},
        weight_column="weight",
        id_columns=["meta.user_id", "meta.author_id"],
    )
    raw.update(overrides)
    return DataConfig.model_validate(raw)


def _read(directory, files=None) -> pa.Table:
    paths = sorted(directory.glob("part-*.parquet"))
    chosen = paths if files is None else [paths[i] for i in files]
    return pa.concat_tables(unpack_table(pq.read_table(p)) for p in chosen)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    auc = generate(_config(), 60_000, str(out), seed=7, num_files=3, rows_per_row_group=8192, progress=False)
    return out, auc


def test_schema_matches_config(sample):
    out, _ = sample
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 3
    stored = pq.read_schema(files[0])
    schema = logical_schema(stored)
    expected = {
        "continuous": pa.list_(pa.float32(), 24),
        "binary": pa.list_(pa.int64(), 12),
        "discrete": pa.list_(pa.int64(), 4),
        "twhin.user": pa.list_(pa.float32(), 8),
        "num_likes": pa.int64(),
        "num_views": pa.int64(),
        "score_a": pa.float32(),
        "meta.author_id": pa.int64(),
        "meta.user_id": pa.int64(),
        FAV: pa.int64(),
        RETWEET: pa.int64(),
        OTHER: pa.int64(),
        "weight": pa.float32(),
    }
    # Written in tml.reader.layout's layout: every column non-nullable, LZ4 only where it halves the column,
    # no dictionaries of floats, vectors packed.
    expected = {
        name: field.type
        for name, field in zip(expected, with_nullable(pa.schema(expected), False), strict=True)
    }
    assert {name: schema.field(name).type for name in schema.names} == expected
    assert not any(field.nullable for field in schema)
    packed = {name for name in stored.names if VECTOR_KEY in (stored.field(name).metadata or {})}
    assert packed == {"continuous", "binary", "discrete", "twhin.user"}
    columns = pq.ParquetFile(files[0]).metadata.row_group(0)
    encodings, compressions = {}, {}
    for index in range(columns.num_columns):
        column = columns.column(index)
        compressions[column.path_in_schema] = column.compression
        encodings[column.path_in_schema.split(".list.")[0]] = column.encodings
    # The random floats and ids do not halve; the 0/1 and small integer vectors do.
    assert (
        compressions["continuous"]
        == compressions["twhin.user"]
        == compressions["meta.user_id"]
        == "UNCOMPRESSED"
    )
    assert compressions["binary"] == compressions["discrete"] == "LZ4"
    assert "RLE_DICTIONARY" not in encodings["continuous"] and "RLE_DICTIONARY" not in encodings["score_a"]
    assert "RLE_DICTIONARY" not in encodings["discrete"] and "RLE_DICTIONARY" in encodings["num_likes"]
    table = _read(out)
    assert table.num_rows == 60_000
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 3  # 20000 rows in 8192-row groups
    author = table["meta.author_id"].to_numpy()
    assert author.min() >= 0 and author.max() < 500
    binary = np.asarray(table["binary"].combine_chunks().flatten())
    assert set(np.unique(binary)) == {0, 1}
    continuous = np.asarray(table["continuous"].combine_chunks().flatten())
    # Heavy-tailed with a few NaN: featurization has work to do.
    nan_rate = np.isnan(continuous).mean()
    assert 0 < nan_rate < 0.05
    assert np.nanmax(np.abs(continuous)) > 1e4


def test_deterministic(sample, tmp_path):
    config = _config()
    generate(config, 3000, str(tmp_path / "a"), seed=1, num_files=2, progress=False)
    generate(config, 3000, str(tmp_path / "b"), seed=1, num_files=2, progress=False)
    generate(config, 3000, str(tmp_path / "c"), seed=2, num_files=2, progress=False)
    for name in ("part-00000.parquet", "part-00001.parquet", "oracle_auc.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "part-00000.parquet").read_bytes() != (
        tmp_path / "c" / "part-00000.parquet"
    ).read_bytes()


def test_base_rates(sample):
    table = _read(sample[0])
    for task, rate, tolerance in ((FAV, 0.03, 0.005), (RETWEET, 0.01, 0.003), (OTHER, 0.05, 0.007)):
        assert abs(table[task].to_numpy().mean() - rate) < tolerance, task


def test_oracle_auc(sample):
    out, auc = sample
    assert set(auc) == {FAV, RETWEET, OTHER}
    assert all(0.65 < value < 0.97 for value in auc.values()), auc
    assert json.loads((out / "oracle_auc.json").read_text()) == pytest.approx(auc)


def _features(table: pa.Table) -> torch.Tensor:
    def matrix(column):
        return np.asarray(table[column].combine_chunks().flatten(), dtype=np.float32).reshape(
            table.num_rows, -1
        )

    continuous = matrix("continuous")
    continuous = np.nan_to_num(np.sign(continuous) * np.log1p(np.abs(continuous)))
    return torch.from_numpy(np.concatenate([continuous, matrix("binary"), matrix("twhin.user")], axis=1))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = scores.argsort().argsort() + 1.0
    positives = labels.sum()
    return (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (
        positives * (len(labels) - positives)
    )


def test_logistic_regression_learns_the_signal(sample):
    train, test = _read(sample[0], [0, 1]), _read(sample[0], [2])
    x_train, x_test = _features(train), _features(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(train[OTHER].to_numpy().astype(np.float32))
    torch.manual_seed(0)
    model = torch.nn.Linear(x_train.shape[1], 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x_train).squeeze(1), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = model(x_test).squeeze(1).numpy()
    assert _auc(scores, test[OTHER].to_numpy()) > 0.6


def test_negative_downsampling_keeps_positives(tmp_path):
    rates = {"pos_downsampling_rate": 1.0, "neg_downsampling_rate": 0.2}
    config = _config(tasks={OTHER: rates}, sparse_features=[], weight_column=None)
    generate(config, 20_000, str(tmp_path), seed=0, num_files=1, progress=False)
    table = _read(tmp_path)
    positives = table[OTHER].to_numpy().sum()
    # About 5% positives all kept plus 20% of the 95% negatives.
    assert 0.2 * 20_000 < table.num_rows < 0.3 * 20_000
    assert positives / table.num_rows > 0.15
    assert table["meta.user_id"].length() == table.num_rows


def test_column_with_two_roles_is_rejected(tmp_path):
    config = _config(weight_column=FAV)
    with pytest.raises(ValueError, match=f"column '{FAV}' is both a label"):
        generate(config, 10, str(tmp_path), progress=False)


def _integer_digest(table: pa.Table) -> str:
    """sha256 of every integer column's values (ids, bits, categories, labels): float columns are left out,
    their last bits may follow the BLAS build."""
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table[name].combine_chunks()
        values = column.flatten() if pa.types.is_fixed_size_list(column.type) else column
        if pa.types.is_integer(values.type):
            digest.update(name.encode())
            digest.update(values.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def test_default_output_is_pinned(tmp_path):
    # Options added later (e.g. the affinity) must leave the default draws as they were.
    generate(_config(), 3000, str(tmp_path), seed=1, num_files=1, progress=False)
    assert _integer_digest(_read(tmp_path)) == (
        "e27fc83e0af39f1d623db4fc91edc11b0ba59e251d88449f2e98f41fab0938b3"
    )


def _affinity(users: int = 300, authors: int = 200, weight: float = 2.0) -> Affinity:
    rng = np.random.default_rng(5)
    return Affinity(
        "meta.user_id",
        rng.standard_normal((users, 8)).astype(np.float32),
        "meta.author_id",
        rng.standard_normal((authors, 8)).astype(np.float32),
        rng.standard_normal(authors).astype(np.float32),
        weight=weight,
    )


def test_affinity_draws_ids_from_the_factors_and_drives_the_labels(tmp_path):
    affinity = _affinity()
    with_auc = generate(_config(), 40_000, str(tmp_path / "a"), seed=2, progress=False, affinity=affinity)
    generate(_config(), 40_000, str(tmp_path / "b"), seed=2, progress=False)
    table, other = _read(tmp_path / "a"), _read(tmp_path / "b")
    users, authors = table["meta.user_id"].to_numpy(), table["meta.author_id"].to_numpy()
    assert users.min() >= 0 and users.max() < 300 and len(np.unique(users)) > 200
    assert authors.min() >= 0 and authors.max() < 200 and len(np.unique(authors)) > 100
    score = affinity.score(users, authors)
    for task in (FAV, RETWEET, OTHER):
        labels = table[task].to_numpy()
        # The affinity alone ranks the labels; without it, the same pairs' score would not.
        assert _auc(score, labels) > 0.65, task
        unrelated = affinity.score(
            other["meta.user_id"].to_numpy() % 300, other["meta.author_id"].to_numpy() % 200
        )
        assert abs(_auc(unrelated, other[task].to_numpy()) - 0.5) < 0.05, task
    # The signal keeps its std (labels.py), so the oracle stays in its usual range.
    assert all(0.65 < value < 0.97 for value in with_auc.values()), with_auc


def test_affinity_columns_are_checked(tmp_path):
    base = _affinity()
    bad_column = dataclasses.replace(base, user_column="meta.viewer")
    with pytest.raises(
        ValueError, match="'meta.viewer' is neither a sparse feature's column nor in id_columns"
    ):
        generate(_config(), 10, str(tmp_path), progress=False, affinity=bad_column)
    too_many = _affinity(authors=501)  # meta.author_id is a sparse feature of 500 buckets
    with pytest.raises(
        ValueError, match="'meta.author_id' has 501 factor rows but its sparse features take 500"
    ):
        generate(_config(), 10, str(tmp_path), progress=False, affinity=too_many)
    bad_bias = dataclasses.replace(base, author_bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"author_bias \(3,\) needs one value per author \(200\)"):
        generate(_config(), 10, str(tmp_path), progress=False, affinity=bad_bias)
