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
    with pytest.raises(ValueError, match="code format"):
        ops.spatial_linear(x, None, None, *memory, 3, 7)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.spatial_linear(x.half(), None, None, *memory, 4, 7)
    # 7 neurons x 12 regions; the last neuron has active blocks, so 6 rows cannot fit
    with pytest.raises(ValueError, match="past the last of 6 neurons"):
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


@pytest.mark.parametrize("wrong_bits", [2, 4, 8])
def test_every_op_refuses_a_width_other_than_the_stores(wrong_bits):
    # A 1-bit store read or written as wider codes would run past its codes array.
    layer = st.SpatialLayer(256, 16, bits=1, region_bits=6)
    memory = tuple(t.clone() for t in layer.store.arrays())
    message = f"{wrong_bits}-bit codes .* bits other than the store's"
    with pytest.raises(ValueError, match=message):
        ops.requantize_(torch.randn(16, 256), *memory, wrong_bits)
    with pytest.raises(ValueError, match=message):
        ops.dequantize(*memory, wrong_bits, 256, 16)
    for batch in (1, 32):  # the small-batch and the panel paths
        with pytest.raises(ValueError, match=message):
            ops.spatial_linear(torch.randn(batch, 256), None, None, *memory, wrong_bits, 16)
        with pytest.raises(ValueError, match=message):
            ops.spatial_linear_backward_input(torch.randn(batch, 16), *memory, wrong_bits, 256)
    ops.requantize_(torch.randn(16, 256), *memory, 1)  # its own width works
    assert ops.active_mask(*memory, 256, 16).all()  # no code width: every block active


def _block_bit(bitmap, bit, on=None):
    """Block bit `bit` of a bitmap (little-endian int64 words); sets it first when `on` is given."""
    octets = bitmap.view(torch.uint8)
    if on is not None:
        octets[bit // 8] = int(octets[bit // 8]) & ~(1 << bit % 8) | int(on) << bit % 8
    return bool(int(octets[bit // 8]) >> bit % 8 & 1)


def _moved_block(region_begin, bitmap, *_):
    # one block leaves neuron 0 for neuron 9: as many blocks as before, in other directory entries
    regions = region_begin.numel() - 1
    source = next(b for b in range(regions) if _block_bit(bitmap, b))
    target = next(b for b in range(9 * regions, 10 * regions) if not _block_bit(bitmap, b))
    _block_bit(bitmap, source, False)
    _block_bit(bitmap, target, True)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda m: m.__setitem__(5, m[5][:-1].clone()), id="codes one byte short"),
        pytest.param(lambda m: m.__setitem__(4, m[4][:-1].clone()), id="scales one short"),
        pytest.param(
            lambda m: [m.__setitem__(5, m[5][:0].clone()), m[3].zero_()], id="codes emptied"
        ),
        pytest.param(lambda m: _moved_block(*m), id="block moved between entries"),
        pytest.param(lambda m: m[2][1:-1].add_(1), id="inner block offsets shifted"),
        pytest.param(lambda m: m[1].__setitem__(-1, -1), id="bitmap past the last neuron"),
    ],
)
def test_ops_refuse_memory_whose_directory_disagrees_with_its_bitmap(damage):
    _, memory = memory_of(out=20)
    memory = [t.clone() for t in memory]
    damage(memory)
    with pytest.raises(ValueError, match="memory"):
        ops.spatial_linear(torch.randn(2, 90), None, None, *memory, 4, 20)
    with pytest.raises(ValueError, match="memory"):
        ops.spatial_linear(torch.randn(9, 90), None, None, *memory, 4, 20)
    with pytest.raises(ValueError, match="memory"):
        ops.dequantize(*memory, 4, 90, 20)
    with pytest.raises(ValueError, match="memory"):
        ops.requantize_(torch.randn(20, 90), *memory, 4)


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
