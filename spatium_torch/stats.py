"""Layer and network statistics for growth and pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spatium_torch.layer import SpatialLayer

# A neuron counts as active when it holds a block and its output was non-zero for at least this
# share of recent training samples.
ACTIVE_SHARE = 0.01


@dataclass(frozen=True)
class LayerStats:
    """One SpatialLayer's neurons at a glance.

    Attributes:
        name: the layer's qualified name in its model (``""`` for a lone layer).
        in_features: fan-in of every neuron.
        bits: code width.
        neuron_count: neurons (``out_features``).
        active_neurons: neurons holding at least one block whose output was non-zero for at least
            1% of recent training samples (a frozen layer, which keeps no activity: neurons
            holding a block).
        average_saturation: mean share of fan-in covered by active blocks.
        average_activity: mean of the activity EMA (share of samples with non-zero output);
            NaN for a frozen layer.
        growth_candidates: neurons that :meth:`SpatialLayer.should_split` (cooldown ignored).
        prune_candidates: neurons whose saturation or activity is under ``prune_threshold``.
    """

    name: str
    in_features: int
    bits: int
    neuron_count: int
    active_neurons: int
    average_saturation: float
    average_activity: float
    growth_candidates: int
    prune_candidates: int

    @property
    def sparsity(self) -> float:
        """``1 - average_saturation``: the share of possible weights not stored."""
        return 1.0 - self.average_saturation


@dataclass(frozen=True)
class NetworkStats:
    """Every SpatialLayer of a model, in module order.

    Attributes:
        layer_count: SpatialLayers in the model.
        total_neurons: their neurons.
        total_active_neurons: their active neurons (see :class:`LayerStats`).
        average_sparsity: share of possible weights (all layers) not stored.
        layer_stats: one :class:`LayerStats` per layer.
    """

    layer_count: int
    total_neurons: int
    total_active_neurons: int
    average_sparsity: float
    layer_stats: tuple[LayerStats, ...]


def layer_stats(layer: SpatialLayer, name: str = "") -> LayerStats:
    """The :class:`LayerStats` of one layer."""
    saturation = layer.saturation()
    # A frozen layer keeps no activity: its neurons count as active, the average as NaN.
    activity = layer.activity
    if activity is None:
        activity = torch.full_like(saturation, math.nan)
    holds_blocks = saturation > 0
    return LayerStats(
        name=name,
        in_features=layer.in_features,
        bits=layer.bits,
        neuron_count=layer.out_features,
        active_neurons=int((holds_blocks & ~(activity < ACTIVE_SHARE)).sum()),
        average_saturation=float(saturation.mean()),
        average_activity=float(activity.mean()),
        growth_candidates=int((saturation > layer.growth_threshold).sum()),
        prune_candidates=int(layer.prune_candidates().sum()),
    )


def network_stats(model: nn.Module) -> NetworkStats:
    """The :class:`NetworkStats` of every SpatialLayer in ``model`` (module order)."""
    stats = tuple(
        layer_stats(module, name)
        for name, module in model.named_modules()
        if isinstance(module, SpatialLayer)
    )
    possible = sum(s.neuron_count * s.in_features for s in stats)
    stored = sum(s.average_saturation * s.neuron_count * s.in_features for s in stats)
    return NetworkStats(
        layer_count=len(stats),
        total_neurons=sum(s.neuron_count for s in stats),
        total_active_neurons=sum(s.active_neurons for s in stats),
        average_sparsity=1.0 - stored / possible if possible else 0.0,
        layer_stats=stats,
    )
