"""Point API, MemoryStats, state_dict round trips and bad input."""

import io

import pytest
import torch
from helpers import second_format
from torch import nn

import spatium_torch as st


def layer_of(**kw):
    torch.manual_seed(0)
    args = dict(in_features=100, out_features=6, bits=4, region_bits=3) | kw
    return st.SpatialLayer(args.pop("in_features"), args.pop("out_features"), **args)


# --- point API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", [False, True])
def test_write_then_read_returns_the_quantized_value(frozen):
    layer = layer_of(density=0.25)
    if frozen:
        st.freeze(layer)
    xyz = tuple(st.morton_decode(torch.tensor([77]))[0].tolist())
    region = 77 >> 3
    never_written = [n for n in range(6) if not layer.block_mask()[n, region * 8]]
    assert never_written, "the test wants a neuron without that block"
    n = never_written[0]
    assert not layer.memory.contains(n, xyz)
    assert layer.memory.read(n, xyz) == 0.0
    layer.memory.write(n, xyz, 0.5)
    assert layer.memory.contains(n, xyz)
    # a lone weight is its block's largest: the top code 8 under the scale 0.5 / 8, exact
    assert layer.memory.read(n, xyz) == 0.5
    assert layer.dequantized_weight()[n, 77] == pytest.approx(layer.memory.read(n, xyz))
    # the rest of the new block is empty
    assert (layer.dequantized_weight()[n, 72:80].count_nonzero()) == 1
    if not frozen:
        assert layer.weight[n, 77].item() == 0.5  # the latent weight follows


def test_point_api_errors():
    layer = layer_of()
    with pytest.raises(IndexError, match="neuron 6"):
        layer.memory.read(6, (0, 0, 0))
    with pytest.raises(ValueError, match="no input"):
        layer.memory.read(0, (200, 200, 200))
    with pytest.raises(ValueError, match=r"\(x, y, z\)"):
        layer.memory.write(0, (1, 2), 1.0)
    with pytest.raises(ValueError, match="integers"):
        layer.memory.read(0, (1.7, 0, 0))
    assert layer.memory.read(0, (1.0, 0, 0)) == layer.memory.read(0, (1, 0, 0))
    assert not layer.memory.contains(0, (200, 200, 200))


# --- stats ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stats_hand_built(bits):
    # 100 inputs, regions of 8 (region_bits 3): 12 full regions and one of 4.
    layer = layer_of(bits=bits, density=0.25, connectivity="random")
    mask = layer.block_mask()
    s = layer.memory.stats()
    assert s.compression_ratio == 32 / bits
    assert s.total_capacity == 6 * 100
    assert s.used_capacity == int(mask.sum())
    assert s.saturation == pytest.approx(mask.sum().item() / 600)
    per = layer.memory.neuron_stats()
    assert [p.used_capacity for p in per] == mask.sum(1).tolist()
    assert sum(p.active_regions for p in per) == s.active_regions == 6 * 3  # round(0.25 * 13)
    assert s.nonzero == int(layer.dequantized_weight().count_nonzero())
    assert s.average_density == pytest.approx(s.used_capacity / s.active_regions)
    assert s.effective_compression == pytest.approx(4 * s.used_capacity / s.bytes)


# --- state_dict -----------------------------------------------------------------------------------
def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("frozen", [False, True])
def test_state_dict_round_trip_is_bitwise(frozen):
    model = nn.Sequential(layer_of(density=0.5), nn.ReLU(), layer_of(in_features=6, out_features=3))
    if frozen:
        st.freeze(model)
    x = torch.randn(10, 100)
    expected = model(x)
    state = save_load(model.state_dict())
    torch.manual_seed(123)
    other = nn.Sequential(layer_of(density=0.5), nn.ReLU(), layer_of(in_features=6, out_features=3))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    if frozen:
        st.freeze(other)
    assert not torch.equal(other(x), expected)
    other.load_state_dict(state)
    assert torch.equal(other(x), expected)


def test_mismatched_state_fails_and_changes_nothing():
    source = layer_of().state_dict()
    for kw in (dict(bits=2), dict(out_features=7), dict(region_bits=4), dict(in_features=99)):
        target = layer_of(density=0.5, **kw).eval()  # a training forward updates activity
        before = [t.clone() for t in target.state_dict().values() if isinstance(t, torch.Tensor)]
        before_out = target(torch.ones(1, target.in_features))
        with pytest.raises(ValueError):
            target.load_state_dict(source)
        after = [t for t in target.state_dict().values() if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert torch.equal(target(torch.ones(1, target.in_features)), before_out)


def test_frozen_state_into_unfrozen_layer_is_refused():
    layer = layer_of()
    state = st.freeze(layer_of()).state_dict()
    with pytest.raises(ValueError, match="freeze"):
        layer.load_state_dict(state)


HEADER_BYTES = 8 * len(st.store.HEADER)
# layer_of(density=0.5): 6 neurons x 13 regions, a 2-word bitmap; the scales follow it.
SCALES_AT = HEADER_BYTES + 16


def packed_damage(change):
    """A damage that edits a copy of the packed store in place (``change(packed)``)."""

    def damage(state):
        packed = state["store.packed"].clone()
        change(packed)
        state["store.packed"] = packed

    return damage


def header_field(name, delta):
    index = st.store.HEADER.index(name)
    return packed_damage(lambda p: p[:HEADER_BYTES].view(torch.int64)[index].add_(delta))


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update({"store.packed": s["store.packed"][:-1]}),
        lambda s: s.update({"store.packed": torch.cat([s["store.packed"], s["store.packed"][:2]])}),
        lambda s: s.update({"store.packed": s["store.packed"][: HEADER_BYTES - 8]}),
        lambda s: s.update({"store.packed": s["store.packed"][: HEADER_BYTES + 8]}),
        packed_damage(lambda p: p[-1].bitwise_xor_(0x11)),  # a code
        packed_damage(lambda p: p[SCALES_AT + 1].bitwise_xor_(0x04)),  # a scale's exponent
        packed_damage(lambda p: p[HEADER_BYTES].bitwise_xor_(0x01)),  # a block fewer
        packed_damage(lambda p: p[SCALES_AT - 1].bitwise_or_(0x80)),  # past the last neuron
        header_field("checksum", 1),
        header_field("format", 4),
        header_field("bits", -2),
        lambda s: s.update({"store.packed": s["store.packed"].float()}),
        lambda s: s.update({"store.packed": s["store.packed"].view(1, -1)}),
    ],
)
def test_damaged_state_fails_clearly_and_changes_nothing(damage):
    state = {k: v.clone() for k, v in layer_of(density=0.5).state_dict().items()}
    damage(state)
    target = layer_of(density=0.5)
    x = torch.randn(2, 100)
    before = target(x)
    with pytest.raises(ValueError, match="SpatialLayer state"):
        target.load_state_dict(state)
    assert torch.equal(target(x), before)


def held(model):
    """What a model holds: its state (cloned), its Parameters and its layers' store arrays."""
    layers = [m for m in model.modules() if isinstance(m, st.SpatialLayer)]
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        list(model.parameters()),
        [t for layer in layers for t in layer.store.arrays()],
    )


def assert_holds(model, before):
    state, parameters, arrays = before
    after = held(model)
    assert after[0].keys() == state.keys()
    assert all(torch.equal(after[0][k], v) for k, v in state.items())
    assert all(p is q for p, q in zip(after[1], parameters, strict=True))
    assert all(t is u for t, u in zip(after[2], arrays, strict=True))


def spatial_mlp(seed, density=1.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        st.SpatialLayer(100, 6, region_bits=3, density=density),
        nn.ReLU(),
        st.SpatialLayer(6, 3, region_bits=1),
        nn.Linear(3, 2),
    )


REFUSALS = {
    "damaged codes in the second layer": (
        lambda s: s["2.store.packed"].__setitem__(-1, s["2.store.packed"][-1] ^ 0x11),
        ValueError,
        r"'2\.store\.'",
    ),
    "a head of another shape": (
        lambda s: s.update({"3.weight": torch.zeros(4, 3), "3.bias": torch.zeros(4)}),
        RuntimeError,
        "size mismatch",
    ),
    "an unexpected key": (
        lambda s: s.update({"4.weight": torch.zeros(1)}),
        RuntimeError,
        "4.weight",
    ),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_load_leaves_the_whole_model_as_it_was(refusal):
    damage, error, match = refusal
    model = spatial_mlp(0).eval()  # a training forward updates activity
    # The saved layers have another layout (fewer blocks): a load replaces their arrays.
    state = {k: v.clone() for k, v in spatial_mlp(1, density=0.25).state_dict().items()}
    damage(state)
    x = torch.randn(4, 100)
    before, outputs = held(model), model(x)
    with pytest.raises(error, match=match):
        st.load_state_dict(model, state)
    assert_holds(model, before)
    assert torch.equal(model(x), outputs)


def test_a_whole_model_load_loads_what_model_load_state_dict_loads():
    source, model = spatial_mlp(1, density=0.25), spatial_mlp(0)
    x = torch.randn(4, 100)
    assert st.load_state_dict(model, source.state_dict()) == ([], [])
    assert torch.equal(model(x), source(x))
    partial = {k: v for k, v in spatial_mlp(2).state_dict().items() if not k.startswith("3.")}
    missing, unexpected = st.load_state_dict(model, partial, strict=False)
    assert missing == ["3.weight", "3.bias"] and unexpected == []
    with pytest.raises(TypeError, match="dict-like"):
        st.load_state_dict(model, [1, 2])


def test_a_spatial_network_loads_all_or_nothing():
    torch.manual_seed(0)
    network = st.SpatialNetwork([100, 6, 3], region_bits=3).eval()
    torch.manual_seed(1)
    source = st.SpatialNetwork([100, 6, 3], region_bits=3, density=0.5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["2.store.packed"][-1] ^= 0x11  # a code
    x = torch.randn(4, 100)
    before, outputs = held(network), network(x)
    with pytest.raises(ValueError, match="checksum"):
        network.load_state_dict(state)
    assert_holds(network, before)
    assert torch.equal(network(x), outputs)
    network.load_state_dict(source.state_dict())
    assert torch.equal(network(x), source(x))


@pytest.mark.parametrize(
    "key, damage, match",
    [
        ("neuron_positions", lambda p: p - 1, r"neuron_positions must lie in \[0, 65535\]"),
        ("neuron_positions", lambda p: p + 65535, r"neuron_positions must lie in \[0, 65535\]"),
        ("neuron_positions", torch.zeros_like, "neuron_positions must be distinct"),
        ("neuron_positions", lambda p: p.float(), "neuron_positions must be an integer tensor"),
        ("input_positions", lambda p: p - 1, r"input_positions must lie in \[0, 65535\]"),
    ],
)
def test_positions_outside_the_space_are_refused_at_load(key, damage, match):
    layer = layer_of(growth_threshold=0.0)
    state = layer_of().state_dict()
    state[key] = damage(layer.get_buffer(key))  # default positions are not saved
    before = held(layer)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert_holds(layer, before)
    assert layer.grow().split == 1  # the layer still grows


def test_neuron_positions_outside_the_grid_are_refused_at_load():
    layer = layer_of(grid_dims=(3, 2, 1), growth_threshold=0.0, max_split_fraction=0.1)
    state = layer.state_dict()
    state["neuron_positions"] = layer.neuron_positions.clone()
    state["neuron_positions"][0] = torch.tensor([3, 0, 0])
    before = held(layer)
    with pytest.raises(ValueError, match=r"neuron_positions must lie in the grid \(3, 2, 1\)"):
        layer.load_state_dict(state)
    assert_holds(layer, before)


@pytest.mark.parametrize(
    "key",
    ["weight", "bias", "activity", "neuron_positions", "input_positions", "store.packed",
     "store.header", "store.codes"],
)  # fmt: skip
@pytest.mark.parametrize("value", [[1, 2], 3])
def test_a_state_entry_that_is_not_a_tensor_is_a_type_error_naming_it(key, value):
    layer = layer_of()
    source = layer_of(density=0.5)
    state = source.state_dict()
    if key in ("store.header", "store.codes"):
        state = second_format(source, state)
    state[key] = value
    before = held(layer)
    with pytest.raises(TypeError, match=f"'{key}' must be a tensor, got {type(value).__name__}"):
        layer.load_state_dict(state)
    assert_holds(layer, before)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    layer = layer_of()
    with pytest.raises(ValueError, match=r"\[\.\.\., 100\].*\(4, 99\)"):
        layer(torch.randn(4, 99))
    with pytest.raises(ValueError, match="scalar"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 100, dtype=torch.int64))
    with pytest.raises(ValueError, match="input is on meta, the layer on cpu"):
        layer(torch.empty(2, 100, device="meta"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits=3), "bits"),
        (dict(bits=True), "bits"),
        (dict(region_bits=49), "region_bits"),
        (dict(region_bits=-1), "region_bits"),
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(connectivity="nearest"), "connectivity"),
        (dict(activation="relu"), "activation"),
        (dict(activation="map", map_init="checkerboard"), "init"),
        (dict(grid_dims=(2, 2, 1)), "grid_dims"),
        (dict(input_positions=torch.zeros(100, 3, dtype=torch.int64)), "distinct"),
        (dict(input_positions=st.layouts.grid(10, 10) + 65535), r"\[0, 65535\]"),
        (dict(input_positions=st.layouts.grid(10, 10) - 1), r"\[0, 65535\]"),
        (dict(input_positions=st.layouts.grid(10, 9)), r"shape \[100, 3\]"),
    ],
)
def test_bad_configurations_raise_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        layer_of(**kw)


def test_float_positions_are_type_errors():
    with pytest.raises(TypeError, match="integer"):
        layer_of(input_positions=st.layouts.grid(10, 10).float())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only torch cannot make CUDA tensors")
def test_cuda_tensors_on_a_cpu_build():
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda"):
        layer_of()(torch.randn(2, 100, device="cuda"))


# --- bytes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, region_bits",
    [(4, 7), (4, 8), (4, 9), (8, 7), (8, 8), (8, 9), (2, 8), (2, 9)],
)
def test_bytes_close_to_bits_over_8_per_stored_weight(bits, region_bits):
    # Beyond the codes: an fp16 scale and ~10 bloom bits a block, a bit of bitmap, 2 directory
    # bytes a neuron, the region table. 2-bit codes at region_bits 7 (32-byte blocks) come to
    # about 11%, above this bound: the scale alone is 6.25% there.
    layer = st.SpatialLayer(1024, 256, bits=bits, region_bits=region_bits)
    s = layer.memory.stats()
    assert s.used_capacity == 1024 * 256
    assert s.bytes <= 1.07 * s.used_capacity * bits / 8


@pytest.mark.parametrize("positions", [None, st.layouts.grid(10, 10)])
@pytest.mark.parametrize("bits", [1, 4])
def test_frozen_layer_bytes_equal_its_state(positions, bits):
    layer = st.freeze(layer_of(bits=bits, density=0.5, input_positions=positions))
    state = layer.state_dict()
    kept = ["bias", "store.packed"] + ([] if positions is None else ["input_positions"])
    assert sorted(state) == sorted(kept)
    defining = layer.memory.bytes - sum(
        t.numel() * t.element_size() for t in (layer.store.region_keys, layer.store.region_begin,
        layer.store.block_begin, layer.store.code_begin, layer.store.bloom, layer.store.input_codes)
    )  # fmt: skip
    assert state["store.packed"].numel() == HEADER_BYTES + defining
    assert layer.memory.bytes == layer.store.nbytes()


def model_bytes(model):
    """What a frozen model needs to compute: codes, scales, biases, and for activation maps the
    4-bit function table and the fp32 hash projections."""
    total = 0
    for module in model.modules():
        if isinstance(module, st.SpatialLayer):
            total += module.store.codes.numel() + 2 * module.store.scales.numel()
            total += 0 if module.bias is None else 4 * module.bias.numel()
        if isinstance(module, st.ActivationMap):
            total += module.table.numel() // 2 + 4 * module.projections.numel()
    return total


@pytest.mark.parametrize(
    "options",
    [{}, dict(activation="map", map_init="random"), dict(activation="map", map_learnable=True)],
    ids=["plain", "map", "learnable map"],
)
def test_a_frozen_model_file_is_within_a_tenth_of_its_bytes(tmp_path, options):
    # The MNIST-1D model of the comparison: 40-256-256-10, 4-bit.
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(40, 256, **options), nn.ReLU(),
        st.SpatialLayer(256, 256, **options), nn.ReLU(),
        st.SpatialLayer(256, 10),
    )  # fmt: skip
    model(torch.randn(8, 40)).sum().backward()  # hit counts, gradients: nothing of it is saved
    st.freeze(model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    size = (tmp_path / "model.pt").stat().st_size
    assert size <= 1.1 * model_bytes(model)
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.manual_seed(1)
    other = st.freeze(
        nn.Sequential(
            st.SpatialLayer(40, 256, **options),
            nn.ReLU(),
            st.SpatialLayer(256, 256, **options),
            nn.ReLU(),
            st.SpatialLayer(256, 10),
        )  # fmt: skip
    )
    other.load_state_dict(loaded)
    x = torch.randn(16, 40)
    torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_freezing_keeps_the_map_functions_and_drops_statistics():
    layer = layer_of(activation="map", map_init="random", map_learnable=True, map_seed=3)
    x = torch.randn(32, 100)
    layer(x)
    expected = layer.eval()(x)
    table = layer.activation_map.function_table().clone()
    st.freeze(layer)
    assert not layer.activation_map.learnable_parameters() and layer.activation_map.hits is None
    assert layer.activation_map.initial_table is None
    assert torch.equal(layer.activation_map.function_table(), table)
    assert layer.activity is None and layer.split_cooldown is None
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.train()(x)  # a frozen layer trains its bias and counts nothing
    assert st.network_stats(layer).layer_stats[0].active_neurons == layer.out_features
    with pytest.raises(ValueError, match="keep_hits=True"):
        layer.activation_map.dead_cells()
    kept = st.freeze(layer_of(activation="map"), keep_hits=True)
    kept(x)
    assert int(kept.activation_map.hits.sum()) == 32 * kept.out_features


def test_default_layout_stores_no_positions():
    default = layer_of().state_dict()
    custom = layer_of(input_positions=st.layouts.grid(10, 10), grid_dims=(3, 3, 3)).state_dict()
    assert "input_positions" not in default and "neuron_positions" not in default
    assert torch.equal(custom["input_positions"], st.layouts.grid(10, 10))
    assert "neuron_positions" not in custom  # the grid's default
    moved = layer_of()
    moved.neuron_positions.copy_(moved.neuron_positions.flip(0))  # as a prune may leave them
    assert torch.equal(moved.state_dict()["neuron_positions"], moved.neuron_positions)


def test_deepcopy_gets_its_own_consistent_store():
    import copy

    layer = layer_of(density=0.5)
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 100)
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone.weight.mul_(2)
    clone(x)
    assert clone.store.codes.data_ptr() != layer.store.codes.data_ptr()
    xyz = tuple(st.morton_decode(torch.tensor([5]))[0].tolist())
    n = int(clone.block_mask()[:, 5].nonzero()[0])
    assert clone.memory.read(n, xyz) == pytest.approx(clone.dequantized_weight()[n, 5].item())
    assert layer.memory.read(n, xyz) == pytest.approx(layer.dequantized_weight()[n, 5].item())
    assert layer.memory.read(n, xyz) != pytest.approx(clone.memory.read(n, xyz))


@pytest.mark.parametrize("activation", [None, "map"])
def test_select_neurons_copies_and_drops_rows_atomically(activation):
    kw = dict(activation=activation, map_init="random", map_learnable=True) if activation else {}
    layer = layer_of(density=0.5, **kw)
    x = torch.randn(4, 100)
    before = layer(x).detach()
    rows = torch.tensor([3, 0, 0, 5])
    layer._select_neurons(rows)
    assert layer.out_features == 4 and layer.weight.shape == (4, 100) and layer.bias.shape == (4,)
    torch.testing.assert_close(layer(x), before[:, rows])
    assert layer.memory.stats().total_capacity == 4 * 100
    if activation:
        assert layer.activation_map.neuron_logits.shape[0] == 4
        assert layer.activation_map.initial_table.shape[0] == 4
    state = layer.state_dict()
    with pytest.raises(IndexError):
        layer._select_neurons(torch.tensor([0, 9]))
    assert layer.out_features == 4 and torch.equal(layer(x), layer(x))
    for key, value in layer.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key])


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("codebook, bits, name", [("nf4", 4, "nf4"), ("odd", 2, "2-bit odd")])
def test_codebook_state_round_trips_and_loads_only_into_layers_of_that_codebook(
    frozen, codebook, bits, name
):
    layer = layer_of(codebook=codebook, bits=bits, density=0.5)
    if frozen:
        st.freeze(layer)
    state = save_load(layer.state_dict())
    twin = layer_of(codebook=codebook, bits=bits, density=0.5, bias=True)
    if frozen:
        st.freeze(twin)
    twin.load_state_dict(state)
    assert torch.equal(twin.dequantized_weight(), layer.dequantized_weight())
    assert twin.memory.read(0, (1, 0, 0)) == layer.memory.read(0, (1, 0, 0))
    integer = layer_of(bits=bits, density=0.5)
    if frozen:
        st.freeze(integer)
    before = integer.dequantized_weight()
    with pytest.raises(ValueError, match=f"{name} in the state but {bits}-bit in this layer"):
        integer.load_state_dict(state)
    assert torch.equal(integer.dequantized_weight(), before)
