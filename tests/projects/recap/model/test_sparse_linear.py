"""The sparse linear layer: online max-abs normalisation (bounded gradients; raised in training, frozen in
eval, in the state dict) and a presence bias that tells "absent" from "present with value 0"."""

from __future__ import annotations

import pytest
import torch

from tml.projects.home.recap.model.sparse_linear import SparseLinear

pytestmark = pytest.mark.unit


def _layer(num_ids=6, width=3, seed=0) -> SparseLinear:
    torch.manual_seed(seed)
    return SparseLinear(num_ids, width, continuous=True)


def test_values_are_divided_by_the_running_max_abs_so_gradients_stay_bounded():
    layer = _layer()
    ids = torch.tensor([1, 2, 1, 4])
    offsets = torch.tensor([0, 2, 4])  # rows: {1: 1e6, 2: -3e-3}, {1: -2e6, 4: 5.0}
    values = torch.tensor([1e6, -3e-3, -2e6, 5.0])
    out = layer(ids, offsets, values)
    torch.testing.assert_close(layer.max_abs, torch.tensor([0.0, 2e6, 3e-3, 0.0, 5.0, 0.0]))
    out.sum().backward()
    # d out / d W[id] is the normalised value, in [-1, 1] whatever the raw scale: id 1 appears twice.
    grad = layer.weight.grad
    torch.testing.assert_close(grad[1], torch.full((3,), 1e6 / 2e6 - 1.0))
    torch.testing.assert_close(grad[2], torch.full((3,), -1.0))
    torch.testing.assert_close(grad[4], torch.full((3,), 1.0))
    assert grad.abs().max() <= 2.0  # the number of occurrences, not 2e6


def test_max_abs_is_raised_in_training_frozen_in_eval_and_saved():
    layer = _layer()
    ids, offsets = torch.tensor([0, 3]), torch.tensor([0, 1, 2])
    layer(ids, offsets, torch.tensor([2.0, -4.0]))
    layer(ids, offsets, torch.tensor([1.0, 8.0]))
    assert layer.max_abs[[0, 3]].tolist() == [2.0, 8.0]
    layer.eval()
    before = layer.max_abs.clone()
    big = layer(ids, offsets, torch.tensor([20.0, -80.0]))
    assert torch.equal(layer.max_abs, before)
    # Beyond the training maximum the normalised value clamps to +-1.
    at_max = layer(ids, offsets, torch.tensor([2.0, -8.0]))
    torch.testing.assert_close(big, at_max)

    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "max_abs"}
    restored = _layer(seed=1)
    restored.load_state_dict(state)
    assert torch.equal(restored.max_abs, layer.max_abs)
    restored.eval()
    torch.testing.assert_close(
        restored(ids, offsets, torch.tensor([1.0, 1.0])), layer(ids, offsets, torch.tensor([1.0, 1.0]))
    )


def test_presence_bias_separates_absent_from_present_with_value_zero():
    layer = _layer()
    with torch.no_grad():
        layer.bias.copy_(torch.arange(18.0).view(6, 3))
    # Row 0: id 2 present with value 0; row 1: nothing; row 2: id 2 with value 0 and id 5 with value 0.
    ids, offsets, values = torch.tensor([2, 2, 5]), torch.tensor([0, 1, 1, 3]), torch.zeros(3)
    out = layer(ids, offsets, values)
    torch.testing.assert_close(out[0], layer.bias[2])
    torch.testing.assert_close(out[1], torch.zeros(3))
    torch.testing.assert_close(out[2], layer.bias[2] + layer.bias[5])
    # The bias learns from a present zero (its gradient is the presence), the weight cannot (value 0).
    out[0].sum().backward()
    assert layer.bias.grad[2].tolist() == [1.0, 1.0, 1.0] and layer.weight.grad[2].abs().sum() == 0


def test_non_finite_values_count_as_zero_and_leave_max_abs_finite():
    layer = _layer()
    ids, offsets = torch.tensor([1, 1]), torch.tensor([0, 2])
    out = layer(ids, offsets, torch.tensor([float("nan"), float("inf")]))
    assert torch.isfinite(out).all() and layer.max_abs[1] == 0.0


def test_binary_inputs_sum_one_row_per_id():
    torch.manual_seed(0)
    layer = SparseLinear(10, 4, continuous=False)
    assert set(layer.state_dict()) == {"weight"}
    ids = torch.tensor([[1, 3], [3, 3]])  # W ids in every row
    torch.testing.assert_close(layer(ids, None), layer.weight[ids].sum(dim=1))
    flat, offsets = torch.tensor([1, 3, 3]), torch.tensor([0, 2, 2, 3])  # jagged, one empty row
    expected = torch.stack([layer.weight[1] + layer.weight[3], torch.zeros(4), layer.weight[3]])
    torch.testing.assert_close(layer(flat, offsets), expected)
