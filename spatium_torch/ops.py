"""Python faces of the C++ ops in ``torch.ops.spatium``: public wrappers with docstrings and the
fake (meta) impls that let ``torch.compile`` and ``torch.library.opcheck`` trace them."""

import torch

MAX_COORD = 0xFFFF
CODE_BITS = 48


def morton_encode(xyz: torch.Tensor) -> torch.Tensor:
    """Morton (Z-order) codes of 3D positions.

    Args:
        xyz: integer tensor of shape ``[N, 3]`` holding ``(x, y, z)`` rows, each coordinate in
            ``[0, 65535]``.

    Returns:
        int64 tensor of shape ``[N]``: bit ``i`` of x, y, z goes to bit ``3i``, ``3i+1``,
        ``3i+2`` of the code, so codes lie in ``[0, 2**48)``.

    Raises:
        ValueError: wrong shape, or a coordinate outside ``[0, 65535]`` (the message names the
            row); never a silent wrap.
        TypeError: a non-integer dtype.
    """
    return torch.ops.spatium.morton_encode(xyz)


def morton_decode(codes: torch.Tensor) -> torch.Tensor:
    """Positions of Morton codes: the exact inverse of :func:`morton_encode`.

    Args:
        codes: integer tensor of shape ``[N]`` with values in ``[0, 2**48)``.

    Returns:
        int64 tensor of shape ``[N, 3]`` of ``(x, y, z)`` rows.

    Raises:
        ValueError: wrong shape, or a code outside ``[0, 2**48)`` (the message names the index).
        TypeError: a non-integer dtype.
    """
    return torch.ops.spatium.morton_decode(codes)


def built_with_cuda() -> bool:
    """Whether this build of the extension has CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("spatium::morton_encode", "CUDA")


def _is_integer(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


@torch.library.register_fake("spatium::morton_encode")
def _morton_encode_fake(xyz: torch.Tensor) -> torch.Tensor:
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(
            f"morton_encode: expected positions of shape [N, 3], got {list(xyz.shape)}"
        )
    if not _is_integer(xyz):
        raise TypeError(f"morton_encode: expected an integer tensor, got {xyz.dtype}")
    return xyz.new_empty((xyz.shape[0],), dtype=torch.int64)


@torch.library.register_fake("spatium::morton_decode")
def _morton_decode_fake(codes: torch.Tensor) -> torch.Tensor:
    if codes.dim() != 1:
        raise ValueError(f"morton_decode: expected codes of shape [N], got {list(codes.shape)}")
    if not _is_integer(codes):
        raise TypeError(f"morton_decode: expected an integer tensor, got {codes.dtype}")
    return codes.new_empty((codes.shape[0], 3), dtype=torch.int64)
