"""SpatialLayers as standard torch ops, for ONNX export and runtimes without the extension."""

from __future__ import annotations

import copy
import io
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spatium_torch import layouts, reference
from spatium_torch.layer import SpatialLayer


class PortableLinear(nn.Module):
    """A SpatialLayer's quantized weight and bias, computed with standard torch ops only.

    Buffers: ``codes`` uint8 ``[out, ceil(in * bits / 8)]``, each weight's stored code in input
    order, packed along the row (plane ``p`` of a byte holds columns ``p * width`` onward, as
    the store packs a block); ``scales`` float16 ``[out, regions]``, each block's scale (0 for
    an inactive block); ``region`` int64 ``[in]``, each input's region. The forward unpacks the
    codes with float divisions and floors, turns them into their levels (integer codes, or nf4's
    table through a Gather), multiplies by the gathered scales (float32, as the store
    dequantizes) and calls ``F.linear``: its weight equals ``layer.dequantized_weight()``
    exactly, and every op has an ONNX form (Div, Floor, Gather, MatMul)."""

    def __init__(self, layer: SpatialLayer) -> None:
        super().__init__()
        if layer.activation_map is not None:
            raise NotImplementedError(
                "PortableLinear: a SpatialLayer with an activation map has no standard-op form "
                "yet (its SimHash cells and per-cell functions are custom ops)"
            )
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.code_format = layer.bits, layer.code_format
        with torch.no_grad():
            stored, scales, region = _dense_codes(layer)
        per_byte = 8 // self.bits
        self.width = -(-self.in_features // per_byte)  # columns per bit plane
        padded = F.pad(stored, (0, per_byte * self.width - self.in_features))
        planes = padded.view(self.out_features, per_byte, self.width).to(torch.int32)
        shifts = torch.arange(per_byte, device=stored.device, dtype=torch.int32) * self.bits
        packed = (planes << shifts.view(1, -1, 1)).sum(1)  # the planes' bits are disjoint
        self.register_buffer("codes", packed.to(torch.uint8))
        self.register_buffer("scales", scales)
        self.register_buffer("region", region)
        self.register_buffer("plane_factors", torch.exp2(shifts.float()), persistent=False)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` float32 weight: ``scale * level``, zero outside active
        blocks."""
        stored = self.codes.to(torch.float32)  # bytes are exact in float32
        if self.bits != 8:
            # Plane p of a byte is floor(byte / 2^(p * bits)) mod 2^bits, in float ops that
            # both ONNX exporters translate (the dynamo one has no form for tensor shifts).
            shifted = torch.floor(stored.unsqueeze(1) / self.plane_factors.view(1, -1, 1))
            levels = float(1 << self.bits)
            planes = shifted - torch.floor(shifted / levels) * levels
            stored = planes.reshape(self.out_features, -1)[:, : self.in_features]
        scales = self.scales.to(torch.float32).index_select(1, self.region)
        return reference.levels(stored, self.code_format) * scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight().to(dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        codes = reference.describe(self.code_format)
        return f"in_features={self.in_features}, out_features={self.out_features}, codes={codes}"


def _dense_codes(layer: SpatialLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(stored codes [out, in] uint8 in input order, scales [out, regions] float16 with 0 for
    inactive blocks, region [in] int64 of each input)`` of the layer's store."""
    layer.dequantized_weight()  # brings the store up to date with the latent weight
    arrays = layer.store.arrays()
    layout = reference.block_layout(
        arrays.region_begin, arrays.bitmap, layer.code_format, layer.in_features,
        layer.out_features,
        arrays.scales.numel(), arrays.codes.numel(),
    )  # fmt: skip
    stored = reference.stored_codes(layout, arrays.codes, layer.code_format)
    region = layouts.to_input_order(layout.region.unsqueeze(0), layer._order).squeeze(0)
    return (
        layouts.to_input_order(stored, layer._order).to(torch.uint8),
        reference.block_scales(layout, arrays.scales).to(torch.float16),  # exact: fp16 values
        region.contiguous(),
    )


def portable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SpatialLayer replaced by a :class:`PortableLinear`: the
    same quantized weights (codes and scales, packed as compactly) computed with standard torch
    ops only. Export it with ``torch.onnx.export`` (either exporter), or run it where the
    extension is not built. ``model`` itself is left as it is. Raises ``NotImplementedError``
    for a layer with an activation map."""
    # Each layer is replaced wherever the copy refers to it (shared layers stay shared).
    memo = {id(m): PortableLinear(m) for m in model.modules() if isinstance(m, SpatialLayer)}
    return copy.deepcopy(model, memo)


def export_onnx(
    model: nn.Module, args: tuple, f: str | os.PathLike[str] | io.BytesIO, **kwargs: Any
) -> Any:
    """Exports ``model`` to ONNX with every SpatialLayer as a :class:`PortableLinear`
    (:func:`portable`): ``torch.onnx.export(portable(model), args, f, **kwargs)``, with constant
    folding off unless ``kwargs`` say otherwise, so that the file keeps the packed codes and
    scales rather than a folded float32 weight (``optimize=False`` for the dynamo exporter,
    torch's default, which needs ``onnxscript``; ``do_constant_folding=False`` for
    ``dynamo=False``). Returns what ``torch.onnx.export`` returns."""
    if kwargs.get("dynamo", True):
        kwargs.setdefault("optimize", False)
    else:
        kwargs.setdefault("do_constant_folding", False)
    return torch.onnx.export(portable(model), args, f, **kwargs)
