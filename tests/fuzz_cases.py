"""Property-based fuzzing of everything that reads a store: the ops on random and mutated
arrays, ``SpatialMemory.from_parts`` (which ``__setstate__`` and every load go through) on
mutated parts, ``load_state_dict`` on mutated states, and the activation, hashing and Morton
ops on random arguments.

Each case must end in a result or a clear Python exception; a crash kills the process. So
test_fuzz.py runs this file in a subprocess: ``python tests/fuzz_cases.py [--scale S]`` prints
one ``cases <property> <count>`` line per property and exits 0 when every case held.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as hs

import spatium_torch as st
from spatium_torch import reference

ops = torch.ops.spatium
CASES: Counter[str] = Counter()
# What a refused argument may raise: a clear exception naming the problem, never an internal one.
REFUSED = (ValueError, TypeError, IndexError)
# (bits, in, out, region_bits, density): full, partial-last and one-input regions, 1-64 neurons
CONFIGS = [
    (1, 90, 7, 3, 0.5),
    (2, 100, 20, 2, 0.25),
    (4, 256, 16, 6, 1.0),
    (8, 40, 9, 3, 0.375),
    (4, 33, 17, 1, 0.6),
    (2, 7, 64, 0, 0.5),
    (8, 130, 3, 4, 1.0),
]
LAYERS = []
for _seed, (_bits, _in, _out, _region_bits, _density) in enumerate(CONFIGS):
    torch.manual_seed(_seed)
    LAYERS.append(
        st.SpatialLayer(_in, _out, bits=_bits, region_bits=_region_bits, density=_density)
    )
INT64 = hs.integers(-(2**63), 2**63 - 1)
SETTINGS = dict(
    deadline=None,
    database=None,
    derandomize=True,  # the same cases on every run: CI stays deterministic
    phases=[Phase.generate],  # a failing case is reported as found: shrinking takes minutes
    suppress_health_check=list(HealthCheck),
)


def _mutate(draw: hs.DrawFn, t: torch.Tensor, pool: list[torch.Tensor]) -> torch.Tensor:
    """One random damage to a 1-D array: an element, its length, its dtype, its layout, or a
    whole array from another memory."""
    kind = draw(
        hs.sampled_from(["element", "element", "near", "resize", "dtype", "layout", "swap"])
    )
    t = t.clone()
    if kind in ("element", "near") and t.numel() > 0:
        i = draw(hs.integers(0, t.numel() - 1))
        if t.dtype == torch.float16:
            t.view(torch.int16)[i] = draw(hs.integers(-(2**15), 2**15 - 1))
        elif t.dtype == torch.uint8:
            t[i] = draw(hs.integers(0, 255))
        elif t.dtype == torch.int32:  # an array an earlier damage converted
            t[i] = draw(hs.integers(-(2**31), 2**31 - 1))
        elif t.dtype == torch.float32:
            t[i] = draw(hs.floats(width=32))
        elif kind == "near":
            t[i] = min(max(int(t[i]) + draw(hs.integers(-9, 9)), -(2**63)), 2**63 - 1)
        else:
            t[i] = draw(INT64)
        return t
    if kind == "resize":
        size = draw(hs.integers(0, t.numel() + 3))
        return torch.cat([t, t.new_zeros(3)])[:size].clone()
    if kind == "dtype":
        return t.to(draw(hs.sampled_from([torch.int32, torch.float32, torch.int64, torch.uint8])))
    if kind == "layout":
        return torch.stack([t, t], 1)[:, 0] if t.numel() else t.view(1, 0)
    return draw(hs.sampled_from(pool)).clone()


@hs.composite
def mutated_stores(draw: hs.DrawFn) -> tuple[int, list[torch.Tensor]]:
    index = draw(hs.integers(0, len(LAYERS) - 1))
    arrays = [t.clone() for t in LAYERS[index].store.arrays()]
    for _ in range(draw(hs.integers(0, 3))):
        which = draw(hs.integers(0, 5))
        pool = [list(layer.store.arrays())[which] for layer in LAYERS]
        arrays[which] = _mutate(draw, arrays[which], pool)
    return index, arrays


@given(
    store=mutated_stores(),
    op=hs.sampled_from(
        ["linear", "linear_grad", "backward_input", "dequantize", "mask", "requantize"]
    ),
    bits_shift=hs.sampled_from([0, 0, 0, 1, -1, 2, 7, -8]),
    size_shift=hs.sampled_from([0, 0, 0, 1, -1, 8]),
    batch=hs.sampled_from([0, 1, 3, 5, 17]),
    dtype=hs.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16]),
)
def ops_on_mutated_arrays(store, op, bits_shift, size_shift, batch, dtype):
    """Every spatial op on damaged arrays: refused with a clear error, or the reference's result."""
    CASES["ops on mutated arrays"] += 1
    index, arrays = store
    layer = LAYERS[index]
    bits = layer.bits + bits_shift
    in_features, out_features = layer.in_features, layer.out_features + size_shift
    try:
        if op in ("linear", "linear_grad"):
            x = torch.randn(batch, in_features, dtype=dtype, requires_grad=op == "linear_grad")
            y = ops.spatial_linear(x, None, None, *arrays, bits, out_features)
            expected = reference.spatial_linear(x.detach(), None, None, *arrays, bits, out_features)
            torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-4, equal_nan=True)
            if op == "linear_grad":
                y.sum().backward()
        elif op == "backward_input":
            grad_y = torch.randn(batch, out_features, dtype=dtype)
            ops.spatial_linear_backward_input(grad_y, *arrays, bits, in_features)
        elif op == "dequantize":
            dense = ops.dequantize(*arrays, bits, in_features, out_features)
            expected = reference.dequantize(*arrays, bits, in_features, out_features)
            assert torch.equal(dense.nan_to_num(), expected.nan_to_num())
        elif op == "mask":
            ops.active_mask(*arrays, in_features, out_features)
        else:
            latent = torch.randn(out_features, in_features, dtype=dtype)
            ops.requantize_(latent, *arrays, bits)
    except REFUSED:
        pass


@hs.composite
def mutated_parts(draw: hs.DrawFn) -> tuple[list[int], dict]:
    layer = LAYERS[draw(hs.integers(0, len(LAYERS) - 1))]
    parts = dict(layer.store.host().parts())
    names = sorted(parts)
    for _ in range(draw(hs.integers(1, 3))):
        name = draw(hs.sampled_from(names))
        kind = draw(hs.sampled_from(["array", "array", "array", "drop", "extra"]))
        if kind == "drop":
            parts.pop(name, None)
        elif kind == "extra":
            parts["unknown"] = torch.zeros(1, dtype=torch.int64)
        elif name in parts:
            pool = [dict(other.store.host().parts()).get(name, parts[name]) for other in LAYERS]
            parts[name] = _mutate(draw, parts[name], pool)
    config = [layer.out_features, layer.in_features, layer.bits, layer.region_bits]
    if draw(hs.booleans()):
        config[draw(hs.integers(0, 3))] += draw(hs.sampled_from([-1, 1, 2, 64, -(2**40)]))
    return config, parts


@given(case=mutated_parts())
def from_parts_on_mutated_parts(case):
    """SpatialMemory.from_parts (the way of every load and of __setstate__): refused, or a
    memory that gives back exactly the parts it was given."""
    CASES["from_parts on mutated parts"] += 1
    config, parts = case
    try:
        memory = torch.classes.spatium.SpatialMemory.from_parts(*config, parts)
    except REFUSED:
        return
    rebuilt = memory.parts()
    assert sorted(rebuilt) == sorted(parts)
    for name, value in rebuilt.items():
        assert same_bits(value, parts[name]), name


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


@hs.composite
def mutated_states(draw: hs.DrawFn) -> tuple[int, dict]:
    index = draw(hs.integers(0, len(LAYERS) - 1))
    state = {k: v.clone() for k, v in LAYERS[index].state_dict().items()}
    donor = LAYERS[draw(hs.integers(0, len(LAYERS) - 1))].state_dict()
    for _ in range(draw(hs.integers(1, 2))):
        key = draw(hs.sampled_from(sorted(state)))
        kind = draw(hs.sampled_from(["flat", "flat", "flat", "donor", "drop", "object"]))
        if kind == "drop":
            state.pop(key, None)
        elif kind == "object":
            state[key] = draw(hs.sampled_from([None, 3, [1, 2], "codes"]))
        elif kind == "donor" and key in donor:
            state[key] = donor[key].clone()
        elif isinstance(state.get(key), torch.Tensor):
            flat = state[key].reshape(-1)
            damaged = _mutate(draw, flat, [flat])
            shape_kept = damaged.numel() == flat.numel() and draw(hs.booleans())
            state[key] = damaged.view(state[key].shape) if shape_kept else damaged
    return index, state


@given(case=mutated_states(), strict=hs.booleans(), atomic=hs.booleans())
def load_mutated_state(case, strict, atomic):
    """Loads of damaged states: refused with the layer exactly as it was, or loaded into a
    layer whose forward runs. ``st.load_state_dict`` is all or nothing; a plain
    ``load_state_dict`` for the layer's own refusals, while torch reports missing and unexpected
    keys after loading the rest (its RuntimeError)."""
    CASES["load_state_dict of mutated states"] += 1
    index, state = case
    bits, in_features, out_features, region_bits, density = CONFIGS[index]
    layer = st.SpatialLayer(
        in_features, out_features, bits=bits, region_bits=region_bits, density=density
    )
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        if atomic:
            st.load_state_dict(layer, state, strict=strict)
        else:
            layer.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        assert "Error(s) in loading state_dict" in str(error), error
        if atomic:
            assert_state(layer, before)
        return
    except REFUSED:
        assert_state(layer, before)
        return
    layer(torch.randn(2, layer.in_features))


def assert_state(layer: st.SpatialLayer, expected: dict[str, torch.Tensor]) -> None:
    state = layer.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert same_bits(state[key], value), key


@given(
    fn=hs.integers(-3, 14),
    batch=hs.integers(0, 5),
    neurons=hs.integers(0, 9),
    cell=hs.sampled_from([0, 1, 63, 63, 64, -1, 2**40]),
    table_value=hs.sampled_from([0, 3, 11, 11, 12, 255]),
    shape_error=hs.sampled_from([None, None, None, "cells", "table", "logits", "projections"]),
    dtype=hs.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
)
def activation_ops_on_random_arguments(fn, batch, neurons, cell, table_value, shape_error, dtype):
    """The activation-map, hashing and statistics ops with cells, tables, functions and shapes
    in and out of range."""
    CASES["activation ops"] += 1
    pre = torch.randn(batch, neurons).to(dtype)
    cells = torch.randint(0, 64, (batch + (shape_error == "cells"),))
    if cells.numel():
        cells[0] = cell
    table = torch.randint(0, 12, (neurons + (shape_error == "table"), 64), dtype=torch.uint8)
    if table.numel():
        table.view(-1)[-1] = table_value
    logits = torch.randn(neurons, 64, 12 - (shape_error == "logits")).to(dtype)
    neuron_logits = torch.randn(neurons, 12 - (shape_error == "logits")).to(dtype)
    cell_logits, lead = torch.randn(64, 12).to(dtype), torch.tensor(float(fn)).to(dtype)
    projections = torch.randn(6 + (shape_error == "projections"), neurons).to(dtype)
    hits = torch.zeros(neurons, 64, dtype=torch.int64)
    for call in (
        lambda: ops.activation(pre, fn),
        lambda: ops.activation_backward(pre, pre, fn),
        lambda: ops.activation_map(pre, cells, table),
        lambda: ops.activation_map_backward(pre, pre, cells, table),
        lambda: ops.learnable_map_backward(pre, pre, cells, table),
        lambda: ops.map_argmax(logits),
        lambda: ops.factored_map_backward(pre, pre, cells, table),
        lambda: ops.factored_map_argmax(neuron_logits, cell_logits, table, lead),
        lambda: ops.count_hits_(hits, cells),
        lambda: ops.simhash_cells(pre, projections),
        lambda: ops.track_activity_(pre, torch.zeros(neurons), torch.zeros(neurons), 0.5),
    ):
        with contextlib.suppress(REFUSED):
            call()


@given(
    values=hs.lists(INT64, min_size=0, max_size=12),
    columns=hs.sampled_from([3, 3, 2, 4]),
    dtype=hs.sampled_from([torch.int64, torch.int32, torch.float32]),
)
def morton_ops_on_random_values(values, columns, dtype):
    """Morton encode/decode of any value: in range it round-trips, else a clear error."""
    CASES["morton ops"] += 1
    rows = len(values) // columns
    xyz = torch.tensor(values[: rows * columns], dtype=torch.int64).view(rows, columns).to(dtype)
    try:
        codes = ops.morton_encode(xyz)
    except REFUSED:
        pass
    else:
        assert torch.equal(ops.morton_decode(codes), xyz.to(torch.int64))
    with contextlib.suppress(REFUSED):
        ops.morton_decode(torch.tensor(values, dtype=torch.int64).to(dtype))


# (property, examples at scale 1): 10,000 cases in all
PROPERTIES = [
    (ops_on_mutated_arrays, 4000),
    (from_parts_on_mutated_parts, 2000),
    (load_mutated_state, 2000),
    (activation_ops_on_random_arguments, 1000),
    (morton_ops_on_random_values, 1000),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="examples per property x this")
    args = parser.parse_args()
    torch.manual_seed(0)
    failed = []
    for prop, examples in PROPERTIES:
        count = max(1, round(examples * args.scale))
        try:
            settings(**SETTINGS, max_examples=count)(prop)()
        except Exception as error:  # report every property, then fail
            failed.append(prop.__name__)
            print(f"FAILED {prop.__name__}: {type(error).__name__}: {error}", flush=True)
    for name, count in CASES.items():
        print(f"cases {name.replace(' ', '_')} {count}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
