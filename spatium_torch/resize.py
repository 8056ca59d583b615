"""The decisions of growth, pruning and memory growth, as functions of tensors: which neurons
split and where their children go, how a partition divides blocks, the noise that breaks a
duplicate's symmetry, which neurons a prune removes, which blocks a rewire activates or drops.

The layer (``SpatialLayer.plan_growth``, ``plan_prune``, ``plan_rewire``) gathers the tensors,
calls these, and builds the change aside (a ``Stage``) so that it commits all at once. Nothing
here reads or changes a layer.
"""

from __future__ import annotations

import math

import torch

from spatium_torch.neurons import place_children
from spatium_torch.ops import morton_encode

SPLIT_MODES = ("duplicate", "partition", "fresh")
_TINY = torch.finfo(torch.float32).tiny


def split_parents(
    saturation: torch.Tensor,
    cooldown: torch.Tensor,
    region_mask: torch.Tensor,
    *,
    mode: str,
    threshold: float,
    budget: int,
) -> torch.Tensor:
    """The neurons that split, most saturated first: over ``threshold``, out of cooldown, at
    most ``budget``; a partition needs at least two blocks to divide."""
    eligible = (saturation > threshold) & (cooldown == 0)
    if mode == "partition":
        eligible &= region_mask.sum(1) >= 2
    return _strongest(saturation, eligible, budget)


def split_budget(
    count: int, fraction: float, max_neurons: int | None, grid_cells: int | None
) -> int:
    """How many of ``count`` neurons one event may split: ``fraction`` of them (at least one),
    never past ``max_neurons`` or the grid's cells."""
    budget = max(1, math.floor(fraction * count))
    for limit in (max_neurons, grid_cells):
        if limit is not None:
            budget = min(budget, limit - count)
    return max(budget, 0)


def split_rows(
    positions: torch.Tensor, parents: torch.Tensor, grid_dims: tuple[int, int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The neurons after the split, in Morton order of their positions: ``(rows, moved,
    positions, is_child)``. New neuron ``i`` continues old neuron ``rows[i]``; a parent's
    second child sits at the nearest free grid position (``moved``)."""
    count = positions.shape[0]
    children = place_children(positions, parents, grid_dims)
    sources = torch.cat([torch.arange(count), parents])
    all_positions = torch.cat([positions, children])
    moved = torch.arange(len(sources)) >= count
    order = torch.argsort(morton_encode(all_positions), stable=True)
    rows, moved, all_positions = sources[order], moved[order], all_positions[order]
    return rows, moved, all_positions, torch.isin(rows, parents)


def partition_masks(
    region_mask: torch.Tensor, is_child: torch.Tensor, moved: torch.Tensor
) -> torch.Tensor:
    """The children's blocks in a partition split: the child that stays keeps the first half of
    its parent's active blocks (Morton order of regions), the moved child the second half."""
    mask = region_mask.clone()
    for child in torch.nonzero(is_child).flatten().tolist():
        active = torch.nonzero(mask[child]).flatten()
        keep = math.ceil(len(active) / 2)
        drop = active[keep:] if not moved[child] else active[:keep]
        mask[child, drop] = False
    return mask


def perturb_children(
    weight: torch.Tensor,
    rows: torch.Tensor,
    moved: torch.Tensor,
    parents: torch.Tensor,
    parent_weight: torch.Tensor,
    columns: torch.Tensor,
    perturbation: float,
    generator: torch.Generator | None = None,
) -> None:
    """Adds opposite noise to the two children of each parent (rows of ``weight``), inside the
    parent's blocks (``columns``), scaled to the RMS of its weights there; drawn from
    ``generator`` (default: the global one)."""
    rms = ((parent_weight.square() * columns).sum(1) / columns.sum(1).clamp(min=1)).sqrt()
    noise = torch.randn(len(parents), weight.shape[1], generator=generator) * columns
    noise *= (perturbation * rms).unsqueeze(1)
    for i, parent in enumerate(parents.tolist()):
        pair = torch.nonzero(rows == parent).flatten()
        weight[pair[~moved[pair]]] += noise[i]
        weight[pair[moved[pair]]] -= noise[i]


def fresh_children(
    weight: torch.Tensor,
    moved: torch.Tensor,
    columns: torch.Tensor,
    bound: float,
    generator: torch.Generator | None = None,
) -> None:
    """Gives the second children (``moved`` rows of ``weight``) new weights, uniform in
    +-``bound`` inside their parent's blocks (``columns``, one row per child), as a new neuron
    would start; drawn from ``generator`` (default: the global one)."""
    children = torch.nonzero(moved).flatten()
    noise = torch.rand(len(children), weight.shape[1], generator=generator, dtype=weight.dtype)
    weight[children] = (2.0 * noise - 1.0) * bound * columns


def prune_rows(remove: torch.Tensor, saturation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, removed)`` neuron indices; the layer is never emptied: when every neuron would
    go, the one covering most of its input stays."""
    remove = remove.clone()
    if remove.all():
        remove[torch.argmax(saturation)] = False
    return torch.nonzero(~remove).flatten(), torch.nonzero(remove).flatten()


def rewire_masks(
    mask: torch.Tensor,
    weight_rms: torch.Tensor,
    grad_rms: torch.Tensor | None,
    *,
    grow_ratio: float,
    drop_ratio: float,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(activate, drop)`` ``[out, regions]`` bool: per neuron, the inactive region whose
    gradient RMS beats ``grow_ratio`` times the median of its active blocks'; active blocks
    whose weight RMS is under ``drop_ratio`` times the neuron's median (each neuron keeps its
    strongest). At most ``budget`` changes, strongest first, activations before drops."""
    activate = torch.zeros_like(mask)
    if grad_rms is not None:
        typical = _masked_median(grad_rms, mask)
        best, region_index = grad_rms.masked_fill(mask, -1.0).max(1)
        wanted = (best > grow_ratio * typical) & (best > 0)
        chosen = _strongest(best / typical.clamp(min=_TINY), wanted, budget)
        activate[chosen, region_index[chosen]] = True
    typical = _masked_median(weight_rms, mask).unsqueeze(1)
    weak = mask & (weight_rms < drop_ratio * typical)
    strongest = weight_rms.masked_fill(~mask, -1.0).argmax(1)
    weak[torch.arange(mask.shape[0]), strongest] = False
    ratio = weight_rms / typical.clamp(min=_TINY)
    drop = torch.zeros_like(mask)
    budget -= int(activate.sum())
    drop.view(-1)[_strongest(-ratio.flatten(), weak.flatten(), budget)] = True
    return activate, drop


def sum_per_region(values: torch.Tensor, region: torch.Tensor, regions: int) -> torch.Tensor:
    """``[rows, regions]``: sums of ``values`` ``[rows, sorted inputs]`` over each region."""
    return values.new_zeros(values.shape[0], regions).index_add_(1, region, values)


def _masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the median of ``values`` where ``mask`` holds (0 for a row with none)."""
    return values.masked_fill(~mask, float("nan")).nanmedian(1).values.nan_to_num(0.0)


def _strongest(strength: torch.Tensor, wanted: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``wanted`` entries, strongest first, at most ``budget``."""
    indices = torch.nonzero(wanted).flatten()
    ranked = indices[torch.argsort(strength[indices], descending=True, stable=True)]
    return ranked[: max(budget, 0)]
