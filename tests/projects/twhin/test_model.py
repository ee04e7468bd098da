"""The TwHIN model on one process: operator math, negatives scored through the operator and labelled 0,
the loss weighting, relation parameters that learn, any batch size (a short last batch included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tml.projects.twhin.data.batch import TwhinBatchBuilder
from tml.projects.twhin.data.edges import EdgeBatch
from tml.projects.twhin.model import (
    EdgeLoss,
    RelationOperators,
    TableSpec,
    TwhinModel,
    TwhinTrainModule,
    compare,
)

pytestmark = pytest.mark.unit

D = 6
TABLES = [TableSpec("user", 20, D), TableSpec("tweet", 12, D)]
# relation 0: user -> tweet, 1: user -> user, 2: tweet -> user, 3: user -> tweet
RELATIONS = [(0, 1), (0, 0), (1, 0), (0, 1)]
OPERATORS = ["translation", "diagonal", "complex_diagonal", "none"]


def _model(comparator="dot", sides=("rhs", "lhs"), operators=OPERATORS, seed=0) -> TwhinModel:
    torch.manual_seed(seed)
    model = TwhinModel(TABLES, RELATIONS, operators, comparator, sides)
    with torch.no_grad():
        for table in model.ebc.embedding_bags.values():
            table.weight.normal_()
        if model.relations.vectors is not None:
            model.relations.vectors.normal_()
    return model


def _edges(b: int, seed: int = 0) -> EdgeBatch:
    g = torch.Generator().manual_seed(seed)
    rel = torch.randint(0, len(RELATIONS), (b,), generator=g)
    rows = torch.tensor([t.num_embeddings for t in TABLES])
    lhs_rows = rows[torch.tensor([p[0] for p in RELATIONS])[rel]]
    rhs_rows = rows[torch.tensor([p[1] for p in RELATIONS])[rel]]
    lhs = (torch.rand(b, generator=g) * lhs_rows).long()
    rhs = (torch.rand(b, generator=g) * rhs_rows).long()
    return EdgeBatch(lhs, rel, rhs)


def _builder(in_batch=3, global_=2, sides=("rhs", "lhs"), seed=0, rank=0) -> TwhinBatchBuilder:
    rows = [t.num_embeddings for t in TABLES]
    return TwhinBatchBuilder(["user", "tweet"], RELATIONS, rows, in_batch, global_, sides, seed, rank)


def _weights(model):
    return [model.ebc.embedding_bags[t.name].weight for t in TABLES]


def test_operators_match_their_definitions():
    ops = RelationOperators(["translation", "diagonal", "complex_diagonal", "none"], D)
    with torch.no_grad():
        ops.vectors.normal_()
    v, r = torch.randn(4, D), ops.vectors
    out = ops(torch.tensor([0, 1, 2, 3]), v)
    torch.testing.assert_close(out[0], v[0] + r[0])
    torch.testing.assert_close(out[1], r[1] * v[1])
    torch.testing.assert_close(out[3], v[3])
    # ComplEx: lhs . op(rhs) == Re(sum lhs * r * conj(rhs)) over (real half, imaginary half).
    lhs = torch.randn(D)
    as_complex = lambda x: torch.complex(x[: D // 2], x[D // 2 :])  # noqa: E731
    complex_score = (as_complex(lhs) * as_complex(r[2]) * as_complex(v[2]).conj()).sum().real
    torch.testing.assert_close(compare(lhs, out[2], "dot"), complex_score)
    torch.testing.assert_close(ops.of_relation(2, v[2:3])[0], out[2])
    # Relations start as the identity (or a zero shift).
    fresh = RelationOperators(["translation", "diagonal", "complex_diagonal"], D)
    torch.testing.assert_close(fresh(torch.tensor([0, 1, 2]), v[:3]), v[:3])


@pytest.mark.parametrize("comparator", ["dot", "cos"])
def test_negatives_get_the_operator_and_label_zero(comparator):
    model = _model(comparator)
    batch = _builder().build(_edges(16), index=0)
    loss, out = TwhinTrainModule(model, "logistic")(batch)
    user, tweet = _weights(model)
    tables = [user, tweet]

    def vector(table: int, row: int) -> torch.Tensor:
        return tables[table][row]

    # Bag i of the lookups holds one id of table table_of[i]; values are grouped by table, bags in order.
    table_of = batch.lookups.lengths().reshape(2, -1).to(torch.int64).argmax(0)
    rows_of = torch.empty_like(batch.lookups.values())
    rows_of[torch.argsort(table_of, stable=True)] = batch.lookups.values()
    assert out["logits"].shape == (16, 2, 6) and out["labels"].shape == (16, 2, 6)
    assert (out["labels"][..., 0] == 1).all() and (out["labels"][..., 1:] == 0).all()
    for e in range(16):
        r = int(batch.rel[e])
        lhs_t, rhs_t = RELATIONS[r]
        lhs, rhs = vector(lhs_t, int(batch.lhs[e])), vector(rhs_t, int(batch.rhs[e]))
        op = lambda v, r=r: model.relations(torch.tensor([r]), v.unsqueeze(0))[0]  # noqa: E731
        expected_pos = compare(lhs, op(rhs), comparator)
        torch.testing.assert_close(out["logits"][e, 0, 0], expected_pos)
        for k in range(5):
            if not batch.neg_mask[e, :, k].all():
                continue  # an empty slot (its logit is masked out of the loss)
            n = int(batch.neg_index[e, 0, k])
            assert int(table_of[n]) == rhs_t  # rhs negatives come from the rhs table
            negative = vector(rhs_t, int(rows_of[n]))
            torch.testing.assert_close(out["logits"][e, 0, 1 + k], compare(lhs, op(negative), comparator))
            n = int(batch.neg_index[e, 1, k])
            assert int(table_of[n]) == lhs_t
            negative = vector(lhs_t, int(rows_of[n]))
            torch.testing.assert_close(out["logits"][e, 1, 1 + k], compare(negative, op(rhs), comparator))
    assert torch.isfinite(loss)


def test_logistic_and_softmax_weighting():
    logits = torch.randn(5, 2, 4)
    mask = torch.ones(5, 2, 4, dtype=torch.bool)
    mask[0, 0, 2:] = False
    mask[1, 1, 1:] = False  # a query without negatives
    logistic = EdgeLoss("logistic")(logits, mask)
    expected = []
    for q in range(5):
        for s in range(2):
            pos = F.binary_cross_entropy_with_logits(logits[q, s, 0], torch.tensor(1.0))
            negs = [
                F.binary_cross_entropy_with_logits(logits[q, s, k], torch.tensor(0.0))
                for k in range(1, 4)
                if mask[q, s, k]
            ]
            expected.append(pos + (sum(negs) / len(negs) if negs else 0.0))
    torch.testing.assert_close(logistic, torch.stack(expected).mean())
    softmax = EdgeLoss("softmax")(logits, mask)
    expected = [
        F.cross_entropy(logits[q, s][mask[q, s]].unsqueeze(0), torch.tensor([0]))
        for q in range(5)
        for s in range(2)
    ]
    torch.testing.assert_close(softmax, torch.stack(expected).mean())


@pytest.mark.parametrize("loss", ["logistic", "softmax"])
def test_relation_parameters_receive_gradients_and_change(loss):
    model = _model()
    module = TwhinTrainModule(model, loss)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = model.relations.vectors.detach().clone()
    value, _ = module(_builder().build(_edges(32), index=0))
    value.backward()
    grad = model.relations.vectors.grad
    assert grad is not None and (grad.abs().sum(1) > 0).all()  # every learned relation (none has no row)
    optimizer.step()
    assert (model.relations.vectors.detach() - before).abs().sum(1).min() > 0


@pytest.mark.parametrize("b", [1, 2, 3, 7, 500])
def test_any_batch_size_and_a_short_last_batch(b):
    module = TwhinTrainModule(_model(), "softmax")
    batch = _builder(in_batch=10).build(_edges(b, seed=b), index=b)
    loss, out = module(batch)
    assert out["logits"].shape == (b, 2, 13) and torch.isfinite(loss)
    loss.backward()
    if b == 1:  # no other edge: every in-batch slot is empty, global negatives remain
        assert not batch.neg_mask[:, :, :10].any() and batch.neg_mask[:, :, 10:].any()


def test_one_side_and_no_relation_parameters():
    model = _model(sides=("lhs",), operators=["none"] * 4)
    assert model.relations.vectors is None
    loss, out = TwhinTrainModule(model, "logistic")(_builder(sides=("lhs",)).build(_edges(8), 0))
    assert out["logits"].shape == (8, 1, 6) and torch.isfinite(loss)
