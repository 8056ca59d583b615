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


# --- spatial memory ops ------------------------------------------------------------------------
# Each takes the store's six arrays by name (region_begin, bitmap, block_begin, code_begin,
# scales, codes: a layer's `store` buffers, StoreArrays; layout in csrc/core/spatial_memory.h).


@torch.library.register_fake("spatium::spatial_linear")
def _spatial_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    out_features: int,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("spatium::spatial_linear_backward_input")
def _spatial_linear_backward_input_fake(
    grad_y: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    return grad_y.new_empty((grad_y.shape[0], in_features))


@torch.library.register_fake("spatium::active_mask")
def _active_mask_fake(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    return codes.new_empty((out_features, in_features), dtype=torch.bool)


@torch.library.register_fake("spatium::dequantize")
def _dequantize_fake(
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    return codes.new_empty((out_features, in_features), dtype=torch.float32)


@torch.library.register_fake("spatium::requantize_")
def _requantize_fake(
    latent: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    block_begin: torch.Tensor,
    code_begin: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
) -> None:
    return None


_STORE_ARGS = slice(3, 9)  # where spatial_linear's arguments hold the six store arrays


def _spatial_linear_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs[:3]
    bits, out_features = inputs[9:]
    ctx.save_for_backward(x, *inputs[_STORE_ARGS])
    ctx.bits = bits
    ctx.out_features = out_features
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _spatial_linear_backward(ctx: object, grad_y: torch.Tensor) -> tuple:
    """Input gradient through the quantized weights; latent-weight gradient straight through
    the quantizer, inside active blocks only; bias gradient as in nn.Linear."""
    x, *store = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.spatium.spatial_linear_backward_input(
            grad_y, *store, ctx.bits, x.shape[1]
        )
    if ctx.needs_input_grad[1]:
        grad_weight = grad_y.t() @ x
        region_begin, scales = store[0], store[4]
        regions = region_begin.shape[0] - 1
        if scales.shape[0] != ctx.out_features * regions:  # some block inactive
            grad_weight.mul_(torch.ops.spatium.active_mask(*store, x.shape[1], ctx.out_features))
        grad_weight = grad_weight.to(ctx.weight_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_bias, *([None] * len(store)), None, None


torch.library.register_autograd(
    "spatium::spatial_linear",
    _spatial_linear_backward,
    setup_context=_spatial_linear_setup_context,
)


# --- activation-map functions --------------------------------------------------------------------
ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "softplus",
    "identity",
    "sin",
    "gaussian",
    "abs",
)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """One of the 12 activation-map functions (:data:`ACTIVATIONS`) applied elementwise, with
    torch.nn.functional's conventions (leaky_relu slope 0.01, elu alpha 1, exact gelu,
    softplus beta 1); ``gaussian`` is ``exp(-x**2)``. Differentiable."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return torch.ops.spatium.activation(x, ACTIVATIONS.index(name))


@torch.library.register_fake("spatium::activation")
def _activation_fake(x: torch.Tensor, fn: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("spatium::activation_backward")
def _activation_backward_fake(grad: torch.Tensor, x: torch.Tensor, fn: int) -> torch.Tensor:
    return torch.empty_like(x)


def _activation_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, fn = inputs
    ctx.save_for_backward(x)
    ctx.fn = fn


def _activation_backward(ctx: object, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return torch.ops.spatium.activation_backward(grad, x, ctx.fn), None


torch.library.register_autograd(
    "spatium::activation", _activation_backward, setup_context=_activation_setup_context
)


@torch.library.register_fake("spatium::activation_map")
@torch.library.register_fake("spatium::activation_mixture")
def _activation_map_fake(
    pre: torch.Tensor, cells: torch.Tensor, table_or_probs: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(pre)


@torch.library.register_fake("spatium::activation_map_backward")
def _activation_map_backward_fake(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(pre)


@torch.library.register_fake("spatium::activation_mixture_backward")
def _activation_mixture_backward_fake(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(pre), torch.empty_like(probs)


def _map_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _activation_map_backward(ctx: object, grad: torch.Tensor) -> tuple:
    pre, cells, table = ctx.saved_tensors
    return torch.ops.spatium.activation_map_backward(grad, pre, cells, table), None, None


def _activation_mixture_backward(ctx: object, grad: torch.Tensor) -> tuple:
    pre, cells, probs = ctx.saved_tensors
    grad_pre, grad_probs = torch.ops.spatium.activation_mixture_backward(grad, pre, cells, probs)
    return grad_pre, None, grad_probs


torch.library.register_autograd(
    "spatium::activation_map", _activation_map_backward, setup_context=_map_setup_context
)
torch.library.register_autograd(
    "spatium::activation_mixture", _activation_mixture_backward, setup_context=_map_setup_context
)


@torch.library.register_fake("spatium::simhash_cells")
def _simhash_cells_fake(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


@torch.library.register_fake("spatium::count_hits_")
def _count_hits_fake(hits: torch.Tensor, cells: torch.Tensor) -> None:
    return None


@torch.library.register_fake("spatium::track_activity_")
def _track_activity_fake(
    output: torch.Tensor, activity: torch.Tensor, output_mean: torch.Tensor, momentum: float
) -> None:
    return None
