"""How a layer's neurons change in a growth or pruning event: the index maps a
consumer follows, where new neurons sit in space, and the stages a change is built in and
committed from, all or nothing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from spatium_torch.ops import MAX_COORD, morton_encode
from spatium_torch.snapshot import Snapshot


@dataclass(frozen=True)
class NeuronChange:
    """What a :meth:`SpatialLayer.grow` or :meth:`SpatialLayer.prune` did to the layer's
    neurons (its outputs), for whoever consumes them.

    Attributes:
        rows: ``[new_out]`` int64: new neuron ``i`` continues old neuron ``rows[i]`` (a row
            twice: the two children of a split; a row left out: a pruned neuron).
        consumer_scale: ``[new_out]`` float32: the factor on the consumer's weights for new
            input ``i`` (0.5 for both children of a ``"duplicate"`` split, so the network's
            function is unchanged; 1 otherwise).
        moved: ``[new_out]`` bool: new neurons placed at a new position (the second child of a
            split); the others kept their neuron's position.
        positions: ``[new_out, 3]`` the neurons' positions after the change (Morton order).
        split: neurons split.
        removed: ``[pruned]`` old indices of the pruned neurons.
        removed_output: ``[pruned]`` float32: each pruned neuron's constant output, to fold into
            the consumer's bias: exact (its bias) for a neuron with no active block and no
            activation map, else the mean of its recent outputs.
        removed_exact: ``[pruned]`` bool: which of ``removed_output`` are exact.
        fresh: the second children (``moved``) start as new neurons (a ``"fresh"`` split):
            their optimizer state starts at zero rather than as their parent's.
    """

    rows: torch.Tensor
    consumer_scale: torch.Tensor
    moved: torch.Tensor
    positions: torch.Tensor
    split: int = 0
    removed: torch.Tensor = torch.zeros(0, dtype=torch.int64)
    removed_output: torch.Tensor = torch.zeros(0)
    removed_exact: torch.Tensor = torch.zeros(0, dtype=torch.bool)
    fresh: bool = False

    @property
    def pruned(self) -> int:
        """Neurons removed."""
        return int(self.removed.numel())

    @property
    def changed(self) -> bool:
        """Whether the neurons differ from before."""
        return self.split > 0 or self.pruned > 0

    @classmethod
    def unchanged(cls, positions: torch.Tensor) -> NeuronChange:
        """The change that keeps every neuron where it is."""
        count = positions.shape[0]
        return cls(
            rows=torch.arange(count),
            consumer_scale=torch.ones(count),
            moved=torch.zeros(count, dtype=torch.bool),
            positions=positions,
        )


def place_children(
    positions: torch.Tensor, parents: torch.Tensor, bounds: tuple[int, int, int] | None
) -> torch.Tensor:
    """``[len(parents), 3]``: for each parent in turn, the free grid position nearest to it
    (Euclidean; ties broken by offset order), so that no two neurons share a position. Earlier
    children take their places first. ``bounds`` limits the grid to ``[0, bounds)`` per axis
    (default: the whole Morton space)."""
    limit = torch.tensor(bounds if bounds is not None else (MAX_COORD + 1,) * 3)
    occupied = set(morton_encode(positions).tolist())
    placed = []
    for parent in positions[parents]:
        position = _nearest_free(parent, occupied, limit)
        occupied.add(int(morton_encode(position.view(1, 3))[0]))
        placed.append(position)
    return torch.stack(placed) if placed else positions.new_zeros(0, 3)


def _nearest_free(centre: torch.Tensor, occupied: set[int], limit: torch.Tensor) -> torch.Tensor:
    # Offsets within Chebyshev radius r hold every point within Euclidean distance r, so the
    # first free one at distance <= r is the nearest.
    largest = int(limit.max())
    for radius in itertools.count(1):
        offsets, distances = _offsets_within(radius)
        candidates = centre + offsets
        inside = ((candidates >= 0) & (candidates < limit)).all(1)
        codes = morton_encode(candidates.clamp(0, MAX_COORD))
        for index in torch.nonzero(inside).flatten().tolist():
            if distances[index] > radius:
                break
            if int(codes[index]) not in occupied:
                return candidates[index]
        if radius >= largest:
            raise ValueError("no free position left in the neuron grid")
    raise AssertionError("unreachable")


@lru_cache(maxsize=16)
def _offsets_within(radius: int) -> tuple[torch.Tensor, list[float]]:
    """Offsets with every coordinate in [-radius, radius], nearest first (the origin left
    out), and their Euclidean lengths."""
    axis = torch.arange(-radius, radius + 1)
    offsets = torch.cartesian_prod(axis, axis, axis)
    offsets = offsets[(offsets != 0).any(1)]
    lengths = offsets.to(torch.float64).norm(dim=1)
    order = torch.argsort(lengths, stable=True)
    return offsets[order], lengths[order].tolist()


def check_non_negative(value: float, name: str) -> None:
    """Raises ValueError unless ``value`` is a finite non-negative number (NaN and infinity
    would make weights non-finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")


def parameter_like(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A new Parameter of ``old``'s class holding ``data``, trainable when ``old`` was."""
    return type(old)(data, requires_grad=old.requires_grad)


@dataclass
class Stage:
    """A change built aside, so that a failure while building leaves everything as it was:
    ``commit()`` installs it by swapping in the objects built (a rewire also zeroes its new
    blocks of the latent weight in place, last). ``replaced`` lists each Parameter the commit
    swaps for a new one, with how per-parameter state (optimizer moments) follows."""

    commit: Callable[[], None]
    replaced: list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]] = (
        field(default_factory=list)
    )


def commit_all(
    stages: Sequence[Stage],
    modules: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Commits ``stages`` in order, all or nothing: when one raises, ``modules`` (with their
    submodules) and ``optimizer``, which the stages change, get back exactly what they held
    (the same objects), and the exception propagates."""
    snapshot = Snapshot(modules, () if optimizer is None else (optimizer,))
    try:
        for stage in stages:
            stage.commit()
    except BaseException:
        snapshot.restore()
        raise
