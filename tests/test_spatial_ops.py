"""The spatial-memory ops on their own: opcheck, gradcheck, argument checks."""

import pytest
import torch

import spatium_torch as st

ops = torch.ops.spatium


def memory_of(bits=4, out=7, inputs=90, region_bits=3, density=0.5):
    torch.manual_seed(0)
    layer = st.SpatialLayer(inputs, out, bits=bits, region_bits=region_bits, density=density)
    return layer, tuple(layer.store.arrays())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_opcheck_every_op(bits, batch):
    layer, memory = memory_of(bits)
    x = torch.randn(batch, 90)
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone()
    for args in (
        (x, weight, bias, *memory, bits, 7),
        (x, None, None, *memory, bits, 7),
        (
            x.double().requires_grad_(),
            weight.requires_grad_(),
            bias.requires_grad_(),
            *memory,
            bits,
            7,
        ),
    ):
        torch.library.opcheck(ops.spatial_linear.default, args)
    torch.library.opcheck(
        ops.spatial_linear_backward_input.default, (torch.randn(batch, 7), *memory, bits, 90)
    )
    torch.library.opcheck(ops.active_mask.default, (*memory, 90, 7))
    torch.library.opcheck(ops.dequantize.default, (*memory, bits, 90, 7))
    torch.library.opcheck(
        ops.requantize_.default,
        (weight.detach(), *memory[:4], *(t.clone() for t in memory[4:]), bits),
    )


def test_gradcheck_input_float64():
    _, memory = memory_of(bits=2)
    x = torch.randn(4, 90, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: ops.spatial_linear(x, None, b, *memory, 2, 7), (x, bias)
    )


def test_ops_reject_inconsistent_memory():
    _, memory = memory_of()
    x = torch.randn(2, 90)
    *layout, scales, codes = memory
    with pytest.raises(ValueError, match="covers 90 inputs"):
        ops.spatial_linear(torch.randn(2, 91), None, None, *memory, 4, 7)
    with pytest.raises(ValueError, match="disagree"):
        ops.spatial_linear(x, None, None, *layout, scales, codes[:-1].clone(), 4, 7)
    with pytest.raises(TypeError, match="codes must be"):
        ops.spatial_linear(x, None, None, *layout, scales, codes.long(), 4, 7)
    with pytest.raises(ValueError, match="bits"):
        ops.spatial_linear(x, None, None, *memory, 3, 7)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.spatial_linear(x.half(), None, None, *memory, 4, 7)
    # 7 neurons x 12 regions; the last neuron has active blocks, so 6 rows cannot fit
    with pytest.raises(ValueError, match="do not fit 6 neurons"):
        ops.requantize_(torch.randn(6, 90), *memory, 4)
    with pytest.raises(ValueError, match="do not fit 20 neurons"):
        ops.spatial_linear(x, None, None, *memory, 4, 20)


def test_a_graph_outlives_a_layout_change():
    layer, _ = memory_of()
    x = torch.randn(3, 90, requires_grad=True)
    y = layer(x)
    # a write that activates a new block rebuilds the arrays; the graph keeps the old ones
    inactive = (~layer.block_mask()).nonzero()[0].tolist()
    xyz = st.morton_decode(torch.tensor([inactive[1]]))[0].tolist()
    layer.memory.write(inactive[0], xyz, 1.0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_requantize_refuses_a_width_other_than_the_stores():
    # A 1-bit store written as 8-bit codes would write past its codes array.
    layer = st.SpatialLayer(256, 16, bits=1, region_bits=6)
    *layout, scales, codes = (t.clone() for t in layer.store.arrays())
    with pytest.raises(ValueError, match="8-bit codes of its blocks need"):
        ops.requantize_(torch.randn(16, 256), *layout, scales, codes, 8)
    ops.requantize_(torch.randn(16, 256), *layout, scales, codes, 1)  # its own width works


@pytest.mark.parametrize(
    "damage",
    [
        lambda region_begin, block_begin, code_begin: region_begin.__setitem__(1, 10**9),
        lambda region_begin, block_begin, code_begin: region_begin.__setitem__(0, 1),
        lambda region_begin, block_begin, code_begin: block_begin.__setitem__(0, 10**12),
        lambda region_begin, block_begin, code_begin: code_begin.__setitem__(0, 10**12),
        lambda region_begin, block_begin, code_begin: code_begin.__setitem__(1, -5),
    ],
)
def test_ops_refuse_offsets_that_do_not_increase_from_zero(damage):
    _, memory = memory_of()
    region_begin, bitmap, block_begin, code_begin, scales, codes = (t.clone() for t in memory)
    damage(region_begin, block_begin, code_begin)
    store = (region_begin, bitmap, block_begin, code_begin, scales, codes)
    with pytest.raises(ValueError, match="memory"):
        ops.spatial_linear(torch.randn(2, 90), None, None, *store, 4, 7)
    with pytest.raises(ValueError, match="memory"):
        ops.requantize_(torch.randn(7, 90), *store, 4)
