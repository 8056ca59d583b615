"""Python face of a layer's spatial memory: the point API and MemoryStats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from spatium_torch.ops import morton_encode

if TYPE_CHECKING:
    from spatium_torch.layer import SpatialLayer


@dataclass(frozen=True)
class MemoryStats:
    """What a memory holds, for one neuron or summed over a layer.

    Attributes:
        total_capacity: weights the neuron(s) may hold (fan-in per neuron).
        used_capacity: weights stored: the inputs covered by active blocks, zero codes included.
        saturation: ``used_capacity / total_capacity``.
        nonzero: non-zero codes.
        compression_ratio: ``32 / bits``.
        effective_compression: 4 bytes a stored weight over the real bytes.
        active_regions: active blocks.
        average_density: ``used_capacity / active_regions`` (0 with no active block).
        bytes: real footprint: codes, scales, directory (and, for a layer, its tables and the
            bloom filter).
    """

    total_capacity: int
    used_capacity: int
    saturation: float
    nonzero: int
    compression_ratio: float
    effective_compression: float
    active_regions: int
    average_density: float
    bytes: int

    @classmethod
    def from_counts(cls, counts: Sequence[int], bits: int) -> MemoryStats:
        """From (total, used, nonzero, active_regions, bytes)."""
        total, used, nonzero, active, nbytes = (int(c) for c in counts)
        return cls(
            total_capacity=total,
            used_capacity=used,
            saturation=used / total if total else 0.0,
            nonzero=nonzero,
            compression_ratio=32 / bits,
            effective_compression=4 * used / nbytes if nbytes else 0.0,
            active_regions=active,
            average_density=used / active if active else 0.0,
            bytes=nbytes,
        )


class LayerMemory:
    """The spatial memory of one :class:`~spatium_torch.SpatialLayer` (``layer.memory``).

    Positions are ``(x, y, z)`` input positions of the layer. A write also sets the layer's
    latent weight (when it has one), so the next re-quantize keeps it.
    """

    def __init__(self, layer: SpatialLayer) -> None:
        self._layer = layer

    def _host(self) -> torch.ScriptObject:
        self._layer._sync()
        return self._layer.store.host()

    def _code(self, xyz: Sequence[int] | torch.Tensor) -> int:
        position = torch.as_tensor(xyz).reshape(-1)
        if position.numel() != 3:
            raise ValueError(f"a position is (x, y, z), got {tuple(position.tolist())}")
        if position.is_complex() or (
            position.is_floating_point() and not torch.equal(position, position.round())
        ):
            # a cast would truncate 1.7 to 1 and silently address another input
            raise ValueError(f"a position holds integers, got {tuple(position.tolist())}")
        return int(morton_encode(position.to(torch.int64).view(1, 3))[0])

    def contains(self, neuron: int, xyz: Sequence[int] | torch.Tensor) -> bool:
        """Whether the neuron holds the block of that position (False for non-inputs)."""
        return self._host().contains(neuron, self._code(xyz))

    def read(self, neuron: int, xyz: Sequence[int] | torch.Tensor) -> float:
        """The stored (quantized) weight of the neuron for the input at that position."""
        return self._host().read(neuron, self._code(xyz))

    def write(self, neuron: int, xyz: Sequence[int] | torch.Tensor, value: float) -> None:
        """Stores a weight, activating its block if needed (its block is re-quantized)."""
        self._layer._write(neuron, self._code(xyz), float(value))

    def stats(self) -> MemoryStats:
        """Summed over the layer's neurons, plus the layer-wide tables in ``bytes``."""
        return MemoryStats.from_counts(self._host().stats(), self._layer.bits)

    def neuron_stats(self, neuron: int | None = None) -> MemoryStats | list[MemoryStats]:
        """One neuron's stats, or every neuron's as a list."""
        rows = self._host().neuron_stats().tolist()
        if neuron is None:
            return [MemoryStats.from_counts(r, self._layer.bits) for r in rows]
        if not 0 <= neuron < len(rows):
            raise IndexError(f"neuron {neuron} out of range [0, {len(rows)})")
        return MemoryStats.from_counts(rows[neuron], self._layer.bits)

    @property
    def bytes(self) -> int:
        """The memory's real footprint in bytes."""
        return self.stats().bytes

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"LayerMemory({self._layer.out_features}x{self._layer.in_features}, "
            f"bits={self._layer.bits}, saturation={s.saturation:.3f}, bytes={s.bytes})"
        )
