"""st.portable / st.export_onnx: SpatialLayers as standard torch ops, exported to ONNX and run
by onnxruntime."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatium_torch as st


def codes(kind: int | str) -> dict:
    """A code width, "odd" or "nf4", as SpatialLayer's keyword arguments."""
    return {"nf4": dict(bits=4, codebook="nf4"), "odd": dict(bits=2, codebook="odd")}.get(
        kind, dict(bits=kind)
    )


def sparse_mlp(kind: int | str) -> nn.Sequential:
    torch.manual_seed(codes(kind)["bits"])
    positions = torch.randint(0, 50, (37, 3))  # inputs out of Morton order
    return nn.Sequential(
        st.SpatialLayer(
            37, 19, region_bits=3, density=0.5, input_positions=positions, **codes(kind)
        ),
        nn.ReLU(),
        st.SpatialLayer(19, 5, region_bits=2, bias=False, **codes(kind)),
    ).eval()


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("kind", [1, 2, 4, 8, "odd", "nf4"])
def test_portable_layers_hold_the_same_quantized_weights(kind, frozen):
    model = sparse_mlp(kind)
    if frozen:
        st.freeze(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = st.portable(model)
    assert [type(m).__name__ for m in copy] == ["PortableLinear", "ReLU", "PortableLinear"]
    for layer, portable in zip(model[::2], copy[::2], strict=True):
        assert torch.equal(portable.weight(), layer.dequantized_weight())
        assert portable.codes.dtype == torch.uint8
        row_bytes = -(-layer.in_features * layer.bits // 8)
        assert portable.codes.numel() == layer.out_features * row_bytes
    x = torch.randn(6, 37)
    with torch.no_grad():
        hidden = F.relu(F.linear(x, model[0].dequantized_weight(), model[0].bias))
        assert torch.equal(copy(x), F.linear(hidden, model[2].dequantized_weight()))
        for layer in model[::2]:
            layer.inference_precision = "fp32"
        torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-6)
    # The model itself is untouched.
    assert isinstance(model[0], st.SpatialLayer)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_portable_keeps_dtypes_sharing_and_refuses_activation_maps():
    layer = st.SpatialLayer(16, 16, bits=4, region_bits=2)
    copy = st.portable(nn.Sequential(layer, nn.Tanh(), layer))
    assert copy[0] is copy[2]  # a shared layer stays shared
    single = st.portable(layer)
    assert isinstance(single, st.PortableLinear)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(3, 16, dtype=dtype)
        with torch.no_grad():
            assert single(x).dtype == dtype
    with pytest.raises(NotImplementedError, match="activation map"):
        st.portable(st.SpatialLayer(16, 8, activation="map"))


def exporters():
    """The TorchScript exporter always; the dynamo one where onnxscript is installed."""
    found = [False]
    try:
        import onnxscript  # noqa: F401

        found.append(True)
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("dynamo", exporters())
@pytest.mark.parametrize("kind", [1, 4, 8, "odd", "nf4"])
def test_export_onnx_runs_in_onnxruntime_and_keeps_the_codes_packed(kind, dynamo):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    bits = codes(kind)["bits"]
    model = nn.Sequential(st.SpatialLayer(256, 128, **codes(kind)), nn.ReLU(), nn.Linear(128, 4))
    st.freeze(model).eval()
    x = torch.randn(5, 256)
    f = io.BytesIO()
    st.export_onnx(model, (x,), f, dynamo=dynamo)
    session = ort.InferenceSession(f.getvalue())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = st.portable(model)(x)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-6)
    # The file holds the packed codes, not a float32 weight folded from them.
    graph = onnx.load_from_string(f.getvalue()).graph
    initializers = [(tuple(t.dims), t.data_type) for t in graph.initializer]
    assert ((128, 256 * bits // 8), onnx.TensorProto.UINT8) in initializers
    assert ((128, 256), onnx.TensorProto.FLOAT) not in initializers
    assert len(f.getvalue()) < 128 * 256 * 4 / 2


@pytest.mark.parametrize("dynamo", exporters())
def test_onnx_export_of_a_spatial_layer_points_to_portable(dynamo):
    model = nn.Sequential(st.SpatialLayer(8, 4), nn.ReLU())
    st.freeze(model).eval()
    with pytest.raises(Exception, match=r"no ONNX form: export st.portable\(model\)"):
        torch.onnx.export(model, (torch.randn(2, 8),), io.BytesIO(), dynamo=dynamo)
