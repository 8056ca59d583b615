"""SpatialNetwork: a Sequential of SpatialLayers that trains itself on a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spatium_torch.growth import GrowthController
from spatium_torch.history import GrowthEvent
from spatium_torch.layer import SpatialLayer, load_state_dict
from spatium_torch.stats import NetworkStats, network_stats

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class SpatialNetwork(nn.Sequential):
    """SpatialLayers of the given sizes with an activation between consecutive layers (none
    after the last), owning an Adam optimizer for :meth:`train_batch` and a
    :class:`GrowthController` (``controller``, no schedule: set its ``grow_every``,
    ``prune_every``, ``rewire_every`` to grow while training, or call :meth:`grow` and
    :meth:`prune`).

    Args:
        layer_sizes: ``[in, hidden..., out]``, at least two sizes.
        bits: code width of every layer.
        activation: one of ``relu``, ``tanh``, ``sigmoid``, ``gelu``, ``identity``.
        lr: Adam's learning rate.
        **layer_kwargs: passed to every :class:`SpatialLayer` (``region_bits``, ``density``...).
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        *,
        bits: int = 4,
        activation: str = "relu",
        lr: float = 1e-2,
        **layer_kwargs: Any,
    ) -> None:
        sizes = list(layer_sizes)
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs at least [in, out], got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        modules: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            modules.append(SpatialLayer(fan_in, fan_out, bits=bits, **layer_kwargs))
            if i < len(sizes) - 2:
                modules.append(ACTIVATIONS[activation]())
        super().__init__(*modules)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.controller = GrowthController(self, self.optimizer)

    def __getitem__(self, index: int | slice) -> nn.Module:
        # A slice is a plain Sequential: its layers need not make a SpatialNetwork.
        if isinstance(index, slice):
            return nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> tuple[list[str], list[str]]:
        """As ``nn.Module.load_state_dict``, all or nothing: a refused state leaves every layer
        as it was (see :func:`spatium_torch.load_state_dict`)."""
        return load_state_dict(self, state_dict, strict=strict, assign=assign)

    def train_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on the mean squared error; returns that error (before the step)."""
        self.train()
        self.optimizer.zero_grad()
        loss = F.mse_loss(self(inputs), targets)
        loss.backward()
        self.controller.record_loss(loss.item())
        self.optimizer.step()
        return loss.item()

    def grow(self) -> list[GrowthEvent]:
        """One growth event: hidden layers split their saturated neurons (the next layer and
        the optimizer follow); returns the events."""
        return self.controller.grow()

    def prune(self, threshold: float | None = None) -> list[GrowthEvent]:
        """One pruning event: hidden layers drop neurons whose saturation or activity is under
        ``threshold`` (default: each layer's ``prune_threshold``); returns the events."""
        return self.controller.prune(threshold)

    def stats(self) -> NetworkStats:
        """The network's :class:`NetworkStats`."""
        return network_stats(self)
