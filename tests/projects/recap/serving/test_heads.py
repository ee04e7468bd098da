"""The serving face of the model: calibrator slot, heads, ranking score, plain tables, to_serving."""

import pytest
import torch

from tml.projects.home.recap.config.model import ModelConfig
from tml.projects.home.recap.model import build_model
from tml.projects.home.recap.model.heads import Calibrator, TaskHeads, check_knots
from tml.projects.home.recap.model.serving import RankingScore, to_serving
from tml.reader.batch import RecapBatch

pytestmark = pytest.mark.unit


def test_identity_calibrator_returns_its_input_bit_for_bit():
    p = torch.rand(1000, 3)
    p[0] = torch.tensor([0.0, 1.0, 0.5])
    assert torch.equal(Calibrator([((0.0, 1.0), (0.0, 1.0))] * 3)(p), p)


def test_calibrator_interpolates_each_task_between_its_knots():
    # Task 0 has three knots, task 1 two (padded internally by repeating its last knot).
    calibrator = Calibrator([((0.0, 0.5, 1.0), (0.0, 0.2, 1.0)), ((0.0, 1.0), (0.1, 0.9))])
    p = torch.tensor([[0.25, 0.0], [0.5, 0.5], [0.75, 1.0], [1.0, 0.25]])
    expected = torch.tensor([[0.1, 0.1], [0.2, 0.5], [0.6, 0.9], [1.0, 0.3]])
    torch.testing.assert_close(calibrator(p), expected)


@pytest.mark.parametrize(
    "x, y, message",
    [
        ([0.0, 0.5], [0.0, 0.5], "x must rise strictly from 0 to 1"),
        ([0.0, 0.5, 0.5, 1.0], [0.0, 0.1, 0.2, 1.0], "x must rise strictly"),
        ([0.0, 1.0], [0.5, 0.4], "y must be non-decreasing"),
        ([0.0, 1.0], [0.0], "equal count"),
    ],
)
def test_bad_knots_name_the_task(x, y, message):
    with pytest.raises(ValueError, match=rf"task 'fav'.*{message}"):
        check_knots("fav", x, y)


def test_heads_describe_their_constants_and_reject_unknown_calibration():
    heads = TaskHeads(
        ["a", "b"], [0.1, 1.0], [2.0, 1.0], [-1.0, 0.0], {"b": ([0.0, 0.5, 1.0], [0.0, 0.4, 1.0])}
    )
    described = heads.describe()
    assert described["a"] == {
        "odds_ratio": pytest.approx(0.1),
        "affine_scale": 2.0,
        "affine_bias": -1.0,
        "calibration": {"x": [0.0, 1.0], "y": [0.0, 1.0]},
    }
    assert described["b"]["calibration"] == {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.4, 1.0]}
    out = heads(torch.zeros(2, 2))
    torch.testing.assert_close(out["logits"], torch.tensor([[-1.0, 0.0]] * 2))
    torch.testing.assert_close(out["probabilities"][:, 1], torch.tensor([0.4, 0.4]))  # sigmoid(0) calibrated
    with pytest.raises(ValueError, match=r"calibration for unknown tasks \['c'\]"):
        TaskHeads(["a"], [1.0], [1.0], [0.0], {"c": ([0.0, 1.0], [0.0, 1.0])})


def test_ranking_score_is_the_weighted_sum():
    torch.testing.assert_close(RankingScore([0.5, 13.5])(torch.tensor([[0.2, 0.1]])), torch.tensor([1.45]))


def test_serving_module_equals_the_training_model_with_plain_tables():
    """Same weights, KJT + TorchRec tables vs ids/offsets + nn.EmbeddingBag, sum and mean pooling."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    large = {
        "optimizer": {"sgd": {"learning_rate": 0.1}},
        "tables": [
            {"name": "user", "num_embeddings": 10, "embedding_dim": 4, "feature_names": ["user_id"]},
            {
                "name": "author",
                "num_embeddings": 6,
                "embedding_dim": 4,
                "feature_names": ["author_id"],
                "pooling": "mean",
            },
        ],
    }
    config = ModelConfig.model_validate(
        {
            "tasks": {
                "a": {"mlp_config": {"layer_sizes": [4, 1]}},
                "b": {"mlp_config": {"layer_sizes": [1]}},
            },
            "large_embeddings": large,
            "small_embeddings": {
                "tables": [{"name": "s", "num_embeddings": 3, "embedding_dim": 2, "index": 0}]
            },
        }
    )
    widths = {"continuous": 5, "binary": 2, "discrete": 3}
    torch.manual_seed(0)
    model = build_model(config, widths, ["user_id", "author_id"], {"a": (1.0, 0.1)}).eval()
    dense = {
        "continuous": torch.randn(3, 5),
        "binary": torch.ones(3, 2),
        "discrete": torch.randint(0, 5, (3, 3)),
    }
    ids = {"user_id": torch.tensor([1, 2, 9]), "author_id": torch.tensor([0, 5, 5, 3])}
    offsets = {"user_id": torch.tensor([0, 2, 2, 3]), "author_id": torch.tensor([0, 1, 3, 4])}
    lengths = [offsets[k][1:] - offsets[k][:-1] for k in ("user_id", "author_id")]
    kjt = KeyedJaggedTensor(
        keys=["user_id", "author_id"], values=torch.cat(list(ids.values())), lengths=torch.cat(lengths).int()
    )
    with torch.no_grad():
        expected = model(
            RecapBatch(dense=dense, labels=torch.zeros(3, 2), weights=torch.ones(3, 2), sparse=kjt)
        )
    state = model.state_dict()
    serving = to_serving(model, [1.0, 2.0])
    serving.model.load_state_dict(state)  # the TorchRec state-dict names fit the plain tables
    with torch.no_grad():
        out = serving(dense, ids, offsets)
    torch.testing.assert_close(out["probabilities"], expected["probabilities"])
    torch.testing.assert_close(out["logits"], expected["logits"])
    torch.testing.assert_close(out["score"], expected["probabilities"] @ torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="no model.split_towers"):
        to_serving(build_model(config, widths, ["user_id", "author_id"], {}), [1.0, 2.0], groups=["user"])
