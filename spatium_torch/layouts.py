"""Where a layer's inputs and neurons sit: one distinct 3D position per input feature and per
neuron, the Morton order the store keeps them in, and the regions that order makes."""

import math
from collections.abc import Sequence

import torch

from spatium_torch.ops import MAX_COORD, morton_decode, morton_encode


def default(num_features: int) -> torch.Tensor:
    """Feature j at ``morton_decode(j)``: index order is Morton order. Shape ``[n, 3]``."""
    check_count(num_features, "num_features")
    return morton_decode(torch.arange(num_features, dtype=torch.int64))


def grid(height: int, width: int, channels: int = 1) -> torch.Tensor:
    """Positions of the pixels of a ``[channels, height, width]`` image, in the order a
    flattened ``[C, H, W]`` tensor lists them (``x.flatten(1)`` of a ``[B, C, H, W]`` batch):
    pixel ``(c, h, w)`` sits at ``x = w, y = h, z = c``. Shape ``[C * H * W, 3]``, int64."""
    for name, value in (("height", height), ("width", width), ("channels", channels)):
        check_count(value, name)
        if value > MAX_COORD + 1:
            raise ValueError(f"{name} must be at most {MAX_COORD + 1}, got {value}")
    c, h, w = torch.meshgrid(
        torch.arange(channels), torch.arange(height), torch.arange(width), indexing="ij"
    )
    return torch.stack([w.flatten(), h.flatten(), c.flatten()], dim=1)


def check_count(value: int, name: str) -> None:
    """Raises ValueError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def checked_positions(
    positions: torch.Tensor | None,
    count: int,
    name: str = "input_positions",
    grid_dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """``positions`` (default: :func:`default`) as ``[count, 3]`` int64 on the host, checked:
    integers, distinct, in ``[0, 65535]`` or, with ``grid_dims``, inside that grid. Raises
    ValueError or TypeError naming ``name``."""
    if positions is None:
        return default(count)
    positions = torch.as_tensor(positions)
    if positions.dim() != 2 or positions.shape != (count, 3):
        raise ValueError(f"{name} must have shape [{count}, 3], got {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {positions.dtype}")
    positions = positions.to("cpu", torch.int64)
    if (positions < 0).any() or (positions > MAX_COORD).any():
        raise ValueError(f"{name} must lie in [0, {MAX_COORD}]")
    if grid_dims is not None and (positions >= torch.tensor(grid_dims)).any():
        raise ValueError(f"{name} must lie in the grid {tuple(grid_dims)}")
    codes = torch.sort(morton_encode(positions)).values
    if (codes[1:] == codes[:-1]).any():
        duplicate = morton_decode(codes[1:][codes[1:] == codes[:-1]][:1])[0].tolist()
        raise ValueError(f"{name} must be distinct; {tuple(duplicate)} appears twice")
    return positions


def neuron_grid(count: int, grid_dims: Sequence[int] | None) -> torch.Tensor:
    """Neuron positions: the first `count` cells of the grid in Morton order."""
    if grid_dims is None:
        return default(count)
    dims = tuple(grid_dims)
    if len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise ValueError(f"grid_dims must be three ints (X, Y, Z), got {grid_dims!r}")
    if any(not 1 <= d <= MAX_COORD + 1 for d in dims) or not count <= math.prod(dims) <= 1 << 24:
        raise ValueError(
            f"grid_dims {dims} must be in [1, {MAX_COORD + 1}] with between {count} neurons "
            "and 2**24 cells"
        )
    cells = torch.cartesian_prod(*(torch.arange(d) for d in dims)).reshape(-1, 3)
    return morton_decode(torch.sort(morton_encode(cells)).values[:count])


def morton_order(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inputs' sorted Morton codes, and the permutation from that order to the inputs'
    order (None when they already are in Morton order): the memory keeps inputs sorted. On the
    host."""
    sorted_codes, order = torch.sort(morton_encode(positions.cpu()))
    identity = torch.equal(order, torch.arange(len(order)))
    return sorted_codes, None if identity else order


def region_of(region_begin: torch.Tensor, count: int) -> torch.Tensor:
    """The region of each of ``count`` Morton-sorted inputs."""
    inputs = torch.arange(count, device=region_begin.device)
    return torch.searchsorted(region_begin[1:], inputs, right=True)


def to_input_order(sorted_columns: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``[rows, in]`` columns in Morton order rearranged into the inputs' order."""
    if order is None:
        return sorted_columns
    columns = torch.empty_like(sorted_columns)
    columns[:, order] = sorted_columns
    return columns


def initial_mask(
    region_begin: torch.Tensor,
    sorted_codes: torch.Tensor,
    neuron_positions: torch.Tensor,
    density: float,
    connectivity: str,
) -> torch.Tensor:
    """``[out, regions]`` bool: each neuron's first active blocks (``density`` of the regions
    that ``region_begin`` delimits among the sorted inputs: the nearest to the neuron, both
    spaces scaled to the unit cube, or random ones)."""
    out, regions = neuron_positions.shape[0], region_begin.shape[0] - 1
    if density >= 1.0:
        return torch.ones(out, regions, dtype=torch.bool)
    keep = max(1, round(density * regions))
    if connectivity == "random":
        scores = torch.rand(out, regions)
    else:
        region = region_of(region_begin, len(sorted_codes))
        inputs = _unit_cube(morton_decode(sorted_codes))
        centers = torch.zeros(regions, 3).index_add_(0, region, inputs)
        centers /= torch.bincount(region, minlength=regions).unsqueeze(1)
        scores = torch.cdist(_unit_cube(neuron_positions), centers)
    chosen = torch.argsort(scores, dim=1, stable=True)[:, :keep]
    return torch.zeros(out, regions, dtype=torch.bool).scatter_(1, chosen, True)


def _unit_cube(positions: torch.Tensor) -> torch.Tensor:
    """Positions scaled per axis to [0, 1] (a flat axis stays at 0)."""
    p = positions.to(torch.float32)
    low = p.min(0).values
    return (p - low) / (p.max(0).values - low).clamp(min=1.0)
