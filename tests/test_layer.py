"""SpatialLayer: forward against the dense reference, gradients, quantization, training."""

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICES
from helpers import train_digits_mlp
from torch import nn

import spatium_torch as st
from spatium_torch.reference import NF4_LEVELS

CODE_RANGE = {1: (-1, 1), 2: (-1, 2), 4: (-7, 8), 8: (-127, 128)}


def make_layer(
    bits=4, density=1.0, region_bits=3, in_features=100, out_features=12, device="cpu", **kw
):
    torch.manual_seed(0)
    return st.SpatialLayer(
        in_features, out_features, bits=bits, density=density, region_bits=region_bits, **kw
    ).to(device)


def reference(layer, x):
    w = layer.dequantized_weight().to(x.dtype)
    b = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("region_bits", [2, 3, 6])
def test_forward_equals_dense_reference(bits, density, region_bits, device):
    layer = make_layer(bits, density, region_bits, device=device)
    x = torch.randn(7, 100, device=device)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(100,), (5, 100), (3, 4, 100), (0, 100), (2, 0, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leading_shapes_and_dtypes(shape, dtype, device):
    layer = make_layer(density=0.5, device=device)
    x = torch.randn(shape, dtype=dtype, device=device)
    y = layer(x)
    assert y.shape == (*shape[:-1], 12) and y.dtype == dtype
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    layer = make_layer()
    x = torch.randn(100, 8).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), reference(layer, x.contiguous()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_fp32(dtype):
    layer = make_layer()
    x = torch.randn(4, 100).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, reference(layer, x.float()).to(dtype))


def test_custom_input_positions_follow_the_inputs():
    positions = st.layouts.grid(10, 10)  # not Morton order: the layer permutes internally
    layer = make_layer(density=0.3, input_positions=positions)
    x = torch.randn(6, 100)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)
    # the same weights at permuted positions compute the same function on permuted inputs
    perm = torch.randperm(100)
    moved = make_layer(density=1.0, input_positions=positions[perm])
    with torch.no_grad():
        moved.weight.copy_(layer.weight[:, perm])
    dense = make_layer(density=1.0, input_positions=positions)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
    torch.testing.assert_close(moved(x[:, perm]), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_input_that_requires_grad_through_several_panels(threads):
    # 600 neurons take three panels of at most 256 rows, which run on worker threads; an input
    # that requires grad once made their products refuse to run there.
    layer = make_layer(in_features=64, out_features=600)
    x = torch.randn(8, 64, requires_grad=True)
    expected_x = x.detach().clone().requires_grad_()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = layer(x)
        y.square().sum().backward()
    finally:
        torch.set_num_threads(before)
    expected = reference(layer, expected_x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)


def test_input_gradient_gradcheck_float64():
    layer = make_layer(bits=4, density=0.5).double()
    x = torch.randn(3, 100, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    st.freeze(layer)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("blockwise", [False, True])
def test_latent_weight_gradient_is_straight_through(density, device, blockwise, monkeypatch):
    # blockwise: the sparse layer's gradient computed region by region (large layers only by
    # default; here at any size).
    calls = []
    if blockwise:
        monkeypatch.setattr(st.ops, "BLOCKWISE_MIN_WEIGHTS", 0)
        per_region = st.ops._blockwise_weight_grad
        monkeypatch.setattr(
            st.ops, "_blockwise_weight_grad", lambda *a: calls.append(1) or per_region(*a)
        )
    layer = make_layer(
        bits=2, density=density, input_positions=st.layouts.grid(10, 10), device=device
    )
    x = torch.randn(9, 100, device=device)
    layer(x).square().sum().backward()
    assert len(calls) == (blockwise and density < 0.5 and torch.device(device).type == "cpu")
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    mask = layer.block_mask()
    # d/dW of F.linear(x, W * mask, b) with the quantized output: straight-through.
    y_q = layer(x).detach()
    (F.linear(x, w * mask, b) * (2 * y_q)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert (layer.weight.grad[~mask] == 0).all()


def per_weight_scale(layer):
    """The fp16 scale of the block each weight belongs to (0 outside active blocks)."""
    out, regions = layer.out_features, layer.store.num_regions
    bits = (layer.store.bitmap.view(-1, 1) >> torch.arange(64)) & 1
    active = bits.flatten()[: out * regions].view(out, regions).bool()
    scales = layer.store.scales
    index = torch.cumsum(active.flatten(), 0).view(out, regions) - 1
    scale = torch.where(active, scales.view(torch.float16).float()[index.clamp(min=0)], 0.0)
    return scale[:, layer._region_of_sorted_input()]  # default layout: sorted == user order


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_in_range_and_nearest_for_their_scale(bits):
    layer = make_layer(bits=bits, density=0.5)
    w_q = layer.dequantized_weight()
    scale = per_weight_scale(layer)
    mask = layer.block_mask()
    assert ((scale != 0) <= mask).all()
    codes = w_q[mask] / scale[mask]
    assert torch.equal(codes, codes.round())
    lo, hi = CODE_RANGE[bits]
    assert lo <= codes.min() and codes.max() <= hi
    if bits == 1:
        assert (codes.abs() == 1).all()
    else:
        # the nearest code, but where the weight lies past the end code (clipped)
        w = layer.weight.detach()[mask]
        err = (w - w_q[mask]).abs()
        clipped = ((codes == lo) | (codes == hi)) & ((w / scale[mask]).abs() > codes.abs())
        assert (err[~clipped] <= scale[mask][~clipped].abs() / 2 * (1 + 1e-6)).all()
    assert (w_q[~mask] == 0).all()


# Fused optimizers update parameters without bumping their version counters: the layer
# learns of their steps from a global optimizer step hook.
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.5),
    "SGD fused": lambda p: torch.optim.SGD(p, lr=0.5, fused=True),
    "Adam foreach": lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
    "Adam fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "AdamW fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    "Adagrad fused": lambda p: torch.optim.Adagrad(p, lr=0.5, fused=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_requantizes_after_optimizer_step_and_only_then(name):
    layer = make_layer()
    before = layer.dequantized_weight()
    optimizer = OPTIMIZERS[name](layer.parameters())
    layer(torch.randn(4, 100)).sum().backward()
    optimizer.step()
    after = layer.dequantized_weight()
    assert not torch.equal(before, after)
    direct = st.SpatialLayer(100, 12, bits=4, region_bits=3)
    with torch.no_grad():
        direct.weight.copy_(layer.weight)
    assert torch.equal(direct.dequantized_weight(), after)


def test_determinism_and_thread_count_independence():
    layer = make_layer(in_features=300, out_features=200, density=0.5)
    x = torch.randn(64, 300)
    first = layer(x)
    assert torch.equal(first, layer(x))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


@pytest.mark.parametrize("codes", [dict(bits=8), dict(bits=4), dict(bits=4, codebook="nf4")])
def test_identity_task_learns(codes):
    torch.manual_seed(0)
    net = st.SpatialNetwork([4, 16, 4], lr=1e-2, **codes)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(1000):
        x = torch.rand(32, 4, generator=generator)
        losses.append(net.train_batch(x, x))
    assert sum(losses[-20:]) / 20 < 0.05


def test_codebook_is_checked():
    with pytest.raises(ValueError, match="codebook must be one of"):
        st.SpatialLayer(8, 4, codebook="fp4")
    with pytest.raises(ValueError, match="takes bits=4"):
        st.SpatialLayer(8, 4, bits=2, codebook="nf4")
    with pytest.raises(ValueError, match="takes bits=2"):
        st.SpatialLayer(8, 4, bits=4, codebook="odd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_nf4_weights_are_levels_times_scales_and_every_path_uses_them(density, device):
    layer = make_layer(4, density, device=device, codebook="nf4")
    assert "codebook='nf4'" in repr(layer)
    w_q = layer.dequantized_weight()
    scale = per_weight_scale(layer.cpu()).to(device)
    active = scale != 0
    levels = NF4_LEVELS.to(device)
    candidates = scale[active].unsqueeze(1) * levels  # [weights, 16], as the store computes
    is_level = w_q[active].unsqueeze(1) == candidates
    assert is_level.any(1).all()  # every weight is its scale times a level, exactly
    # and the level nearest the latent weight
    distance = (layer.weight.detach()[active].unsqueeze(1) - candidates).abs()
    chosen = distance[is_level.cumsum(1).eq(1) & is_level]
    assert (chosen <= distance.amin(1) * (1 + 1e-6)).all()
    x = torch.randn(7, 100, device=device, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, reference(layer, x.detach()), rtol=1e-5, atol=1e-6)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(7, 12, device=device) @ w_q)
    # eval without gradients, in float32: the same outputs (int8: tests/test_inference.py)
    layer.eval()
    layer.inference_precision = "fp32"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)


def test_digits_within_two_points_of_nn_linear():
    dense = train_digits_mlp(lambda i, o: nn.Linear(i, o))
    spatial = train_digits_mlp(lambda i, o: st.SpatialLayer(i, o, bits=4))
    assert spatial >= dense - 0.02, (spatial, dense)


def test_frozen_layer_runs_forward_and_input_backward():
    layer = make_layer(density=0.5)
    x = torch.randn(5, 100)
    expected = layer(x).detach()
    st.freeze(layer)
    assert layer.frozen and "weight" not in layer.state_dict()
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    # `.weight` reads as the weight the layer computes with (code that inspects it works);
    # writing to it changes nothing.
    weight = layer.weight
    assert type(weight) is torch.Tensor and not weight.requires_grad
    assert torch.equal(weight, layer.dequantized_weight())
    weight.zero_()
    assert torch.equal(layer(x).detach(), expected)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantized_weight().sum(0).expand(5, 100))


@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("batch", [1, 4, 8, 64])  # the small-batch and the panel paths
def test_nan_and_inf_propagate_like_nn_linear(density, batch):
    # One rule at every batch size: F.linear's, where 0 x NaN = NaN also in inactive blocks.
    layer = make_layer(density=density)
    dense = nn.Linear(100, 12)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(batch, 100)
    x[0, 3] = float("nan")
    x[-1, 7] = float("inf")
    y, expected = layer(x), dense(x)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isinf(), expected.isinf())
    assert y[0].isnan().all()
    finite = expected.isfinite()
    torch.testing.assert_close(y[finite], expected[finite], rtol=1e-5, atol=1e-6)
    # backward: a NaN upstream gradient reaches the inputs as nn.Linear's does, and the
    # latent-weight gradient stays 0 outside active blocks
    x = torch.randn(batch, 100, requires_grad=True)
    grad_y = torch.randn(batch, 12)
    grad_y[0, 2] = float("nan")
    (grad_x,) = torch.autograd.grad(layer(x), x, grad_y)
    (expected_x,) = torch.autograd.grad(dense(x), x, grad_y)
    assert torch.equal(grad_x.isnan(), expected_x.isnan())
    layer.weight.grad = None
    layer(x).backward(grad_y)
    assert (layer.weight.grad[~layer.block_mask()] == 0).all()


@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_penalty_matches_nn_linear_on_the_dequantized_weights(density, frozen):
    # Second-order gradients (a gradient penalty): the same as nn.Linear holding the dequantized
    # weights, with the latent weight's share straight through inside active blocks.
    layer = make_layer(density=density, in_features=40, region_bits=2).double()
    dense = nn.Linear(40, 12).double()
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        dense.bias.copy_(layer.bias)
    mask = layer.block_mask()
    if frozen:
        st.freeze(layer)

    def penalty(model, x):
        (g,) = torch.autograd.grad(model(x).tanh().square().sum(), x, create_graph=True)
        return g.square().sum()

    x = torch.randn(6, 40, dtype=torch.float64)
    x_layer, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    penalty(layer, x_layer).backward()
    penalty(dense, x_dense).backward()
    torch.testing.assert_close(x_layer.grad, x_dense.grad)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    assert dense.weight.grad.norm() > 1e-3
    if not frozen:
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad * mask)
    # and torch's own check of the second derivative with respect to the input
    x = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: layer(x).tanh(), (x,))
