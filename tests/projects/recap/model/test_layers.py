"""Each architecture: output shape, a value pinned at a fixed seed, and gradients reaching every parameter."""

import pytest
import torch

from tml.projects.home.recap.model.dcn import Dcn
from tml.projects.home.recap.model.dlrm import Dlrm, num_interactions
from tml.projects.home.recap.model.mask_net import MaskBlockSpec, MaskNet
from tml.projects.home.recap.model.mlp import LayerNorm, Mlp

pytestmark = pytest.mark.unit

B, F = 4, 6


def _input(width=F, seed=1):
    return torch.randn(B, width, generator=torch.Generator().manual_seed(seed))


def _check_grads(module, out):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def _pinned(out, expected):
    torch.testing.assert_close(out.sum(dim=0)[: len(expected)], torch.tensor(expected), atol=1e-4, rtol=1e-4)


def _build(factory):
    torch.manual_seed(0)
    return factory()


def test_mlp():
    mlp = _build(
        lambda: Mlp(F, [5, 3], batch_norm_momentum=0.1, dropout_rate=0.5, final_layer_activation=True)
    )
    assert [type(m).__name__ for m in mlp.layers] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
    ]
    mlp.eval()
    out = mlp(_input())
    assert out.shape == (B, 3) and mlp.out_features == 3
    assert (out >= 0).all()
    _pinned(out, PINNED["mlp"])
    mlp.train()
    _check_grads(mlp, mlp(_input()))


@pytest.mark.parametrize("parallel", [True, False])
def test_mask_net(parallel):
    blocks = [
        MaskBlockSpec(4, aggregation_size=8, input_layer_norm=True),
        MaskBlockSpec(3, reduction_factor=0.5),
    ]
    net = _build(lambda: MaskNet(F, blocks, use_parallel=parallel))
    out = net(_input())
    assert out.shape == (B, 7 if parallel else 3) and net.out_features == out.shape[1]
    # Half of 6 inputs: the second block's aggregation layer is 3 wide.
    assert net.blocks[1].mask[0].out_features == 3
    _pinned(out, PINNED[f"mask_net_parallel={parallel}"])
    _check_grads(net, out)


def test_mask_net_with_mlp():
    blocks = [MaskBlockSpec(4, aggregation_size=8)] * 2
    net = _build(lambda: MaskNet(F, blocks, use_parallel=True, mlp=Mlp(8, [2])))
    out = net(_input())
    assert out.shape == (B, 2) and net.out_features == 2
    _check_grads(net, out)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("projection_dim", [None, 2])
def test_dcn(parallel, projection_dim):
    def make():
        deep = Mlp(F, [5]) if parallel else None
        return Dcn(
            F,
            poly_degree=2,
            projection_dim=projection_dim,
            parallel_mlp=deep,
            output_mlp=Mlp(F + (5 if parallel else 0), [3]),
        )

    net = _build(make)
    out = net(_input())
    assert out.shape == (B, 3) and net.out_features == 3
    if projection_dim is None:
        assert net.cross[0].down is None and net.cross[0].up.weight.shape == (F, F)
    else:
        assert net.cross[0].down.weight.shape == (2, F)
    _pinned(out, PINNED[f"dcn_parallel={parallel}_projection={projection_dim}"])
    _check_grads(net, out)


def test_dcn_cross_formula():
    net = _build(lambda: Dcn(F, poly_degree=1))
    x = _input()
    layer = net.cross[0].up
    expected = x * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x), expected)
    assert net.out_features == F


def test_dlrm():
    dense_width, n, e = 4, 3, 2
    net = _build(
        lambda: Dlrm(dense_width, n, e, Mlp(dense_width, [5, e]), Mlp(e + num_interactions(n), [3, 1]))
    )
    assert num_interactions(n) == 6
    x = _input(dense_width + n * e)
    out = net(x)
    assert out.shape == (B, 1)
    _pinned(out, PINNED["dlrm"])
    _check_grads(net, out)


def test_dlrm_interactions_are_pairwise_dots():
    top = Mlp(2 + 3, [1])
    net = _build(lambda: Dlrm(2, 2, 2, Mlp(2, [2]), top))
    seen = {}
    top.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    x = _input(2 + 4)
    net(x)
    bottom = net.bottom_mlp(x[:, :2])
    v1, v2 = x[:, 2:4], x[:, 4:6]
    dots = torch.stack([(bottom * v1).sum(1), (bottom * v2).sum(1), (v1 * v2).sum(1)], dim=1)
    torch.testing.assert_close(seen["x"], torch.cat([bottom, dots], dim=1))


@pytest.mark.parametrize("center,scale", [(True, True), (True, False), (False, True), (False, False)])
def test_layer_norm_center_scale(center, scale):
    norm = LayerNorm(F, eps=1e-5, center=center, scale=scale)
    assert (norm.bias is not None, norm.weight is not None) == (center, scale)
    out = norm(_input())
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(B), atol=1e-5, rtol=0)


# Column sums of the output at torch.manual_seed(0) (torch 2.13); re-pin deliberately if init changes.
PINNED = {
    "mlp": [0.0879, 1.4952, 0.0],
    "mask_net_parallel=True": [0.3997, 3.9179, 0.9291],
    "mask_net_parallel=False": [0.6597, 3.364, 0.0168],
    "dcn_parallel=True_projection=None": [0.3585, 14.7669, 1.2447],
    "dcn_parallel=True_projection=2": [-4.7249, -1.2793, 0.7019],
    "dcn_parallel=False_projection=None": [4.9842, 0.8082, 7.1765],
    "dcn_parallel=False_projection=2": [2.9324, -1.8714, 4.873],
    "dlrm": [-4.1687],
}
