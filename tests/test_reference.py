"""The C++ kernels against the portable reference (spatium_torch.reference), on the CPU: the
store ops bit for bit, products and activation functions to floating-point tolerance."""

import pytest
import torch

import spatium_torch as st
from spatium_torch import reference as ref
from spatium_torch.ops import ACTIVATIONS

# What follows the store arrays in each store op's schema, given the layer.
_STORE_OP_TAIL = {
    "spatial_linear": lambda layer: (layer.code_format, layer.out_features),
    "spatial_linear_backward_input": lambda layer: (layer.code_format, layer.in_features),
    "active_mask": lambda layer: (layer.in_features, layer.out_features),
    "dequantize": lambda layer: (layer.code_format, layer.in_features, layer.out_features),
    "requantize_": lambda layer: (layer.code_format,),
}


def kernel(name, layer, *args):
    """The C++ op ``torch.ops.spatium.<name>``: the only place that knows how the ops take the
    store. For a store op, ``args`` are the arguments before the store (x, weight, bias;
    grad_y; latent; none) and ``layer`` supplies the store and sizes (``requantize_`` writes
    into the layer's store); other ops take ``args`` as they are (``layer`` None)."""
    op = getattr(torch.ops.spatium, name)
    if layer is None:
        return op(*args)
    return op(*args, *layer.store.arrays(), *_STORE_OP_TAIL[name](layer))


def store(layer):
    """The reference's keyword arguments for a layer's store."""
    return layer.store.arrays()._asdict()


def layout_of(layer):
    """The store arrays the layout is read from (for the reference's quantize)."""
    arrays = store(layer)
    del arrays["scales"], arrays["codes"]
    return arrays


# --- layers ---------------------------------------------------------------------------------------
# Sizes chosen so that regions come out partial (100 inputs: last region of 4 at region_bits 3,
# of 36 at 6), out is no multiple of the directory's 8, and inputs are not in Morton order (grid).
CONFIGS = {
    "dense-r3": dict(in_features=100, out_features=13, region_bits=3),
    # blocks of 64 weights only: the quantizer's code for the default region size
    "dense-r6": dict(in_features=128, out_features=13, region_bits=6),
    "local-quarter-r6": dict(in_features=100, out_features=13, region_bits=6, density=0.25),
    "random-quarter-r3": dict(
        in_features=100, out_features=13, region_bits=3, density=0.25, connectivity="random"
    ),
    "grid-half-r4": dict(
        in_features=126,
        out_features=9,
        region_bits=4,
        density=0.5,
        input_positions=st.layouts.grid(6, 7, 3),
    ),
    "one-input-regions": dict(in_features=20, out_features=5, region_bits=0, density=0.5),
}
# Every code format: the integer widths, the 2-bit odd codes and nf4.
FORMATS = {"1": 1, "2": 2, "4": 4, "8": 8, "odd": ref.ODD2_FORMAT, "nf4": ref.NF4_FORMAT}
FLOATS = (torch.float32, torch.float64, torch.bfloat16)


def make_layer(config, code_format):
    codebook = ref.codebook_of(code_format)
    bits = ref.width(code_format)
    return st.SpatialLayer(bits=bits, codebook=codebook, **CONFIGS[config])


def region_positions(layer):
    """The region of every sorted input and its position inside the region."""
    region_begin = layer.store.region_begin
    columns = torch.arange(layer.in_features)
    region = torch.searchsorted(region_begin[1:], columns, right=True)
    return region, columns - region_begin[region]


def special_latent(layer, dtype):
    """A latent weight (sorted columns) whose rows hit the quantizer's edge cases: zeros,
    tiny (fp16-subnormal and float32-subnormal scales), huge (past fp16's range), exact ties,
    NaN, +-Inf, negative zeros, a wide range of magnitudes; the other rows random."""
    out, bits = layer.out_features, layer.bits
    _, qmax = ref.code_range(bits)  # nf4: ties sit at midpoints, which scaled halves rarely hit
    latent = torch.randn(out, layer.in_features, dtype=torch.float64) * 0.1
    _, within = region_positions(layer)
    special = [
        torch.zeros(layer.in_features),
        torch.randn(layer.in_features) * 1e-6,
        torch.randn(layer.in_features) * 1e-12,  # refitted, yet below fp16's subnormals
        torch.randn(layer.in_features) * 1e-39,
        torch.randn(layer.in_features) * 1e7,
        # ties: half-integers (halfway between two codes when the scale is 1)
        torch.where(within == 0, float(qmax), (within % (2 * qmax)) - qmax + 0.5),
        torch.where(within == 1, float("nan"), latent[0]),
        torch.where(within == 2, float("inf"), latent[1]),
        torch.where(within == 0, float("-inf"), latent[2]),
        torch.where(within % 2 == 0, -0.0, -latent[3].abs()),
        # magnitudes 2^0 .. 2^-40 in every block: past the Lloyd step's fixed-point precision
        torch.where(latent[4] < 0, -1.0, 1.0) * torch.exp2(-((within * 5) % 41).double()),
    ]
    for row, values in enumerate(special[:out]):
        latent[row] = values
    return latent.to(dtype)


# --- the store ops --------------------------------------------------------------------------------
def assert_bits_equal(actual, expected):
    """Equal bit for bit (NaN payloads and the sign of zero included)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    view = {torch.float32: torch.int32, torch.float16: torch.int16}.get(actual.dtype)
    if view is not None:
        actual, expected = actual.view(view), expected.view(view)
    mismatch = (actual != expected).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} differ, first at {mismatch[:5].tolist()}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
def test_dequantize_and_active_mask_exact(config, code_format):
    layer = make_layer(config, code_format)
    sizes = dict(in_features=layer.in_features, out_features=layer.out_features)
    expected = ref.dequantize(**store(layer), code_format=code_format, **sizes)
    assert_bits_equal(expected, kernel("dequantize", layer))
    assert torch.equal(ref.active_mask(**store(layer), **sizes), kernel("active_mask", layer))


def assert_scales_equal(layer, latent, actual, expected):
    """Scales bit for bit, except that a 1-bit scale (mean |w| to fp16) may round the other
    way where the mean lies at a tie between two fp16 values within float32 rounding: the C++
    sums |w| in float32 in an ISA-dependent order, the reference in float64."""
    actual, expected = actual.view(torch.int16), expected.view(torch.int16)
    differ = (actual != expected).nonzero().flatten()
    if layer.bits != 1 or differ.numel() == 0:
        assert_bits_equal(actual, expected)
        return
    region_begin = layer.store.region_begin
    blocks = layer.region_mask().nonzero()  # (neuron, region) in block order
    for b in differ.tolist():
        n, r = blocks[b].tolist()
        weights = latent[n, region_begin[r] : region_begin[r + 1]].float().double()
        mean = weights.abs().mean()
        a, e = (int(v) for v in (actual[b], expected[b]))
        assert abs(a - e) == 1, (b, a, e)
        halves = torch.tensor([a, e], dtype=torch.int16).view(torch.float16).double()
        midpoint = halves.mean()
        assert abs(mean - midpoint) <= 1e-5 * midpoint, (b, mean.item(), halves.tolist())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_exact(config, code_format, dtype):
    layer = make_layer(config, code_format)
    latent = special_latent(layer, dtype)
    scales, codes = ref.quantize(latent, **layout_of(layer), code_format=code_format)
    kernel("requantize_", layer, latent)
    assert_scales_equal(layer, latent, layer.store.scales, scales)
    assert_bits_equal(layer.store.codes, codes)
    # requantize_ writes the same in place, into fp16 or int16 scales
    arrays = store(layer)
    arrays["scales"] = torch.zeros_like(scales).view(torch.int16)
    arrays["codes"] = torch.zeros_like(codes)
    ref.requantize_(latent, **arrays, code_format=code_format)
    assert_bits_equal(arrays["scales"].view(torch.float16), scales)
    assert_bits_equal(arrays["codes"], codes)
    # and what was written dequantizes the same, NaN blocks included
    sizes = dict(in_features=layer.in_features, out_features=layer.out_features)
    dense = ref.dequantize(**store(layer), code_format=code_format, **sizes)
    assert_bits_equal(dense, kernel("dequantize", layer))
    # NaN exactly in the active blocks that held NaN or Inf
    region, _ = region_positions(layer)
    not_finite = torch.zeros(layer.out_features, layer.store.num_regions)
    not_finite.index_add_(1, region, (~latent.isfinite()).float())
    expected_nan = (not_finite > 0)[:, region] & kernel("active_mask", layer)
    assert torch.equal(dense.isnan(), expected_nan)


def tolerance(dtype):
    # Sums over up to 126 products in another order (bf16: the reference multiplies in bf16)
    return {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


def compute_dtype(dtype):
    """The dtype the C++ products take it in (bf16 is computed in float32, as the layer does)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("batch", [0, 1, 3, 37])  # 1 and 3 take the small-batch kernels
def test_spatial_linear_and_input_gradient(config, code_format, dtype, batch):
    layer = make_layer(config, code_format)
    x = torch.randn(batch, layer.in_features, dtype=dtype)
    grad_y = torch.randn(batch, layer.out_features, dtype=dtype)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    compute = compute_dtype(dtype)
    y = kernel("spatial_linear", layer, x.to(compute), weight, bias).to(dtype)
    expected = ref.spatial_linear(
        x, weight, bias, **store(layer), code_format=code_format, out_features=layer.out_features
    )
    torch.testing.assert_close(y, expected, **tolerance(dtype))
    no_bias = kernel("spatial_linear", layer, x.to(compute), None, None).to(dtype)
    torch.testing.assert_close(
        no_bias,
        ref.spatial_linear(
            x, None, None, **store(layer), code_format=code_format, out_features=layer.out_features
        ),
        **tolerance(dtype),
    )
    grad_x = kernel("spatial_linear_backward_input", layer, grad_y.to(compute)).to(dtype)
    torch.testing.assert_close(
        grad_x,
        ref.spatial_linear_backward_input(
            grad_y, **store(layer), code_format=code_format, in_features=layer.in_features
        ),
        **tolerance(dtype),
    )


# --- activation functions -------------------------------------------------------------------------
ACTIVATION_FLOATS = (torch.float32, torch.float64)  # what the C++ activation ops take


def close(actual, expected):
    """float32: the kernels' polynomial functions are a few ulp off; float64 (libm on both
    sides): a few ulp, or absolutely near cancellations (1 - tanh^2, gelu's left tail, which
    the C++ computes through 1 + erf and the reference through erfc)."""
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-14, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, equal_nan=True)


def points(dtype):
    """A sweep plus the edges: zeros, tiny values, softplus's threshold, exp's range, Inf, NaN."""
    edges = "0 -0 1e-3 -1e-3 1e-30 -1e-30 20 20.001 19.999 88 89 -88 -89 100 -100 1e4 -1e4"
    edges = [float(v) for v in f"{edges} inf -inf nan".split()]
    return torch.cat([torch.linspace(-30, 30, 601, dtype=dtype), torch.tensor(edges, dtype=dtype)])


@pytest.mark.parametrize("fn", range(len(ACTIVATIONS)), ids=ACTIVATIONS)
@pytest.mark.parametrize("dtype", ACTIVATION_FLOATS)
def test_activation_and_backward(fn, dtype):
    x = points(dtype)
    grad = torch.randn_like(x)
    close(kernel("activation", None, x, fn), ref.activation(x, fn))
    close(kernel("activation_backward", None, grad, x, fn), ref.activation_backward(grad, x, fn))


def map_inputs(dtype, batch=300, neurons=11):
    pre = torch.randn(batch, neurons, dtype=dtype) * 4
    pre[0] = 0.0
    pre[1, :3] = torch.tensor([25.0, -25.0, 1e-3], dtype=dtype)
    cells = torch.randint(0, 64, (batch,))
    cells[:64] = torch.arange(64)  # every cell, and so every function, is used
    table = torch.randint(0, len(ACTIVATIONS), (neurons, 64), dtype=torch.uint8)
    grad = torch.randn(batch, neurons, dtype=dtype)
    return pre, cells, table, grad


@pytest.mark.parametrize("dtype", ACTIVATION_FLOATS)
@pytest.mark.parametrize("cell_major", [False, True], ids=["neuron-major", "cell-major"])
def test_activation_map_and_learnable_backward(dtype, cell_major):
    pre, cells, table, grad = map_inputs(dtype)
    if cell_major:  # the layout the module caches; the ops take any
        table = table.t().contiguous().t()
    close(kernel("activation_map", None, pre, cells, table), ref.activation_map(pre, cells, table))
    close(
        kernel("activation_map_backward", None, grad, pre, cells, table),
        ref.activation_map_backward(grad, pre, cells, table),
    )
    grad_pre, grad_logits = kernel("learnable_map_backward", None, grad, pre, cells, table)
    expected_pre, expected_logits = ref.learnable_map_backward(grad, pre, cells, table)
    assert torch.equal(grad_pre, kernel("activation_map_backward", None, grad, pre, cells, table))
    close(grad_pre, expected_pre)
    close(grad_logits, expected_logits)
    for logits in (grad_logits, expected_logits):  # cell-major, as a learnable map's logits
        assert logits.permute(1, 2, 0).is_contiguous()
    # a factored map's: the same gains summed over cells and over neurons
    factored = kernel("factored_map_backward", None, grad, pre, cells, table)
    expected = ref.factored_map_backward(grad, pre, cells, table)
    assert torch.equal(factored[0], grad_pre)
    for got, want in zip(factored[1:], expected[1:], strict=True):
        close(got, want)
    close(factored[1], expected_logits.sum(1))
    assert factored[1].t().is_contiguous()  # function-major, as a factored map's neuron logits


@pytest.mark.parametrize("threads", [1, 2])
def test_factored_backward_does_not_depend_on_the_threads(threads):
    pre, cells, table, grad = map_inputs(torch.float32, batch=64, neurons=2000)  # 8 chunks
    expected = kernel("factored_map_backward", None, grad, pre, cells, table)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = kernel("factored_map_backward", None, grad, pre, cells, table)
    finally:
        torch.set_num_threads(before)
    for got, want in zip(again, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ACTIVATION_FLOATS)
@pytest.mark.parametrize("neurons", [1, 37, 300])  # whole chunks of 256 columns and partial ones
def test_map_argmax(dtype, neurons):
    logits = torch.randint(-2, 3, (neurons, 64, 12)).to(dtype)  # few values: many ties
    logits[0, 0, 4] = logits[0, 0, 9] = float("nan")  # the first NaN wins, as in torch.argmax
    for layout in (logits, logits.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        table = kernel("map_argmax", None, layout)
        assert torch.equal(table, ref.map_argmax(layout))
        assert torch.equal(table, logits.argmax(-1).to(torch.uint8))
        assert table.t().is_contiguous()  # cell-major, as the map kernels read tables
    assert table[0, 0] == 4


@pytest.mark.parametrize("dtype", ACTIVATION_FLOATS)
@pytest.mark.parametrize("neurons", [1, 37, 300])
def test_factored_map_argmax(dtype, neurons):
    # few values: many ties, broken by the first index unless the lead decides
    neuron_logits = torch.randint(-2, 3, (neurons, 12)).to(dtype)
    cell_logits = torch.randint(-2, 3, (64, 12)).to(dtype)
    cell_logits[5, 7] = float("nan")  # cell 5: function 7 everywhere
    initial = torch.randint(0, 12, (neurons, 64), dtype=torch.uint8)
    for lead in (0.0, 1.0, 2.5):
        lead = torch.tensor(lead, dtype=dtype)
        logits = ref.factored_map_logits(neuron_logits, cell_logits, initial, lead)
        for layouts in (
            (neuron_logits, initial),
            (neuron_logits.t().contiguous().t(), initial.t().contiguous().t()),
        ):
            table = kernel("factored_map_argmax", None, layouts[0], cell_logits, layouts[1], lead)
            assert torch.equal(
                table, ref.factored_map_argmax(*layouts[:1], cell_logits, layouts[1], lead)
            )
            assert torch.equal(table, logits.argmax(-1).to(torch.uint8))
            assert table.t().is_contiguous()
        assert (table[:, 5] == 7).all()


def test_activation_map_on_one_function_equals_activation():
    pre, cells, table, grad = map_inputs(torch.float64)
    for fn in range(len(ACTIVATIONS)):
        table.fill_(fn)
        assert torch.equal(ref.activation_map(pre, cells, table), ref.activation(pre, fn))
        assert torch.equal(
            ref.activation_map_backward(grad, pre, cells, table),
            ref.activation_backward(grad, pre, fn),
        )


# --- hashing and statistics -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ACTIVATION_FLOATS)
def test_simhash_cells(dtype):
    x = torch.randn(500, 37, dtype=dtype)
    x[0] = 0.0  # every dot product 0: not positive, cell 0
    projections = torch.randn(6, 37, dtype=dtype)
    cells = kernel("simhash_cells", None, x, projections)
    assert torch.equal(cells, ref.simhash_cells(x, projections))
    assert cells[0] == 0 and len(cells.unique()) > 32


def test_count_hits():
    hits = torch.randint(0, 5, (7, 64))
    cells = torch.randint(0, 64, (200,))
    expected = hits.clone()
    kernel("count_hits_", None, hits, cells)
    ref.count_hits_(expected, cells)
    assert torch.equal(hits, expected)
    empty = hits.clone()
    ref.count_hits_(empty, cells[:0])
    assert torch.equal(empty, hits)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("stat_dtype", ACTIVATION_FLOATS)
@pytest.mark.parametrize("rows", [0, 1, 50])
def test_track_activity(dtype, stat_dtype, rows):
    output = torch.relu(torch.randn(rows, 9, dtype=dtype))
    if rows > 1:
        output[:, 0] = 0.0  # a dead neuron
        output[0, 1] = float("nan")  # NaN counts as non-zero
    activity = torch.rand(9, dtype=stat_dtype)
    mean = torch.randn(9, dtype=stat_dtype)
    expected_activity, expected_mean = activity.clone(), mean.clone()
    kernel("track_activity_", None, output, activity, mean, 0.05)
    ref.track_activity_(output, expected_activity, expected_mean, 0.05)
    torch.testing.assert_close(activity, expected_activity, equal_nan=True)
    torch.testing.assert_close(mean, expected_mean, equal_nan=True)


# --- Morton codes ---------------------------------------------------------------------------------
def test_morton_encode_and_decode():
    xyz = torch.randint(0, 65536, (1000, 3))
    xyz[0] = torch.tensor([65535, 65535, 65535])
    xyz[1] = 0
    codes = kernel("morton_encode", None, xyz)
    assert torch.equal(ref.morton_encode(xyz), codes)
    assert torch.equal(ref.morton_encode(xyz.to(torch.int32)), codes)
    assert torch.equal(ref.morton_decode(codes), kernel("morton_decode", None, codes))
    assert torch.equal(ref.morton_decode(codes), xyz)
    with pytest.raises(ValueError, match="65535"):
        ref.morton_encode(torch.tensor([[0, 65536, 0]]))
    with pytest.raises(ValueError, match="2\\^48"):
        ref.morton_decode(torch.tensor([1 << 48]))


# --- portability ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code_format", FORMATS.values(), ids=FORMATS.keys())
def test_store_ops_run_on_the_meta_device(code_format):
    """Only shape-static tensor ops: the reference traces on meta tensors (codes and scales are
    written in place, so their sizes come from the arrays given)."""
    layer = make_layer("random-quarter-r3", code_format).to("meta")
    arrays = store(layer)
    sizes = dict(in_features=layer.in_features, out_features=layer.out_features)
    dense = ref.dequantize(**arrays, code_format=code_format, **sizes)
    assert dense.shape == (13, 100) and dense.device.type == "meta"
    x = torch.empty(5, 100, device="meta")
    y = ref.spatial_linear(x, None, None, **arrays, code_format=code_format, out_features=13)
    assert y.shape == (5, 13)
    ref.requantize_(torch.empty(13, 100, device="meta"), **arrays, code_format=code_format)


# --- the whole layer on the reference path ------------------------------------------------------
def test_a_model_trains_alike_on_the_reference_path():
    """With the reference impls in place of every C++ kernel (what a device without kernels
    runs), a model with an activation map trains to the same weights and stores."""
    import copy
    import warnings

    import torch.nn.functional as F
    from torch import nn

    from spatium_torch.ops import SCHEMAS

    def train(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
        target = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), target).backward()
            optimizer.step()
        return model(x)

    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(40, 24, bits=4, region_bits=3, density=0.5, connectivity="random",
                        activation="map", map_init="random"),
        st.SpatialLayer(24, 3, bits=2, region_bits=2),
    )  # fmt: skip
    twin = copy.deepcopy(model)
    expected = train(model)
    with warnings.catch_warnings(), torch.library._scoped_library("spatium", "IMPL") as lib:
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in SCHEMAS:
            if not name.startswith("_"):
                lib.impl(name, getattr(ref, name), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("spatium::spatial_linear", "CPU")
        got = train(twin)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        if a.is_floating_point() and key.endswith("weight"):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
