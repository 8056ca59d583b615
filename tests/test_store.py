"""The store as tensors: never stale, on the layer's device, flat state, compile and export."""

import copy
import io
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICES
from helpers import second_format
from torch import nn

import spatium_torch as st


def layer_of(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    args = dict(in_features=100, out_features=6, bits=4, region_bits=3, density=0.5) | kw
    return st.SpatialLayer(args.pop("in_features"), args.pop("out_features"), **args).to(device)


def fresh_output(layer, weight, x):
    """What a fresh layer of the same layout computes with this latent weight."""
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        fresh.weight.copy_(weight)
    return fresh(x)


# --- never stale ----------------------------------------------------------------------------------
def _random_like(layer, *shape):
    return torch.randn(*shape, device=layer.weight.device)


EDITS = {
    "data mul_": lambda layer: layer.weight.data.mul_(0.5),
    "data zero": lambda layer: layer.weight.data.zero_(),
    "data lerp_ (EMA)": lambda layer: layer.weight.data.lerp_(_random_like(layer, 6, 100), 0.3),
    "data assignment": lambda layer: setattr(layer.weight, "data", _random_like(layer, 6, 100)),
    "vector_to_parameters": lambda layer: nn.utils.vector_to_parameters(
        _random_like(layer, 6 * 100 + 6), layer.parameters()
    ),
    "in place under no_grad": lambda layer: torch.no_grad()(layer.weight.add_)(0.1),
    "load_state_dict": lambda layer: layer.load_state_dict(layer_of(seed=5).state_dict()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_every_write_to_the_latent_weight_reaches_the_next_forward(edit, device):
    layer = layer_of(device=device)
    x = torch.randn(4, 100, device=device)
    before = layer(x).detach()
    edit(layer)
    after = layer(x).detach()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh_output(layer, layer.weight.detach(), x), rtol=0, atol=0)
    # the dense reference on the dequantized weights
    expected = F.linear(x, layer.dequantized_weight(), layer.bias.detach())
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def test_a_kept_data_alias_is_followed_across_forwards():
    layer = layer_of()
    x = torch.randn(4, 100)
    alias = layer.weight.data
    layer(x)
    alias.mul_(-1)  # written after the store last quantized
    torch.testing.assert_close(layer(x), fresh_output(layer, layer.weight.detach(), x))


def test_an_unchanged_latent_weight_is_not_requantized(monkeypatch):
    layer = layer_of()
    calls = []
    original = layer._requantize
    monkeypatch.setattr(layer, "_requantize", lambda: calls.append(1) or original())
    x = torch.randn(2, 100)
    layer(x)
    layer(x)
    assert calls == []
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer(x)
    layer(x)
    assert calls == [1]


def test_a_backward_through_codes_changed_since_its_forward_is_refused():
    layer = layer_of()
    x = torch.randn(3, 100, requires_grad=True)
    y = layer(x)
    layer.weight.data.mul_(2)
    layer(x)  # re-quantizes the store in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --- devices and dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "map"])
def test_meta_construction_to_empty_and_load_equal_the_original(activation):
    original = layer_of(connectivity="random", activation=activation)
    state = original.state_dict()
    with torch.device("meta"):
        torch.manual_seed(1)  # another random layout: the state brings the original's
        layer = st.SpatialLayer(
            100, 6, bits=4, region_bits=3, density=0.5, connectivity="random",
            activation=activation,
        )  # fmt: skip
    assert layer.weight.is_meta and layer.store.codes.is_meta and layer.activity.is_meta
    assert layer(torch.empty(3, 100, device="meta")).shape == (3, 6)
    layer.to_empty(device="cpu")
    layer.load_state_dict(state)
    x = torch.randn(5, 100)
    torch.testing.assert_close(layer(x), original(x), rtol=0, atol=0)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


@pytest.mark.parametrize("frozen", [False, True])
def test_to_meta_moves_the_store(frozen):
    layer = layer_of()
    if frozen:
        st.freeze(layer)
    layer.to("meta")
    assert all(t.is_meta for t in layer.store.arrays())
    assert all(t.is_meta for t in layer.state_dict().values())
    with pytest.raises(ValueError, match="meta device"):
        layer.memory.stats()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_casts_keep_the_codes_and_train(dtype, device):
    model = nn.Sequential(layer_of(), nn.ReLU(), layer_of(in_features=6, out_features=3))
    model.to(device)
    codes = [(m.store.scales.clone(), m.store.codes.clone()) for m in model[::2]]
    model.to(dtype)
    x = torch.randn(8, 100, dtype=dtype, device=device)
    y = model(x)
    assert y.dtype == dtype
    for layer, (scales, stored) in zip(model[::2], codes, strict=True):
        assert layer.weight.dtype == dtype
        assert layer.activity.dtype == layer.output_mean.dtype == torch.float32
        assert torch.equal(layer.store.scales, scales) and torch.equal(layer.store.codes, stored)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()
    assert model[0].weight.grad.dtype == dtype
    assert not torch.equal(model[0].store.codes, codes[0][1])  # steps re-quantize


def test_input_on_another_device_is_a_clear_error():
    with pytest.raises(ValueError, match="input is on meta, the layer on cpu"):
        layer_of()(torch.empty(2, 100, device="meta"))


# --- state as flat tensors ------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", [False, True])
def test_safetensors_round_trip_is_bitwise(tmp_path, frozen):
    safetensors = pytest.importorskip("safetensors.torch")  # absent on the GPU check's machine
    load_file, save_file = safetensors.load_file, safetensors.save_file

    def model_of(seed):
        torch.manual_seed(seed)
        return nn.Sequential(
            layer_of(seed, connectivity="random", activation="map", map_learnable=True),
            layer_of(seed, in_features=6, out_features=3, input_positions=st.layouts.grid(2, 3)),
        )

    model = model_of(0)
    if frozen:
        st.freeze(model)
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, tmp_path / "model.safetensors")
    other = model_of(1)
    if frozen:
        st.freeze(other)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(4, 100)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
def test_a_state_of_the_second_format_loads(frozen, learnable):
    # The second format saved positions, growth statistics, a map's logits and hit counts,
    # frozen or not.
    options = dict(connectivity="random", activation="map", map_init="random")
    layer = layer_of(map_learnable=learnable, **options)
    layer(torch.randn(4, 100))
    state = second_format(layer, layer.state_dict())
    target = layer_of(seed=3, map_learnable=learnable, **options)
    if frozen:
        del state["weight"]
        state["store.header"][st.store.HEADER.index("frozen")] = 1
        st.freeze(layer), st.freeze(target)
    target.load_state_dict(state)
    x = torch.randn(8, 100)
    torch.testing.assert_close(target.eval()(x), layer.eval()(x), rtol=0, atol=0)
    damaged = dict(state, **{"store.codes": state["store.codes"].clone()})
    damaged["store.codes"][0] ^= 0x11
    with pytest.raises(ValueError, match="checksum"):
        target.load_state_dict(damaged)


def test_a_map_table_naming_no_function_is_refused():
    layer = layer_of(activation="map")
    state = layer.state_dict()
    state["activation_map.table"] = torch.full((6, 32), 0xCC, dtype=torch.uint8)  # 12 and 12
    with pytest.raises(ValueError, match="function 12"):
        layer.load_state_dict(state)


def test_a_state_of_the_first_format_loads():
    layer = layer_of(connectivity="random")
    state = second_format(layer, layer.state_dict())
    header = state.pop("store.header").tolist()
    extra = {"format": 1}
    extra |= dict(
        zip(("in_features", "out_features", "bits", "region_bits"), header[1:5], strict=True)
    )
    extra |= {"frozen": bool(header[5]), "checksum": header[6]}
    for name in st.store.ARRAYS:
        extra[name] = state.pop("store." + name)
    extra["scales"] = extra["scales"].view(torch.int16)  # the first format's dtype
    state["_extra_state"] = extra
    target = layer_of(seed=3)
    target.load_state_dict(state)
    x = torch.randn(2, 100)
    torch.testing.assert_close(target(x), layer(x), rtol=0, atol=0)
    state["_extra_state"] = {"format": 9}
    with pytest.raises(ValueError, match="format 1"):
        layer_of().load_state_dict(state)


# --- compile and export ---------------------------------------------------------------------------
def test_compiled_training_does_not_recompile_and_follows_the_latent_weight():
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(32, 16, bits=4, region_bits=3, density=0.5, activation="map",
                        map_learnable=True),
        st.SpatialLayer(16, 4, bits=2, region_bits=3),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    compiled = torch.compile(model, fullgraph=True)
    x, target = torch.randn(8, 32), torch.randint(0, 4, (8,))

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(compiled(x), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    first = [step() for _ in range(2)]
    torch.compiler.set_stance("fail_on_recompile")
    try:
        losses = [step() for _ in range(10)]
    finally:
        torch.compiler.set_stance("default")
    assert losses[-1] < first[0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_of_a_frozen_model_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(64, 16, bits=4, region_bits=3, density=0.5), nn.ReLU(),
        st.SpatialLayer(16, 4, bits=1, region_bits=2, activation="map"),
    )  # fmt: skip
    st.freeze(model).eval()
    x = torch.randn(5, 64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_onnx_export_and_torchscript_say_what_is_unsupported():
    model = nn.Sequential(st.SpatialLayer(8, 4), nn.ReLU())
    st.freeze(model).eval()
    x = torch.randn(2, 8)
    with pytest.raises(NotImplementedError, match="spatial_linear.*no ONNX form"):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)
    with pytest.raises(NotImplementedError, match="torch.jit.script"):
        torch.jit.script(model)
    with torch.no_grad():  # tracing takes the float path: the fp32 reference, not int8
        traced = torch.jit.trace(model, x, check_trace=False)
        model[0].inference_precision = "fp32"
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("form", st.activation.LOGIT_FORMS)
def test_a_data_edit_of_map_logits_reaches_the_next_forward(form):
    layer = layer_of(activation="map", map_learnable=True, map_logit_form=form).eval()
    x = torch.randn(8, 100)
    before = layer(x).detach()
    table = layer.activation_map.function_table().clone()
    name = "logits" if form == "full" else "neuron_logits"
    getattr(layer.activation_map, name).data[..., st.ops.ACTIVATIONS.index("abs")] += 100.0
    assert (layer.activation_map.function_table() == st.ops.ACTIVATIONS.index("abs")).all()
    assert not torch.equal(layer.activation_map.function_table(), table)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias.detach()).abs()
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer(x).detach(), before)
    layer.train()  # training applies the same argmax functions
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-6)


# --- threads --------------------------------------------------------------------------------------
def test_a_forward_racing_loads_sees_one_state_or_the_other():
    # Two states of one layout (every block active) with other weights and biases; one thread
    # runs forwards while this one loads them in turn, switching threads every microsecond.
    states = [layer_of(seed, in_features=256, out_features=64, density=1.0) for seed in (1, 2)]
    states = [s.state_dict() for s in states]
    layer = layer_of(in_features=256, out_features=64, density=1.0).eval()
    x = torch.randn(4, 256)
    expected = []
    with torch.no_grad():
        for state in states:
            layer.load_state_dict(state)
            expected.append(layer(x))
    assert not torch.equal(*expected)
    stop, outputs, errors = threading.Event(), [], []

    def forwards():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    outputs.append(layer(x))
        except Exception as error:  # noqa: BLE001  (reported below, with the outputs)
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=forwards)
    try:
        thread.start()
        deadline, loads = time.monotonic() + 1.5, 0
        while time.monotonic() < deadline:
            layer.load_state_dict(states[loads % 2])
            loads += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors
    assert loads > 20 and len(outputs) > 20
    mixed = [y for y in outputs if not any(torch.equal(y, e) for e in expected)]
    assert len(mixed) == 0, f"{len(mixed)} of {len(outputs)} forwards mixed the two states"
