"""Quantization quality: the error of each width's scale rule on large Gaussian and
heavy-tailed weights, against the bounds the design promises, and saturation."""

import pytest
import torch

import spatium_torch as st
from spatium_torch.reference import NF4_LEVELS, NF4_MIDPOINTS

SIZE = 4096


def weights(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(SIZE, SIZE, generator=generator) * 0.02
    # Student-t with 3 degrees of freedom: a normal over the root of a scaled chi-square
    normal = torch.randn(SIZE, SIZE, generator=generator)
    chi2 = torch.randn(3, SIZE, SIZE, generator=generator).pow(2).sum(0)
    return normal / (chi2 / 3).sqrt() * 0.02


def relative_error(weight: torch.Tensor, bits: int, codebook: str = "int") -> float:
    layer = st.SpatialLayer(SIZE, SIZE, bits=bits, codebook=codebook, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return ((weight - layer.dequantized_weight()).norm() / weight.norm()).item()


def symmetric_absmax_error(weight: torch.Tensor, bits: int) -> float:
    """The rule the scale search replaced: codes +-(2^(b-1) - 1) under absmax / max code,
    blocks of 64 (the default region)."""
    top = (1 << (bits - 1)) - 1
    w = weight.view(-1, 64)
    scale = (w.abs().amax(1, keepdim=True) / top).half().float()
    return ((w - (w / scale).round().clamp(-top, top) * scale).norm() / w.norm()).item()


# Upper bounds of ||W - deq W|| / ||W|| (measured: Gaussian 0.365 / 0.0921 / 0.0059, Student-t
# 0.450 / 0.153 / 0.0108 at 2 / 4 / 8 bits). Gaussian 4-bit matches bitsandbytes nf4 (0.092,
# same block size); heavy tails favour nf4's non-uniform levels (0.123), which integer codes
# cannot follow. 2-bit: the optimal ternary quantizer reaches about 0.44; the extra level
# takes it lower.
BOUNDS = {
    ("gaussian", 2): 0.37,
    ("gaussian", 4): 0.0925,
    ("gaussian", 8): 0.0059,
    ("student-t", 2): 0.46,
    ("student-t", 4): 0.157,
    ("student-t", 8): 0.0109,
}


@pytest.mark.parametrize("kind", ["gaussian", "student-t"])
def test_weight_error_within_bounds_and_below_the_absmax_rule(kind):
    weight = weights(kind)
    for bits in (2, 4, 8):
        error = relative_error(weight, bits)
        assert error <= BOUNDS[kind, bits], (bits, error)
        assert error < symmetric_absmax_error(weight, bits), bits
    # 1 bit keeps mean |w|: fewer bits never beat more
    assert relative_error(weight, 1) > relative_error(weight, 2)


# The 2-bit odd codes (measured: Gaussian 0.342, Student-t 0.567): four symmetric levels fit
# bell-shaped weights better than the integer codes -1..2; heavy tails want a zero level.
def test_odd_codes_beat_the_integer_codes_on_gaussian_weights_only():
    gaussian, heavy = weights("gaussian"), weights("student-t")
    assert relative_error(gaussian, 2, codebook="odd") <= 0.345
    assert relative_error(gaussian, 2, codebook="odd") < relative_error(gaussian, 2)
    assert relative_error(heavy, 2, codebook="odd") <= 0.57
    assert relative_error(heavy, 2, codebook="odd") > relative_error(heavy, 2)


def bitsandbytes_nf4_error(weight: torch.Tensor) -> float:
    """bitsandbytes' nf4 rule: blocks of 64 scaled by their float32 absmax, each weight at its
    nearest level."""
    w = weight.view(-1, 64)
    scale = w.abs().amax(1, keepdim=True)
    level = NF4_LEVELS[torch.bucketize(w / scale, NF4_MIDPOINTS)]
    return ((w - level * scale).norm() / w.norm()).item()


# nf4 (measured: Gaussian 0.0896, Student-t 0.1189): below bitsandbytes' nf4 (0.092 / 0.123 as
# the library measures; 0.0920 / 0.1216 for its rule here) and below integer 4-bit codes.
NF4_BOUNDS = {"gaussian": 0.0900, "student-t": 0.1195}


@pytest.mark.parametrize("kind", ["gaussian", "student-t"])
def test_nf4_error_below_bitsandbytes_nf4_and_integer_codes(kind):
    weight = weights(kind)
    error = relative_error(weight, 4, codebook="nf4")
    assert error <= NF4_BOUNDS[kind]
    assert error < bitsandbytes_nf4_error(weight)
    assert error < relative_error(weight, 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_huge_weights_clip_at_the_documented_limit(bits):
    layer = st.SpatialLayer(64, 1, bits=bits, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.weight[0, 0] = 1e9
        layer.weight[0, 1] = -1e9
    w_q = layer.dequantized_weight()
    top = 65504.0 * (1 << (bits - 1))  # the largest scale times the largest code
    assert w_q.isfinite().all()
    assert w_q.abs().max() == top
    assert w_q[0, 1] == -65504.0 * ((1 << (bits - 1)) - 1)  # the other side has one level less


def test_nf4_huge_weights_clip_at_the_largest_scale_on_both_sides():
    layer = st.SpatialLayer(64, 1, bits=4, codebook="nf4", bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.weight[0, 0] = 1e9
        layer.weight[0, 1] = -1e9
    w_q = layer.dequantized_weight()
    assert w_q.isfinite().all()
    assert w_q[0, 0] == 65504.0 and w_q[0, 1] == -65504.0  # nf4's levels reach -1 and +1
