"""The int8 inference path: an eval forward that needs no gradient runs on integer dot products
(AVX-512 VNNI, or AVX2) with activations quantized to int8 per region. Its output is bounded
against the float32 product with the dequantized weights, and every case it does not serve
takes the float path unchanged."""

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import digits, train_digits
from torch import nn

import spatium_torch as st

pytestmark = pytest.mark.skipif(
    not st.layer.INT8_KERNELS,
    reason="this CPU has neither AVX-512 VNNI nor AVX2: the float path serves it",
)
BOUND = 1e-2  # the documented relative error bound against the float32 product


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm() / reference.norm()).item()


def float_reference(layer: st.SpatialLayer, x: torch.Tensor) -> torch.Tensor:
    """F.linear on the dequantized weights, in float64."""
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.dequantized_weight().double(), bias).float()


@pytest.mark.parametrize("codes", [1, 2, 4, 8, "odd", "nf4"])
@pytest.mark.parametrize(
    "in_features, out_features, region_bits, density, connectivity",
    [
        (300, 70, 4, 0.5, "local"),
        (100, 6, 3, 1.0, "local"),
        (1000, 37, 6, 0.25, "local"),
        (65, 17, 6, 1.0, "local"),
        (1000, 70, 4, 0.25, "random"),  # the pack gathers neurons: outputs in another order
    ],
)
def test_int8_output_is_within_the_bound_of_the_float_product(
    codes, in_features, out_features, region_bits, density, connectivity
):
    # The bound holds for a batch's outputs together (Frobenius norm): a single output's error
    # is that of rounding each activation to 1/254 of its region's range (and for nf4 each
    # level to 1/254 of its scale), and varies.
    options = {"nf4": dict(bits=4, codebook="nf4"), "odd": dict(bits=2, codebook="odd")}.get(
        codes, dict(bits=codes)
    )
    torch.manual_seed(options["bits"])
    layer = st.SpatialLayer(
        in_features,
        out_features,
        region_bits=region_bits,
        density=density,
        connectivity=connectivity,
        **options,
    )
    st.freeze(layer).eval()
    x = torch.randn(19, in_features)
    with torch.no_grad():
        y = layer(x)
        # Rows are quantized on their own: any batch (register tiles of 8 rows and their
        # remainders) gives each row the same result.
        for batch in (1, 7, 8):
            torch.testing.assert_close(layer(x[-batch:]), y[-batch:], rtol=0, atol=0)
    assert relative_error(y, float_reference(layer, x)) <= BOUND
    layer.inference_precision = "fp32"
    with torch.no_grad():
        assert not torch.equal(layer(x), y)  # the int8 path really ran
        torch.testing.assert_close(layer(x), float_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_custom_layouts_and_3d_inputs():
    positions = st.layouts.grid(10, 10)[torch.randperm(100)]
    layer = st.SpatialLayer(100, 20, input_positions=positions, region_bits=3).eval()
    x = torch.randn(2, 3, 100)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 20)
    assert relative_error(y, float_reference(layer, x)) <= BOUND


@pytest.mark.parametrize("codebook", ["int", "nf4"])
def test_trained_weights_keep_their_accuracy(codebook):
    # A 64-128-10 4-bit MLP trained on digits: the int8 forward's outputs stay within the bound
    # and its test accuracy within one sample (of 450) of the float forward's.
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(64, 128, codebook=codebook),
        nn.ReLU(),
        st.SpatialLayer(128, 10, codebook=codebook),
    )
    train_digits(model, epochs=10)
    _, x_test, _, y_test = digits()
    with torch.no_grad():
        y = model(x_test)
        for layer in (model[0], model[2]):
            layer.inference_precision = "fp32"
        reference = model(x_test)
    assert relative_error(y, reference) <= BOUND
    int8_correct = int((y.argmax(1) == y_test).sum())
    float_correct = int((reference.argmax(1) == y_test).sum())
    assert abs(int8_correct - float_correct) <= 1
    assert float_correct > 0.9 * len(y_test)


def test_forwards_that_need_gradients_or_precision_take_the_float_path():
    torch.manual_seed(0)
    layer = st.SpatialLayer(64, 32).eval()
    x = torch.randn(4, 64)
    expected = float_reference(layer, x)
    # Autograd records this forward (the bias requires grad): the exact float product.
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.eval()
        assert not torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
        y64 = layer(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_the_float_result(bad):
    layer = st.SpatialLayer(64, 32, density=0.5).eval()
    x = torch.randn(3, 64)
    x[1, 5] = bad
    with torch.no_grad():
        y = layer(x)
        layer.inference_precision = "fp32"
        torch.testing.assert_close(y, layer(x), equal_nan=True)


def test_the_pack_follows_the_store():
    torch.manual_seed(0)
    layer = st.SpatialLayer(64, 32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 64)
    for _ in range(2):
        layer.eval()
        with torch.no_grad():
            y = layer(x)
        assert relative_error(y, float_reference(layer, x)) <= BOUND
        layer.train()
        layer(x).square().sum().backward()
        optimizer.step()
    st.freeze(layer).eval()
    xyz = tuple(st.morton_decode(torch.tensor([3]))[0].tolist())
    layer.memory.write(0, xyz, 5.0)  # a point write changes the store in place
    with torch.no_grad():
        y = layer(x)
    assert relative_error(y, float_reference(layer, x)) <= BOUND
    other = st.freeze(st.SpatialLayer(64, 32, density=0.25)).eval()
    layer.load_state_dict(other.state_dict())  # a load replaces the arrays
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)


def test_copies_and_pickles_rebuild_the_pack():
    layer = st.freeze(st.SpatialLayer(64, 32)).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = layer(x)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)


def test_inference_precision_is_validated():
    with pytest.raises(ValueError, match="inference_precision"):
        st.SpatialLayer(8, 4, inference_precision="int4")
    layer = st.SpatialLayer(8, 4, inference_precision="fp32")
    assert layer.inference_precision == "fp32"
    with pytest.raises(ValueError, match="inference_precision"):
        layer.inference_precision = "bf16"


def test_the_pack_refuses_bad_inputs():
    layer = st.SpatialLayer(64, 32)
    pack = layer._inference_pack(layer.store.arrays())
    with pytest.raises(ValueError, match=r"float32 CPU tensor \[batch, 64\]"):
        pack.linear(torch.randn(2, 63), None)
    with pytest.raises(ValueError, match=r"float32 CPU tensor"):
        pack.linear(torch.randn(2, 64).double(), None)
    with pytest.raises(ValueError, match=r"bias must be float32 \[32\]"):
        pack.linear(torch.randn(2, 64), torch.zeros(31))
    assert pack.linear(torch.randn(0, 64), None).shape == (0, 32)


def test_inference_bytes_count_the_kernels_copy():
    layer = st.freeze(st.SpatialLayer(64, 32)).eval()
    assert layer.inference_bytes() == 0
    with torch.no_grad():
        layer(torch.randn(1, 64))
    codes_and_scales = layer.store.codes.numel() + 2 * layer.store.scales.numel()
    assert codes_and_scales <= layer.inference_bytes() <= 1.2 * codes_and_scales


def test_sparse_random_layouts_are_packed_in_fewer_bytes_than_dense():
    # Groups of 16 neurons in index order would hold nearly every region (16 random quarters);
    # the pack gathers neurons that share regions.
    torch.manual_seed(0)
    layers = [
        st.freeze(st.SpatialLayer(1024, 256, density=density, connectivity="random")).eval()
        for density in (0.25, 1.0)
    ]
    with torch.no_grad():
        for layer in layers:
            layer(torch.randn(1, 1024))
    sparse, dense = (layer.inference_bytes() for layer in layers)
    assert sparse < 0.7 * dense, sparse / dense


def test_inference_mode_and_half_inputs_take_the_int8_path():
    torch.manual_seed(0)
    layer = st.freeze(st.SpatialLayer(64, 32)).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert relative_error(y16.float(), float_reference(layer, x.bfloat16().float())) <= BOUND


AVX2_OUTPUTS = """
import sys, torch, spatium_torch as st
assert torch.classes.spatium.InferencePack.isa() == "avx2"
outputs = []
for bits in (1, 2, 4, 8):
    torch.manual_seed(bits)
    layer = st.SpatialLayer(300, 37, bits=bits, region_bits=4, density=0.5).eval()
    st.freeze(layer)
    with torch.no_grad():
        outputs += [layer(torch.randn(batch, 300)) for batch in (1, 3, 4, 21)]
torch.save(outputs, sys.argv[1])
"""


def test_the_avx2_kernels_give_the_same_outputs_as_the_best(tmp_path):
    # SPATIUM_INFERENCE_ISA=avx2 restricts a process to the AVX2 kernels (read once, at the
    # first use). Their int32 sums are exact and their float steps the same, so the outputs
    # equal the AVX-512 kernels' (VNNI and AMX) bit for bit.
    env = {**os.environ, "SPATIUM_INFERENCE_ISA": "avx2"}
    path = tmp_path / "avx2.pt"
    subprocess.run([sys.executable, "-c", AVX2_OUTPUTS, str(path)], env=env, check=True)
    outputs = torch.load(path)
    expected, references = [], []
    for bits in (1, 2, 4, 8):
        torch.manual_seed(bits)
        layer = st.SpatialLayer(300, 37, bits=bits, region_bits=4, density=0.5).eval()
        st.freeze(layer)
        for batch in (1, 3, 4, 21):
            x = torch.randn(batch, 300)
            with torch.no_grad():
                expected.append(layer(x))
            references.append(float_reference(layer, x))
    assert len(outputs) == len(expected)
    for got, want, reference in zip(outputs, expected, references, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if len(got) > 1:  # the bound holds over a batch
            assert relative_error(got, reference) <= BOUND
