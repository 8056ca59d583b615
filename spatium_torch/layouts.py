"""Input layouts: one distinct 3D position per input feature."""

import torch

from spatium_torch.ops import MAX_COORD, morton_decode


def default(num_features: int) -> torch.Tensor:
    """Feature j at ``morton_decode(j)``: index order is Morton order. Shape ``[n, 3]``."""
    _check_count(num_features, "num_features")
    return morton_decode(torch.arange(num_features, dtype=torch.int64))


def grid(height: int, width: int, channels: int = 1) -> torch.Tensor:
    """Positions of the pixels of a ``[channels, height, width]`` image, in the order a
    flattened ``[C, H, W]`` tensor lists them (``x.flatten(1)`` of a ``[B, C, H, W]`` batch):
    pixel ``(c, h, w)`` sits at ``x = w, y = h, z = c``. Shape ``[C * H * W, 3]``, int64."""
    for name, value in (("height", height), ("width", width), ("channels", channels)):
        _check_count(value, name)
        if value > MAX_COORD + 1:
            raise ValueError(f"{name} must be at most {MAX_COORD + 1}, got {value}")
    c, h, w = torch.meshgrid(
        torch.arange(channels), torch.arange(height), torch.arange(width), indexing="ij"
    )
    return torch.stack([w.flatten(), h.flatten(), c.flatten()], dim=1)


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
