"""The CUDA kernels of the store ops (spatial_linear, its input gradient, dequantize,
active_mask) against the reference impl on the same CUDA tensors and against the CPU kernels on
CPU copies: every code format, dense, sparse and irregular layouts, the fused batches (1 to 16)
and the dense ones, NaN and inf inputs, damaged layouts (the CPU's errors) and a SpatialLayer
trained a step on either device."""

import copy

import pytest
import torch
from conftest import requires_cuda

import spatium_torch as st
from spatium_torch import reference as ref

pytestmark = requires_cuda

ops = torch.ops.spatium
KERNELS = ("spatial_linear", "spatial_linear_backward_input", "dequantize", "active_mask")

# Full regions of 64 (one warp per block at 4 bits), a partial last region and sparse blocks,
# regions of 8 (fewer codes than lanes), irregular regions from a grid's Morton order, and
# one-input regions. Output counts are no multiple of the directory's 8.
CONFIGS = {
    "dense-r6": dict(in_features=256, out_features=37, region_bits=6),
    "quarter-r6": dict(in_features=300, out_features=21, region_bits=6, density=0.25),
    "half-r3": dict(in_features=100, out_features=13, region_bits=3, density=0.5),
    "grid-half-r4": dict(
        in_features=90,
        out_features=11,
        region_bits=4,
        density=0.5,
        input_positions=st.layouts.grid(5, 9, 2),
    ),
    "one-input-regions": dict(in_features=20, out_features=5, region_bits=0, density=0.5),
}
# Every code format: the integer widths, the 2-bit odd codes and nf4.
FORMATS = {"1": 1, "2": 2, "4": 4, "8": 8, "odd": ref.ODD2_FORMAT, "nf4": ref.NF4_FORMAT}
BATCHES = (0, 1, 5, 16, 17, 300)  # up to 16: the fused kernel; above: dequantize + cuBLAS


def make_layer(config, code_format):
    torch.manual_seed(0)
    codebook = ref.codebook_of(code_format)
    return st.SpatialLayer(bits=ref.width(code_format), codebook=codebook, **CONFIGS[config])


def memories(layer):
    """The layer's store arrays on the CPU, and copies of them on the GPU."""
    cpu = tuple(layer.store.arrays())
    return cpu, tuple(t.cuda() for t in cpu)


def store_kwargs(memory):
    return dict(
        zip(
            ("region_begin", "bitmap", "block_begin", "code_begin", "scales", "codes"),
            memory,
            strict=True,
        )
    )


def tolerance(dtype):
    # Sums of up to 300 products in other orders
    return dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def test_the_store_ops_have_cuda_kernels():
    for name in KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"spatium::{name}", "CUDA"), name


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
def test_dequantize_and_active_mask_bit_for_bit(config, code_format):
    layer = make_layer(config, code_format)
    cpu, gpu = memories(layer)
    sizes = (layer.in_features, layer.out_features)
    dense = ops.dequantize(*gpu, code_format, *sizes)
    assert dense.is_cuda and dense.dtype == torch.float32
    expected = ref.dequantize(
        **store_kwargs(gpu), code_format=code_format, in_features=sizes[0], out_features=sizes[1]
    )
    assert torch.equal(dense.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(
        dense.cpu().view(torch.int32), ops.dequantize(*cpu, code_format, *sizes).view(torch.int32)
    )
    mask = ops.active_mask(*gpu, *sizes)
    assert mask.is_cuda and mask.dtype == torch.bool
    assert torch.equal(
        mask, ref.active_mask(**store_kwargs(gpu), in_features=sizes[0], out_features=sizes[1])
    )
    assert torch.equal(mask.cpu(), ops.active_mask(*cpu, *sizes))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_linear_and_input_gradient(config, code_format, batch, dtype):
    layer = make_layer(config, code_format)
    cpu, gpu = memories(layer)
    x = torch.randn(batch, layer.in_features, dtype=dtype)
    grad_y = torch.randn(batch, layer.out_features, dtype=dtype)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    for b in (bias, None):
        b_gpu = None if b is None else b.cuda()
        y = ops.spatial_linear(
            x.cuda(), weight.cuda(), b_gpu, *gpu, code_format, layer.out_features
        )
        assert y.is_cuda and y.dtype == dtype and y.shape == (batch, layer.out_features)
        expected = ref.spatial_linear(
            x.cuda(),
            weight.cuda(),
            b_gpu,
            **store_kwargs(gpu),
            code_format=code_format,
            out_features=layer.out_features,
        )
        torch.testing.assert_close(y, expected, **tolerance(dtype))
        on_cpu = ops.spatial_linear(x, weight, b, *cpu, code_format, layer.out_features)
        torch.testing.assert_close(y.cpu(), on_cpu, **tolerance(dtype))
    grad_x = ops.spatial_linear_backward_input(grad_y.cuda(), *gpu, code_format, layer.in_features)
    assert grad_x.is_cuda and grad_x.dtype == dtype
    expected = ref.spatial_linear_backward_input(
        grad_y.cuda(), **store_kwargs(gpu), code_format=code_format, in_features=layer.in_features
    )
    torch.testing.assert_close(grad_x, expected, **tolerance(dtype))
    on_cpu = ops.spatial_linear_backward_input(grad_y, *cpu, code_format, layer.in_features)
    torch.testing.assert_close(grad_x.cpu(), on_cpu, **tolerance(dtype))


def test_non_contiguous_input():
    layer = make_layer("quarter-r6", 4)
    cpu, gpu = memories(layer)
    x = torch.randn(layer.in_features, 3).t()
    y = ops.spatial_linear(x.cuda(), None, None, *gpu, 4, layer.out_features)
    on_cpu = ops.spatial_linear(x.contiguous(), None, None, *cpu, 4, layer.out_features)
    torch.testing.assert_close(y.cpu(), on_cpu, **tolerance(torch.float32))


@pytest.mark.parametrize("batch", [1, 5, 16, 17])
def test_nan_and_inf_propagate_as_in_a_dense_product(batch):
    # A NaN or inf input reaches every output of its row in a dense product (0 x NaN = NaN),
    # inactive blocks included, at every batch size.
    layer = make_layer("quarter-r6", 4)
    cpu, gpu = memories(layer)
    x = torch.randn(batch, layer.in_features)
    x[0, 7] = float("nan")
    x[-1, 250] = float("inf")
    if batch > 2:
        x[1, 100] = float("-inf")
    for device, memory in (("cuda", gpu), ("cpu", cpu)):
        y = ops.spatial_linear(x.to(device), None, None, *memory, 4, layer.out_features)
        expected = ref.spatial_linear(
            x.to(device),
            None,
            None,
            **store_kwargs(memory),
            code_format=4,
            out_features=layer.out_features,
        )
        assert torch.equal(y.isnan(), expected.isnan()), device
        assert y[0].isnan().all() and not y[-1].isfinite().any()
        torch.testing.assert_close(y, expected, equal_nan=True, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_the_ops_refuse_other_dtypes_as_on_the_cpu(dtype):
    layer = make_layer("half-r3", 4)
    cpu, gpu = memories(layer)
    x = torch.ones(2, layer.in_features, dtype=dtype)
    with pytest.raises(TypeError) as on_cpu:
        ops.spatial_linear(x, None, None, *cpu, 4, layer.out_features)
    with pytest.raises(TypeError) as on_gpu:
        ops.spatial_linear(x.cuda(), None, None, *gpu, 4, layer.out_features)
    assert str(on_gpu.value) == str(on_cpu.value)


def test_the_ops_refuse_arguments_on_other_devices():
    layer = make_layer("half-r3", 4)
    cpu, gpu = memories(layer)
    with pytest.raises(ValueError, match="x is on cpu"):
        ops.spatial_linear(torch.randn(2, 100), None, None, *gpu, 4, 13)
    with pytest.raises(ValueError, match="codes must be a contiguous 1-D tensor on cuda"):
        ops.spatial_linear(torch.randn(2, 100).cuda(), None, None, *gpu[:5], cpu[5], 4, 13)
    with pytest.raises(ValueError, match="bias is on cpu"):
        ops.spatial_linear(torch.randn(2, 100).cuda(), None, torch.zeros(13), *gpu, 4, 13)
    with pytest.raises(ValueError, match="must be \\[13\\]"):
        ops.spatial_linear(torch.randn(2, 100).cuda(), None, torch.zeros(12).cuda(), *gpu, 4, 13)


def _block_bit(bitmap, bit, on):
    octets = bitmap.view(torch.uint8)
    octets[bit // 8] = int(octets[bit // 8]) & ~(1 << bit % 8) | int(on) << bit % 8


def _move_block(memory):
    # one block leaves neuron 0 for neuron 9: as many blocks as before, in other directory entries
    region_begin, bitmap = memory[0], memory[1]
    regions = region_begin.numel() - 1
    octets = bitmap.view(torch.uint8)
    is_set = [bool(int(octets[b // 8]) >> b % 8 & 1) for b in range(10 * regions)]
    _block_bit(bitmap, is_set.index(True), False)
    _block_bit(bitmap, next(b for b in range(9 * regions, 10 * regions) if not is_set[b]), True)


DAMAGES = {
    "codes one byte short": lambda m: m.__setitem__(5, m[5][:-1].clone()),
    "scales one short": lambda m: m.__setitem__(4, m[4][:-1].clone()),
    "codes emptied": lambda m: [m.__setitem__(5, m[5][:0].clone()), m[3].zero_()],
    "block moved between entries": _move_block,
    "inner block offsets shifted": lambda m: m[2][1:-1].add_(1),
    "bitmap past the last neuron": lambda m: m[1].__setitem__(-1, -1),
    "regions not increasing": lambda m: m[0].__setitem__(1, 10**9),
    "code offsets not from 0": lambda m: m[3].__setitem__(0, 10**12),
    "too many neurons": None,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_layout_raises_the_cpus_error(damage):
    torch.manual_seed(0)
    layer = st.SpatialLayer(90, 20, bits=4, region_bits=3, density=0.5)
    memory = [t.clone() for t in layer.store.arrays()]
    out = 20
    if DAMAGES[damage] is None:
        out = 40  # a directory of another length
    else:
        DAMAGES[damage](memory)
    gpu = [t.cuda() for t in memory]
    calls = {
        "spatial_linear batch 1": lambda m, d: ops.spatial_linear(
            torch.randn(1, 90, device=d), None, None, *m, 4, out
        ),
        "spatial_linear batch 32": lambda m, d: ops.spatial_linear(
            torch.randn(32, 90, device=d), None, None, *m, 4, out
        ),
        "backward": lambda m, d: ops.spatial_linear_backward_input(
            torch.randn(3, out, device=d), *m, 4, 90
        ),
        "dequantize": lambda m, d: ops.dequantize(*m, 4, 90, out),
        "active_mask": lambda m, d: ops.active_mask(*m, 90, out),
    }
    refused = 0
    for name, call in calls.items():
        try:
            expected = call(memory, "cpu")
        except ValueError as error:
            refused += 1
            with pytest.raises(ValueError) as on_gpu:
                call(gpu, "cuda")
            assert str(on_gpu.value) == str(error), name
        else:  # the mask reads no codes: a store with damaged codes still has a mask
            assert name == "active_mask", name
            assert torch.equal(call(gpu, "cuda").cpu(), expected)
    assert refused >= 4


@pytest.mark.parametrize("config", ["dense-r6", "quarter-r6", "grid-half-r4"])
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 16, 17])
def test_a_layer_forward_and_backward_on_cuda_equal_the_cpus(config, code_format, dtype, batch):
    layer = make_layer(config, code_format)
    layer_gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(batch, layer.in_features).to(dtype)
    grad = torch.randn(batch, layer.out_features).to(dtype)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, y_gpu = layer(x_cpu), layer_gpu(x_gpu)
    y_cpu.backward(grad)
    y_gpu.backward(grad.cuda())
    # fp32 products in other orders, then rounded to the input's dtype
    close = {
        torch.float32: dict(rtol=1e-5, atol=5e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]
    assert y_gpu.dtype == dtype
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **close)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **close)
    torch.testing.assert_close(layer_gpu.weight.grad.cpu(), layer.weight.grad, **close)
    torch.testing.assert_close(layer_gpu.bias.grad.cpu(), layer.bias.grad, **close)
    # a frozen layer: the store only
    st.freeze(layer)
    st.freeze(layer_gpu)
    with torch.no_grad():
        torch.testing.assert_close(layer_gpu(x.cuda()).cpu(), layer(x), **close)
