"""TwhinBatchBuilder and TwhinBatches: where negatives come from, determinism, exact resume, offset/limit."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.core.config.loader import ConfigError
from tml.projects.twhin.data.batch import TwhinBatch, TwhinBatchBuilder, TwhinBatches
from tml.projects.twhin.data.edges import EdgeBatch, build_edge_dataset
from tml.reader.state import ResumeError

pytestmark = pytest.mark.unit

ROWS = [50, 30]  # user, tweet
RELATIONS = [(0, 1), (0, 0)]  # fav: user -> tweet, follow: user -> user
DECODER = [("fav", 50, 30), ("follow", 50, 50)]


def _builder(in_batch=4, global_=3, sides=("rhs", "lhs"), rank=0) -> TwhinBatchBuilder:
    return TwhinBatchBuilder(["user", "tweet"], RELATIONS, ROWS, in_batch, global_, sides, seed=7, rank=rank)


def _edges(b: int, seed: int = 0) -> EdgeBatch:
    g = torch.Generator().manual_seed(seed)
    rel = torch.randint(0, 2, (b,), generator=g)
    lhs = torch.randint(0, 50, (b,), generator=g)
    rhs = torch.where(
        rel == 0, torch.randint(0, 30, (b,), generator=g), torch.randint(0, 50, (b,), generator=g)
    )
    return EdgeBatch(lhs, rel, rhs)


def _resolve(batch: TwhinBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, row) of every bag of the lookups."""
    table = batch.lookups.lengths().reshape(2, -1).to(torch.int64).argmax(0)
    rows = torch.empty_like(batch.lookups.values())
    rows[torch.argsort(table, stable=True)] = batch.lookups.values()
    return table, rows


def test_negatives_come_from_where_they_should():
    edges = _edges(40)
    batch = _builder().build(edges, index=3)
    table, rows = _resolve(batch)
    assert batch.lookups.keys() == ["user", "tweet"] and (batch.lookups.lengths() <= 1).all()
    # Positives: bags 0..B-1 are the lhs rows, B..2B-1 the rhs rows.
    assert torch.equal(rows[batch.lhs_index], edges.lhs) and torch.equal(rows[batch.rhs_index], edges.rhs)
    for e in range(40):
        r = int(edges.rel[e])
        same = torch.nonzero(edges.rel == r).squeeze(1)
        for s, (side, end) in enumerate((("rhs", edges.rhs), ("lhs", edges.lhs))):
            target_table = RELATIONS[r][1] if side == "rhs" else RELATIONS[r][0]
            first = 40 if side == "rhs" else 0
            in_batch = batch.neg_index[e, s, :4]
            valid = batch.neg_mask[e, s, :4]
            others = in_batch - first
            chosen = set()
            for k in range(4):
                j = int(others[k])
                if j >= 0 and j < 40 and j != e and j in same.tolist():
                    chosen.add(j)
                if valid[k]:  # another edge of the same relation whose end is not this edge's own
                    assert j != e and int(edges.rel[j]) == r and int(end[j]) != int(end[e])
            if len(same) > 4:
                assert len(chosen) == 4  # distinct edges
            glob = batch.neg_index[e, s, 4:]
            assert (glob >= 80).all() and (table[glob] == target_table).all()
            assert torch.equal(batch.neg_mask[e, s, 4:], rows[glob] != end[e])


def test_draws_depend_only_on_seed_rank_and_index():
    edges = _edges(30)
    a, b = _builder().build(edges, 5), _builder().build(edges, 5)
    assert torch.equal(a.neg_index, b.neg_index) and torch.equal(a.lookups.values(), b.lookups.values())
    c = _builder().build(edges, 6)
    d = _builder(rank=1).build(edges, 5)
    assert not torch.equal(a.lookups.values(), c.lookups.values())
    assert not torch.equal(a.lookups.values(), d.lookups.values())


def test_a_lone_edge_has_only_global_negatives():
    batch = _builder().build(EdgeBatch(torch.tensor([3]), torch.tensor([0]), torch.tensor([2])), 0)
    assert not batch.neg_mask[0, :, :4].any() and batch.neg_index.shape == (1, 2, 7)


def _write(tmp_path, rows: int, files: int = 2, group: int = 16):
    edges = _edges(rows, seed=11)
    per = rows // files
    for f in range(files):
        part = slice(f * per, (f + 1) * per if f < files - 1 else rows)
        table = pa.table(
            {"lhs": edges.lhs[part].numpy(), "rel": edges.rel[part].numpy(), "rhs": edges.rhs[part].numpy()}
        )
        pq.write_table(table, tmp_path / f"part-{f}.parquet", row_group_size=group)
    return edges


def _stream(tmp_path, offset=0, limit=None, batch=8, epochs=2) -> TwhinBatches:
    dataset = build_edge_dataset(
        str(tmp_path), DECODER, batch, num_epochs=epochs, seed=3, buffer_size=20, offset=offset, limit=limit
    )
    return TwhinBatches(dataset, _builder(), {"offset": offset, "limit": limit})


def _same(a: TwhinBatch, b: TwhinBatch) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in ((a.rel, b.rel), (a.lhs, b.lhs), (a.neg_index, b.neg_index), (a.neg_mask, b.neg_mask))
    ) and torch.equal(a.lookups.values(), b.lookups.values())


@pytest.mark.parametrize(("offset", "limit"), [(0, None), (20, 37)])
def test_resume_continues_the_same_batches_and_negatives(tmp_path, offset, limit):
    _write(tmp_path, 100)
    full = list(_stream(tmp_path, offset, limit))
    assert sum(b.batch_size for b in full) == (100 - offset if limit is None else limit) * 2
    stream = _stream(tmp_path, offset, limit)
    it = iter(stream)
    for _ in range(5):
        next(it)
    state = stream.state_dict(3)  # the loop trained on 3, prefetched 2 more
    resumed = _stream(tmp_path, offset, limit)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3 and all(_same(a, b) for a, b in zip(rest, full[3:], strict=True))
    again = list(resumed)  # a new pass starts from the beginning
    assert len(again) == len(full) and _same(again[0], full[0])


def test_offset_limit_select_rows_in_file_order(tmp_path):
    edges = _write(tmp_path, 100)
    read = list(_stream(tmp_path, offset=45, limit=20, epochs=1))
    got = sorted(torch.cat([b.lhs * 1000 + b.rhs for b in read]).tolist())
    assert got == sorted((edges.lhs[45:65] * 1000 + edges.rhs[45:65]).tolist())


def test_a_changed_selection_is_refused(tmp_path):
    _write(tmp_path, 100)
    stream = _stream(tmp_path, 0, 50)
    next(iter(stream))
    state = stream.state_dict(1)
    other = _stream(tmp_path, 10, 50)
    with pytest.raises(ResumeError, match=r"train_data offset changed since the checkpoint"):
        other.load_state_dict(state)


def test_a_rank_left_without_edges_fails_clearly(tmp_path):
    _write(tmp_path, 64, files=1, group=32)  # two row groups: rank 1 gets rows 32..63
    dataset = build_edge_dataset(str(tmp_path), DECODER, 8, rank=1, world_size=2, shuffle=False, limit=16)
    stream = TwhinBatches(dataset, _builder(rank=1), {"offset": 0, "limit": 16})
    with pytest.raises(ConfigError, match="leave rank 1 no edges for a whole epoch"):
        next(iter(stream))
