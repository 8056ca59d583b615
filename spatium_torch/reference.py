"""Reference implementations of every ``torch.ops.spatium`` op in plain torch.

This is the portable path: it uses only ordinary tensor ops (indexing, gather/scatter,
``index_add_``, ``searchsorted``, elementwise math), so it runs wherever torch does (CPU, CUDA,
other backends) and follows the arrays to their device. It is written for clarity rather than
speed: per-weight quantities are dense ``[out, in]`` tensors, and the only Python loops run
over the 12 activation functions or the few steps of a bit spread. The C++ kernels are tested
against it (``tests/test_reference.py``): the store ops (``dequantize``, ``active_mask``,
``requantize_``) bit for bit, the products and activation functions to floating-point
tolerance.

The store arrays and their layout are those of ``csrc/core/spatial_memory.h``:

- ``region_begin`` int64 ``[regions + 1]``: first (Morton-sorted) input of each region.
- ``bitmap`` int64 ``[ceil(out * regions / 64)]``: bit ``n * regions + r`` (little-endian
  within each word) says block (neuron ``n``, region ``r``) is active.
- ``block_begin``, ``code_begin`` int64 ``[ceil(out / 8) + 1]``: the directory, derived from
  the bitmap; only its totals (the last entries) are read here.
- ``scales`` float16 (or int16 holding fp16 bits) ``[blocks]``: one per active block, in
  (neuron, region) order.
- ``codes`` uint8: each active block's codes, packed planar: a block of ``count`` codes takes
  ``q = ceil(count * bits / 8)`` bytes and code ``j`` sits in byte ``j % q`` at bit
  ``(j // q) * bits``, stored as ``code + offset`` (``offset`` 1, 7, 127 for 2, 4, 8 bits, so
  codes run -1..2, -7..8, -127..128; for 1 bit, stored 1 is +1 and 0 is -1).

The ops take a *code format*: a width (1, 2, 4, 8) for integer codes, :data:`ODD2_FORMAT`:
2-bit odd codes {-3, -1, 1, 3} (a weight is ``scale * (2 * stored - 3)``), or
:data:`NF4_FORMAT`: 4-bit codes that index :data:`NF4_LEVELS` (a weight is
``scale * NF4_LEVELS[stored]``).

Inputs and weight columns are in Morton-sorted order, as the ops take them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

VALID_BITS = (1, 2, 4, 8)
#: The code format of 4-bit indices into NF4_LEVELS (the C++ ``quant::kNf4``).
NF4_FORMAT = 0x14
#: The code format of 2-bit odd codes {-3, -1, 1, 3} (the C++ ``quant::kOdd2``).
ODD2_FORMAT = 0x12
VALID_FORMATS = (*VALID_BITS, ODD2_FORMAT, NF4_FORMAT)
#: The stored value of the code +1, which blocks of zeros and non-finite blocks store.
ODD2_PLUS_ONE = 2
#: NormalFloat4 levels (Dettmers et al., QLoRA, 2023): 7 negative, 0, 8 positive.
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928010, -0.5250730515, -0.3949174881, -0.2844413817, -0.1847734302,
        -0.0910500363, 0.0, 0.0795802996, 0.1609302014, 0.2461123019, 0.3379152417,
        0.4407098293, 0.5626170039, 0.7229568362, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
#: Midpoints between consecutive levels, in float32: a value's index is the number below it.
NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) * 0.5
NF4_ZERO = 7  # the stored index of level 0
HALF_MAX_BITS = 0x7BFF  # 65504, the largest finite fp16
HALF_NAN_BITS = 0x7E00  # the scale of a block with a non-finite weight
HALF_SIGN_BITS = -0x8000  # the sign bit of fp16 bits held in int16
DIRECTORY_STRIDE = 8  # neurons per directory entry
LEAKY_SLOPE = 0.01
SOFTPLUS_THRESHOLD = 20.0
MORTON_COORD_BITS = 16
MORTON_CODE_BITS = 48


# --- the block layout -----------------------------------------------------------------------------
def code_offset(bits: int) -> int:
    """The stored value of code 0 for 2, 4, 8 bits (1, 7, 127); 1-bit codes have no zero."""
    return 0 if bits == 1 else (1 << (bits - 1)) - 1


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code of a width: (-1, 1), (-1, 2), (-7, 8), (-127, 128)."""
    return (-1, 1) if bits == 1 else (-code_offset(bits), code_offset(bits) + 1)


#: Per format: the clipping ratio (of absmax / largest level) the scale search starts from and
#: the Lloyd steps that refine it (the C++ ``scale_search``).
#: Below this absmax a block skips the Lloyd step: any scale of such a block rounds to fp16's
#: smallest subnormal, and the fixed-point factor ``2^k / absmax`` stays finite above it.
SMALLEST_REFITTED = 2.0**-64

SCALE_SEARCH = {
    2: (0.8, 0),
    4: (0.95, 1),
    8: (1.0, 0),
    ODD2_FORMAT: (0.5, 1),
    NF4_FORMAT: (1.0, 1),
}


def level_range(code_format: int) -> tuple[int, int]:
    """The smallest and largest level of an integer or odd-code format, in units of the
    scale: :func:`code_range` of a width, (-3, 3) for the odd codes."""
    return (-3, 3) if code_format == ODD2_FORMAT else code_range(code_format)


class _NamedFormat(NamedTuple):
    codebook: str
    width: int
    description: str


#: The formats that are not a plain width (whose codebook is "int"), by format.
_NAMED_FORMATS = {
    NF4_FORMAT: _NamedFormat("nf4", 4, "nf4"),
    ODD2_FORMAT: _NamedFormat("odd", 2, "2-bit odd"),
}


def format_of(bits: int, codebook: str) -> int:
    """The code format of ``bits``-wide codes from ``codebook`` (``"int"``, ``"odd"`` or
    ``"nf4"``)."""
    named = [f for f, entry in _NAMED_FORMATS.items() if entry.codebook == codebook]
    return named[0] if named else bits


def codebook_of(code_format: int) -> str:
    """The codebook of a code format: the inverse of :func:`format_of`."""
    named = _NAMED_FORMATS.get(code_format)
    return named.codebook if named else "int"


def width(code_format: int) -> int:
    """Bits per code of a format."""
    named = _NAMED_FORMATS.get(code_format)
    return named.width if named else code_format


def describe(code_format: int) -> str:
    """A format in words: ``"4-bit"``, ``"2-bit odd"``, ``"nf4"``."""
    named = _NAMED_FORMATS.get(code_format)
    return named.description if named else f"{code_format}-bit"


def _check_format(code_format: int) -> None:
    if code_format not in VALID_FORMATS:
        raise ValueError(
            f"the code format must be a width 1, 2, 4 or 8, {ODD2_FORMAT} (2-bit odd codes) "
            f"or {NF4_FORMAT} (nf4), got {code_format}"
        )


class BlockLayout(NamedTuple):
    """Where every weight of an ``[out, in]`` matrix lives in the store. Row ``n`` and column
    ``i`` of each ``[out, in]`` tensor describe neuron ``n``'s weight on (sorted) input ``i``;
    weights outside active blocks point one past the end of ``scales`` and ``codes``, so arrays
    padded by one element can be gathered from and scattered into without masking."""

    blocks: torch.Tensor  # [out, regions] bool: active blocks
    block_of_slot: torch.Tensor  # [out, regions] int64: index into scales (num_blocks if inactive)
    region: torch.Tensor  # [in] int64: the region of each input
    active: torch.Tensor  # [out, in] bool: the weight lies in an active block
    block: torch.Tensor  # [out, in] int64: its block's index into scales
    byte: torch.Tensor  # [out, in] int64: index into codes of the byte holding its code
    shift: torch.Tensor  # [in] int64: the code's bit offset within that byte


def block_layout(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    code_format: int,
    in_features: int,
    out_features: int,
    num_blocks: int,
    num_bytes: int,
) -> BlockLayout:
    """Decodes the bitmap into every weight's block, code byte and bit shift (see
    :class:`BlockLayout`). Blocks and their bytes follow in (neuron, region) order, so a block's
    index and byte offset are prefix sums over the active blocks before it."""
    _check_format(code_format)
    bits = width(code_format)
    regions = region_begin.numel() - 1
    if regions < 1 or out_features < 1:
        raise ValueError("spatium: empty memory")
    if bitmap.numel() != (out_features * regions + 63) // 64:
        raise ValueError(
            f"spatium: bitmap of {bitmap.numel()} words does not fit {out_features} neurons x "
            f"{regions} regions"
        )
    device = region_begin.device
    blocks = active_blocks(bitmap, out_features, regions)
    taken = blocks.to(torch.int64)
    region_bytes = (region_begin.diff() * bits + 7) // 8  # [regions]
    block_of_slot = _exclusive_cumsum(taken).view(out_features, regions)
    block_of_slot = torch.where(blocks, block_of_slot, num_blocks)
    offset_of_slot = _exclusive_cumsum(taken * region_bytes).view(out_features, regions)

    column = torch.arange(in_features, device=device)
    region = torch.searchsorted(region_begin[1:].contiguous(), column, right=True)
    within = column - region_begin.index_select(0, region)  # position inside the block
    q = region_bytes.index_select(0, region)  # bytes of the block
    active = blocks.index_select(1, region)
    byte = torch.where(active, offset_of_slot.index_select(1, region) + within % q, num_bytes)
    block = block_of_slot.index_select(1, region)
    return BlockLayout(blocks, block_of_slot, region, active, block, byte, (within // q) * bits)


def active_blocks(bitmap: torch.Tensor, out_features: int, regions: int) -> torch.Tensor:
    """``[out, regions]`` bool: the bitmap's bit ``n * regions + r``, block (n, r) active."""
    slot = torch.arange(out_features * regions, device=bitmap.device)
    words = bitmap.to(torch.int64).index_select(0, slot >> 6)
    return ((words >> (slot & 63)) & 1).bool().view(out_features, regions)


def stored_codes(layout: BlockLayout, codes: torch.Tensor, code_format: int) -> torch.Tensor:
    """Every weight's stored (unsigned) code, int32 ``[out, in]`` in Morton order of the
    inputs; 0 outside active blocks."""
    packed = _padded(codes).index_select(0, layout.byte.flatten()).view_as(layout.byte)
    mask = (1 << width(code_format)) - 1
    return (packed.to(torch.int32) >> layout.shift.to(torch.int32)) & mask


def levels(stored: torch.Tensor, code_format: int) -> torch.Tensor:
    """The values that stored codes stand for before their block's scale, float32: +-1 for 1
    bit, ``stored - offset`` for wider integer codes, ``2 * stored - 3`` for the odd codes,
    ``NF4_LEVELS[stored]`` for nf4."""
    if code_format == NF4_FORMAT:
        return NF4_LEVELS.to(stored.device).index_select(0, stored.flatten().long()).view_as(stored)
    if code_format in (1, ODD2_FORMAT):
        return (2 * stored - ((1 << width(code_format)) - 1)).to(torch.float32)
    return (stored - code_offset(code_format)).to(torch.float32)


def block_scales(layout: BlockLayout, scales: torch.Tensor) -> torch.Tensor:
    """Every block's scale, float32 ``[out, regions]``; 0 for an inactive block."""
    index = layout.block_of_slot.flatten()
    return _padded(_scale_values(scales)).index_select(0, index).view_as(layout.block_of_slot)


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten()
    return flat.cumsum(0) - flat


def _layout_of(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    code_format: int,
    in_features: int,
    out_features: int,
) -> BlockLayout:
    entries = (out_features + DIRECTORY_STRIDE - 1) // DIRECTORY_STRIDE + 1
    if block_begin.numel() != entries or code_begin.numel() != entries:
        raise ValueError(
            f"spatium: directory of {block_begin.numel()}/{code_begin.numel()} entries does not "
            f"fit {out_features} neurons"
        )
    return block_layout(
        region_begin, bitmap, code_format, in_features, out_features, scales.numel(),
        codes.numel(),
    )  # fmt: skip


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t with one zero element appended: what weights outside active blocks index."""
    return torch.cat([t, t.new_zeros(1)])


def _scale_values(scales: torch.Tensor) -> torch.Tensor:
    """The scales as float32 (exact: every fp16 value is a float32 value), NaN as the C++'s
    NaN (0x7FC00000): torch's element-by-element conversion, which takes the last few
    elements of a tensor, widens fp16 NaN to another payload than its vectorized one."""
    if scales.dtype == torch.int16:
        scales = scales.view(torch.float16)
    values = scales.to(torch.float32)
    return torch.where(values.isnan(), torch.nan, values)


def _half_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest fp16 (ties to even), as int16 bits."""
    return values.to(torch.float16).view(torch.int16)


def _scale_bits(scale: torch.Tensor) -> torch.Tensor:
    """float64 scales rounded to the nearest fp16 through float32, magnitudes kept within [the
    smallest subnormal, 65504], as int16 bits (the C++ ``scale_to_half``)."""
    magnitude = _half_bits(scale.abs().to(torch.float32)).clamp(1, HALF_MAX_BITS)
    return torch.where(scale < 0, magnitude | HALF_SIGN_BITS, magnitude)


# --- the store ops --------------------------------------------------------------------------------
def dequantize(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    code_format: int,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """The dense ``[out, in]`` float32 weight the store holds: ``scale * level`` in active
    blocks (computed in float32), +0 elsewhere. A NaN scale makes its whole block NaN."""
    layout = _layout_of(
        region_begin, bitmap, block_begin, code_begin, scales, codes, code_format, in_features,
        out_features,
    )  # fmt: skip
    level = levels(stored_codes(layout, codes, code_format), code_format)
    scale = _padded(_scale_values(scales)).index_select(0, layout.block.flatten())
    weight = scale.view_as(layout.block) * level
    return torch.where(layout.active, weight, 0.0)


def active_mask(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """``[out, in]`` bool: True where the weight lies in an active block."""
    # The mask does not depend on the code width; 8 only satisfies the layout's check.
    layout = _layout_of(
        region_begin, bitmap, block_begin, code_begin, scales, codes, 8, in_features,
        out_features,
    )  # fmt: skip
    return layout.active


def requantize_(
    latent: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    code_format: int,
) -> None:
    """Quantizes the active blocks of ``latent`` ``[out, in]`` (any floating dtype, rounded to
    float32 first; columns in sorted order) into ``scales`` and ``codes`` in place.

    Per block, for integer codes of ``bits >= 2``: the scale's sign is that of the weight of
    largest magnitude (ties positive), so the extra top code lands on that side. The scale starts at
    ``sign * ratio * absmax / max_code`` and takes the Lloyd steps of :data:`SCALE_SEARCH`:
    codes ``round_half_even(w * float32(1 / scale))`` clamped to the code range, then the
    scale ``sum(w * q) / sum(q * q)`` over fixed-point weights (see :func:`_lloyd_step`). It is
    rounded to the nearest fp16 (through
    float32), its magnitude kept within [the smallest subnormal, 65504], and the codes are
    ``round_half_even(w / scale)`` clamped (float32). A block of zeros gets scale 0 and codes
    0. For 1 bit the scale is ``mean |w|`` rounded to the nearest fp16 and the code is +1 for
    ``w >= 0`` (zeros included), -1 below. A block holding NaN or +-Inf gets the NaN scale
    (fp16 bits 0x7E00) and the codes of 0 (stored 0, i.e. -1, for 1 bit), so it dequantizes
    to NaN. The odd codes take the same steps with their levels (-3, -1, 1, 3): the nearest
    is ``2 round_half_even((w / scale + 1) / 2) - 1`` after the clamp, and blocks of zeros or
    non-finite ones store the code +1 (they have no 0).

    nf4 follows the same steps with its levels in place of the codes: the scale starts at
    ``sign * absmax`` (the positive side has the extra level); a weight's level is the one
    whose index counts the float32 midpoints below ``w / scale`` (ties to the lower level); the
    Lloyd step's sums are formed per midpoint (see :func:`_nf4_lloyd_step`). Zeros and
    non-finite blocks store index 7 (level 0).
    """
    _check_format(code_format)
    nf4 = code_format == NF4_FORMAT
    out_features, in_features = latent.shape
    layout = _layout_of(
        region_begin, bitmap, block_begin, code_begin, scales, codes, code_format, in_features,
        out_features,
    )  # fmt: skip
    regions = layout.blocks.shape[1]
    w = latent.detach().to(torch.float32)
    slot = torch.arange(out_features, device=w.device).unsqueeze(1) * regions + layout.region
    slot = slot.flatten()

    def per_block(values: torch.Tensor, reduce: str) -> torch.Tensor:
        out = values.new_zeros(out_features * regions)
        return out.scatter_reduce_(0, slot, values.flatten(), reduce).view(out_features, regions)

    not_finite = per_block((~torch.isfinite(w)).to(torch.float32), "sum") > 0
    if code_format == 1:
        # mean |w|: the sum in float64, then float32 sum / count as the C++ computes it.
        abs_sum = per_block(w.abs().to(torch.float64), "sum").to(torch.float32)
        count = region_begin.diff().to(torch.float32)
        slot_bits = _half_bits(abs_sum / count)
        stored = (w >= 0).to(torch.int64)
        stored_if_not_finite = 0
    else:
        hi = level_range(code_format)[1]
        absmax = per_block(w.abs(), "amax")
        sign = torch.where(per_block(w, "amax") >= -per_block(w, "amin"), 1.0, -1.0)
        ratio, steps = SCALE_SEARCH[code_format]
        scale = sign.double() * ratio * absmax.double() / (1.0 if nf4 else hi)
        count = region_begin.diff()
        step = _nf4_lloyd_step if nf4 else _lloyd_step
        for _ in range(steps):
            scale = step(w, scale, absmax, count, code_format, layout.region, per_block)
        slot_bits = _scale_bits(scale)
        slot_bits = torch.where(absmax > 0, slot_bits, 0)
        scale = slot_bits.view(torch.float16).to(torch.float32).index_select(1, layout.region)
        zero = {NF4_FORMAT: NF4_ZERO, ODD2_FORMAT: ODD2_PLUS_ONE}.get(
            code_format, code_offset(code_format)
        )
        if nf4:
            # The number of midpoints strictly below w / scale (bucketize, right=False).
            stored = torch.bucketize(w / scale, NF4_MIDPOINTS.to(w.device))
        elif code_format == ODD2_FORMAT:
            stored = torch.div(
                _nearest_levels(w / scale, code_format) + 3, 2, rounding_mode="floor"
            )
        else:
            stored = _nearest_levels(w / scale, code_format) + zero
        stored = torch.where(scale != 0, stored, zero)
        stored_if_not_finite = zero
    slot_bits = torch.where(not_finite, HALF_NAN_BITS, slot_bits)
    stored = torch.where(not_finite.index_select(1, layout.region), stored_if_not_finite, stored)
    stored = torch.where(layout.active, stored, 0).to(torch.int64)

    # Codes of one byte occupy disjoint bits, so their sum is their OR.
    packed = torch.zeros(codes.numel() + 1, dtype=torch.int64, device=codes.device)
    packed.index_add_(0, layout.byte.flatten(), (stored << layout.shift).flatten())
    codes.copy_(packed[:-1].to(torch.uint8))
    new_scales = torch.zeros(scales.numel() + 1, dtype=torch.int16, device=scales.device)
    new_scales.scatter_(0, layout.block_of_slot.flatten(), slot_bits.flatten())
    target = scales if scales.dtype == torch.int16 else scales.view(torch.int16)
    target.copy_(new_scales[:-1])


def _nearest_levels(t: torch.Tensor, code_format: int) -> torch.Tensor:
    """The level nearest ``t`` (in units of the scale) of an integer or odd-code format, as the
    C++ rounds it: ``t`` clamped to the levels' range, then rounded half to even (torch.round);
    odd codes are ``2 round((t + 1) / 2) - 1``."""
    lo, hi = level_range(code_format)
    t = t.clamp(lo, hi)
    if code_format == ODD2_FORMAT:
        return 2 * torch.round((t + 1) * 0.5) - 1
    return torch.round(t)


def _fixed_point(
    w: torch.Tensor,
    absmax: torch.Tensor,
    count: torch.Tensor,
    largest_factor: int,
    region: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lloyd steps' fixed-point weights ``round(w * (2^k / absmax))`` (float32) and, per
    block, ``absmax / 2^k`` (float64), which turns a sum of them back into weights. ``k = min(22,
    24 - ceil(log2(count)) - ceil(log2(largest_factor)))``: every product of such a weight with a
    factor up to ``largest_factor`` and every partial sum of a block's is an integer below 2^24,
    exact in float32 in any order, so the sums have the C++'s bits."""
    bits = 24 - torch.ceil(torch.log2(count.double())) - (largest_factor - 1).bit_length()
    bits = bits.clamp(max=22)
    to_fixed = (2.0**bits).float() / absmax
    return torch.round(w * to_fixed.index_select(1, region)), absmax.double() / 2.0**bits


def _lloyd_step(
    w: torch.Tensor,
    scale: torch.Tensor,
    absmax: torch.Tensor,
    count: torch.Tensor,
    code_format: int,
    region: torch.Tensor,
    per_block: Callable[[torch.Tensor, str], torch.Tensor],
) -> torch.Tensor:
    """The Lloyd step of an integer or odd-code format, per block: the codes nearest
    ``w * float32(1 / scale)`` (float32), then the least-squares scale ``sum(w q) / sum(q q)``,
    summed over :func:`_fixed_point` weights (factors up to the top level) and scaled back in
    float64. Blocks whose absmax is below :data:`SMALLEST_REFITTED` keep ``scale``."""
    q = _nearest_levels(w * (1.0 / scale).float().index_select(1, region), code_format)
    fixed, from_fixed = _fixed_point(w, absmax, count, level_range(code_format)[1], region)
    wq = per_block(fixed * q, "sum").double()
    qq = per_block(q * q, "sum").double()
    return torch.where(absmax >= SMALLEST_REFITTED, wq / qq * from_fixed, scale)


def _nf4_lloyd_step(
    w: torch.Tensor,
    scale: torch.Tensor,
    absmax: torch.Tensor,
    count: torch.Tensor,
    code_format: int,
    region: torch.Tensor,
    per_block: Callable[[torch.Tensor, str], torch.Tensor],
) -> torch.Tensor:
    """nf4's Lloyd step, per block: the levels nearest ``t = w * float32(1 / scale)`` (float32),
    then the least-squares scale. A weight's level is ``l[0]`` plus the steps
    ``l[k + 1] - l[k]`` of the midpoints below it, so the sums are formed from per-midpoint
    sums of :func:`_fixed_point` weights (factor 1) and counts, which are exact, combined in
    float64 in the C++'s fixed order: the same bits whatever order torch sums in. Blocks whose
    absmax is below :data:`SMALLEST_REFITTED` keep ``scale``. (``code_format``, nf4's, is taken
    for the signature :func:`_lloyd_step` shares.)"""
    t = w * (1.0 / scale).float().index_select(1, region)
    fixed, from_fixed = _fixed_point(w, absmax, count, 1, region)
    level = NF4_LEVELS.tolist()
    wq = level[0] * per_block(fixed, "sum").double()
    qq = level[0] * level[0] * count.double()
    for k, mid in enumerate(NF4_MIDPOINTS.tolist()):
        above = t > mid
        step = level[k + 1] - level[k]
        square_step = level[k + 1] * level[k + 1] - level[k] * level[k]
        wq = wq + step * per_block(torch.where(above, fixed, 0.0), "sum").double()
        qq = qq + square_step * per_block(above.float(), "sum").double()
    return torch.where(absmax >= SMALLEST_REFITTED, wq / qq * from_fixed, scale)


def quantize(
    latent: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    code_format: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scales, codes)`` that :func:`requantize_` writes, newly allocated: scales
    float16 (fp16 bits as the store holds them), codes uint8, sized by the directory's
    totals."""
    num_blocks, num_bytes = int(block_begin[-1]), int(code_begin[-1])
    scales = torch.zeros(num_blocks, dtype=torch.float16, device=region_begin.device)
    codes = torch.zeros(num_bytes, dtype=torch.uint8, device=region_begin.device)
    requantize_(latent, region_begin, bitmap, block_begin, code_begin, scales, codes, code_format)
    return scales, codes


def spatial_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    code_format: int,
    out_features: int,
) -> torch.Tensor:
    """``x [batch, in] @ W_q^T + bias`` with the dequantized weight cast to x's dtype (``x``
    in sorted input order). ``weight`` (the latent weight, there for autograd) is not read."""
    dense = dequantize(
        region_begin, bitmap, block_begin, code_begin, scales, codes, code_format, x.shape[1],
        out_features,
    )  # fmt: skip
    return F.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))


def spatial_linear_backward_input(
    grad_y: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    code_format: int,
    in_features: int,
) -> torch.Tensor:
    """``grad_y [batch, out] @ W_q``: the input gradient of :func:`spatial_linear`."""
    dense = dequantize(
        region_begin, bitmap, block_begin, code_begin, scales, codes, code_format, in_features,
        grad_y.shape[1],
    )  # fmt: skip
    return grad_y @ dense.to(grad_y.dtype)


# --- activation functions -------------------------------------------------------------------------
# (value, derivative) of each of the 12 functions, in the order of ops.ACTIVATIONS, with
# torch.nn.functional's conventions: leaky_relu slope 0.01, elu alpha 1, exact (erf) gelu,
# softplus beta 1 threshold 20. relu, leaky_relu and abs take the derivative at 0 from the
# left (0, 0.01, 0). relu is `x > 0 ? x : 0`, so relu(NaN) is 0 as in the kernels.
def _sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """P(N(0, 1) <= x) as erfc, which keeps its accuracy in the left tail."""
    return 0.5 * torch.erfc(x * -0.7071067811865476)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return x * _normal_cdf(x)


def _gelu_slope(x: torch.Tensor) -> torch.Tensor:
    return _normal_cdf(x) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327


def _silu_slope(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _tanh_slope(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(x)
    return 1 - t * t


def _step(x: torch.Tensor, below: float) -> torch.Tensor:
    """1 where x > 0, ``below`` elsewhere (NaN included), in x's dtype."""
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, below))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > SOFTPLUS_THRESHOLD, x, torch.log1p(torch.exp(x)))


def _softplus_slope(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > SOFTPLUS_THRESHOLD, torch.ones_like(x), torch.sigmoid(x))


def _gaussian(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x * x)


def _sign(x: torch.Tensor) -> torch.Tensor:
    """1, -1 or 0 (for 0 and NaN), in x's dtype."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


_FUNCTIONS: tuple[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]], ...] = (
    (lambda x: torch.where(x > 0, x, 0.0), lambda x: _step(x, 0.0)),  # relu
    (lambda x: torch.where(x > 0, x, LEAKY_SLOPE * x), lambda x: _step(x, LEAKY_SLOPE)),
    (lambda x: torch.where(x > 0, x, torch.expm1(x)), lambda x: torch.where(x > 0, 1.0, x.exp())),
    (_gelu, _gelu_slope),
    (F.silu, _silu_slope),
    (torch.sigmoid, _sigmoid_slope),
    (torch.tanh, _tanh_slope),
    (_softplus, _softplus_slope),
    (lambda x: x, torch.ones_like),  # identity
    (torch.sin, torch.cos),
    (_gaussian, lambda x: -2 * x * _gaussian(x)),
    (torch.abs, _sign),
)
NUM_FUNCTIONS = len(_FUNCTIONS)


def _check_fn(fn: int) -> None:
    if not 0 <= fn < NUM_FUNCTIONS:
        raise ValueError(f"activation: function index must be in [0, {NUM_FUNCTIONS}), got {fn}")


def activation(x: torch.Tensor, fn: int) -> torch.Tensor:
    """Function ``fn`` (an index into ``ops.ACTIVATIONS``) applied elementwise."""
    _check_fn(fn)
    return _FUNCTIONS[fn][0](x)


def activation_backward(grad: torch.Tensor, x: torch.Tensor, fn: int) -> torch.Tensor:
    """``grad * f'(x)`` for function ``fn``."""
    _check_fn(fn)
    return grad * _FUNCTIONS[fn][1](x)


def _map_functions(pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[batch, neurons]`` int64: the function index of every sample's cell, per neuron."""
    return table.index_select(1, cells).t().to(torch.int64)


def _pick(pre: torch.Tensor, fns: torch.Tensor, which: int) -> torch.Tensor:
    """Each element through its own function's value (which=0) or derivative (which=1)."""
    out = torch.zeros_like(pre)
    for k, pair in enumerate(_FUNCTIONS):
        out = torch.where(fns == k, pair[which](pre), out)
    return out


def activation_map(pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[b, n] = f_{table[n, cells[b]]}(pre[b, n])`` for pre ``[batch, neurons]``, cells
    ``[batch]`` int64 in ``[0, 64)`` and table ``[neurons, 64]`` uint8."""
    return _pick(pre, _map_functions(pre, cells, table), 0)


def activation_map_backward(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """``grad[b, n] * f'_{table[n, cells[b]]}(pre[b, n])``."""
    return grad * _pick(pre, _map_functions(pre, cells, table), 1)


def _switch_gains(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_pre, gains)``: ``grad_pre`` as :func:`activation_map_backward`, ``gains[c, n, k]``
    the sum over samples b in cell c of ``grad[b, n] * (f_k(pre[b, n]) - f_{table[n,
    c]}(pre[b, n]))``, the first-order change of the loss were neuron n's cell c switched to
    function k."""
    fns = _map_functions(pre, cells, table)
    values = torch.stack([value(pre) for value, _ in _FUNCTIONS], dim=-1)  # [B, N, 12]
    chosen = values.gather(-1, fns.unsqueeze(-1))
    gains = pre.new_zeros(table.shape[1], pre.shape[1], NUM_FUNCTIONS)
    gains.index_add_(0, cells, grad.unsqueeze(-1) * (values - chosen))
    return grad * _pick(pre, fns, 1), gains


def learnable_map_backward(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of a learnable map trained straight through its argmax functions ``table``:
    ``(grad_pre, grad_logits)`` with ``grad_logits[n, c, k]`` the switch gain of
    :func:`_switch_gains`; ``[neurons, 64, 12]`` stored cell-major (``[64, 12, neurons]`` in
    memory)."""
    grad_pre, gains = _switch_gains(grad, pre, cells, table)
    return grad_pre, gains.permute(0, 2, 1).contiguous().permute(2, 0, 1)


def factored_map_backward(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of a factored learnable map (a cell's logits are its neuron's logits plus
    the cell's, see :func:`factored_map_argmax`): ``(grad_pre, grad_neuron_logits,
    grad_cell_logits)``, the switch gains of :func:`_switch_gains` summed over cells
    (``[neurons, 12]``, stored function-major) and over neurons (``[64, 12]``)."""
    grad_pre, gains = _switch_gains(grad, pre, cells, table)
    return grad_pre, gains.sum(0).t().contiguous().t(), gains.sum(1)


def map_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The function of every cell of a learnable map: the argmax over the 12 functions of its
    logits ``[neurons, 64, 12]``, ``[neurons, 64]`` uint8 stored cell-major (``[64, neurons]`` in
    memory), as the map kernels read tables."""
    return logits.argmax(-1).to(torch.uint8).t().contiguous().t()


def factored_map_logits(
    neuron_logits: torch.Tensor,
    cell_logits: torch.Tensor,
    initial_table: torch.Tensor,
    lead: torch.Tensor,
) -> torch.Tensor:
    """A factored map's logits ``[neurons, 64, 12]``: ``(neuron_logits[n, k] + cell_logits[c,
    k]) + (lead if initial_table[n, c] == k else 0)``, summed in that order."""
    summed = neuron_logits.unsqueeze(1) + cell_logits.unsqueeze(0)
    initial = F.one_hot(initial_table.long(), NUM_FUNCTIONS).to(summed.dtype)
    return summed + initial * lead


def factored_map_argmax(
    neuron_logits: torch.Tensor,
    cell_logits: torch.Tensor,
    initial_table: torch.Tensor,
    lead: torch.Tensor,
) -> torch.Tensor:
    """The function of every cell of a factored map: :func:`map_argmax` of
    :func:`factored_map_logits`."""
    return map_argmax(factored_map_logits(neuron_logits, cell_logits, initial_table, lead))


def simhash_cells(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """``[batch]`` int64 cells: bit j set where ``x[b] . projections[j] > 0`` (x ``[batch,
    features]``, projections ``[bits, features]``)."""
    positive = (x @ projections.t() > 0).to(torch.int64)
    weights = torch.arange(projections.shape[0], device=x.device)
    return (positive << weights).sum(1)


def count_hits_(hits: torch.Tensor, cells: torch.Tensor) -> None:
    """``hits[n, c] +=`` the number of samples in cell c, for every neuron n (in place)."""
    counts = torch.zeros(hits.shape[1], dtype=hits.dtype, device=hits.device)
    counts.index_add_(0, cells, torch.ones_like(cells, dtype=hits.dtype))
    hits.add_(counts)


def track_activity_(
    output: torch.Tensor, activity: torch.Tensor, output_mean: torch.Tensor, momentum: float
) -> None:
    """Folds a batch of outputs ``[batch, neurons]`` into the EMAs in place (computed in
    float64, stored in their dtype): ``activity = (1 - m) activity + m * share of non-zero
    outputs`` (NaN counts as non-zero) and ``output_mean = (1 - m) output_mean + m * mean
    output``. An empty batch changes nothing."""
    rows = output.shape[0]
    if rows == 0:
        return
    values = output.detach().to(torch.float64)
    keep, scale = 1.0 - momentum, momentum / rows
    nonzero = (values != 0).sum(0, dtype=torch.float64)
    activity.copy_(keep * activity.to(torch.float64) + scale * nonzero)
    output_mean.copy_(keep * output_mean.to(torch.float64) + scale * values.sum(0))


# --- Morton codes ---------------------------------------------------------------------------------
# (shift, mask) steps that move bit i of a 16-bit coordinate to bit 3i, and back.
_SPREAD = ((16, 0x00000000FF0000FF), (8, 0x000000F00F00F00F), (4, 0x00000C30C30C30C3),
           (2, 0x0000249249249249))  # fmt: skip
_COMPACT = ((2, 0x00000C30C30C30C3), (4, 0x000000F00F00F00F), (8, 0x00000000FF0000FF),
            (16, 0xFFFF))  # fmt: skip


def _spread3(v: torch.Tensor) -> torch.Tensor:
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _compact3(v: torch.Tensor) -> torch.Tensor:
    v = v & _SPREAD[-1][1]
    for shift, mask in _COMPACT:
        v = (v ^ (v >> shift)) & mask
    return v


def morton_encode(xyz: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]`` Morton codes of integer positions ``[N, 3]`` in ``[0, 65535]``: bit i of
    x, y, z goes to bit 3i, 3i+1, 3i+2. Raises ValueError for a coordinate out of range."""
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(
            f"morton_encode: expected positions of shape [N, 3], got {list(xyz.shape)}"
        )
    xyz = xyz.to(torch.int64)
    if bool(((xyz < 0) | (xyz >= 1 << MORTON_COORD_BITS)).any()):
        raise ValueError("morton_encode: coordinates must be in [0, 65535]")
    spread = _spread3(xyz)
    return spread[:, 0] | (spread[:, 1] << 1) | (spread[:, 2] << 2)


def morton_decode(codes: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, 3]`` positions of Morton codes ``[N]`` in ``[0, 2**48)``: the inverse of
    :func:`morton_encode`. Raises ValueError for a code out of range."""
    if codes.dim() != 1:
        raise ValueError(f"morton_decode: expected codes of shape [N], got {list(codes.shape)}")
    codes = codes.to(torch.int64)
    if bool(((codes < 0) | (codes >= 1 << MORTON_CODE_BITS)).any()):
        raise ValueError("morton_decode: codes must be in [0, 2^48)")
    return torch.stack([_compact3(codes >> k) for k in range(3)], dim=1)
