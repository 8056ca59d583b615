"""The op contract of ``torch.ops.spatium``, in one place: every op's schema, its checked fake
(meta) impl, its autograd formula and, for devices without a kernel, its portable reference
impl (spatium_torch.reference). The kernels (C++ for the CPU, CUDA) only register impls of
these schemas (csrc/register.cpp). Public wrappers with docstrings come first."""

import torch

from spatium_torch import reference

MAX_COORD = 0xFFFF
CODE_BITS = 48
VALID_BITS = reference.VALID_BITS
HASH_BITS = 6  # an activation map hashes inputs to 6 bits: 64 cells
CELLS = 1 << HASH_BITS


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


# --- schemas ---------------------------------------------------------------------------------
# The store's six arrays, by name (a layer's `store` buffers; layout in
# csrc/core/spatial_memory.h): region_begin, bitmap, block_begin, code_begin int64, scales
# float16, codes uint8.
_STORE = (
    "Tensor region_begin, Tensor bitmap, Tensor block_begin, Tensor code_begin, Tensor scales, "
    "Tensor codes"
)
SCHEMAS = {
    "morton_encode": "(Tensor xyz) -> Tensor",
    "morton_decode": "(Tensor codes) -> Tensor",
    "_threads_used_by_parallel_for": "(int work_items) -> int",
    "spatial_linear": (
        f"(Tensor x, Tensor? weight, Tensor? bias, {_STORE}, int code_format, "
        "int out_features) -> Tensor"
    ),
    "spatial_linear_backward_input": (
        f"(Tensor grad_y, {_STORE}, int code_format, int in_features) -> Tensor"
    ),
    "active_mask": f"({_STORE}, int in_features, int out_features) -> Tensor",
    "dequantize": f"({_STORE}, int code_format, int in_features, int out_features) -> Tensor",
    "requantize_": (
        "(Tensor latent, Tensor region_begin, Tensor bitmap, Tensor block_begin, "
        "Tensor code_begin, Tensor(a!) scales, Tensor(b!) codes, int code_format) -> ()"
    ),
    "activation": "(Tensor x, int fn) -> Tensor",
    "activation_backward": "(Tensor grad, Tensor x, int fn) -> Tensor",
    "activation_map": "(Tensor pre, Tensor cells, Tensor table) -> Tensor",
    "activation_map_backward": "(Tensor grad, Tensor pre, Tensor cells, Tensor table) -> Tensor",
    "learnable_map_backward": (
        "(Tensor grad, Tensor pre, Tensor cells, Tensor table) -> (Tensor, Tensor)"
    ),
    "map_argmax": "(Tensor logits) -> Tensor",
    "factored_map_backward": (
        "(Tensor grad, Tensor pre, Tensor cells, Tensor table) -> (Tensor, Tensor, Tensor)"
    ),
    "factored_map_argmax": (
        "(Tensor neuron_logits, Tensor cell_logits, Tensor initial_table, Tensor lead) -> Tensor"
    ),
    "simhash_cells": "(Tensor x, Tensor projections) -> Tensor",
    "count_hits_": "(Tensor(a!) hits, Tensor cells) -> ()",
    "track_activity_": (
        "(Tensor output, Tensor(a!) activity, Tensor(b!) output_mean, float momentum) -> ()"
    ),
}
_LIBRARY = torch.library.Library("spatium", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)

# Every op but the test hook has a reference impl in plain torch ops: it serves every device
# that has no kernel of its own (CompositeExplicitAutograd fills in for those backends only).
for _name in SCHEMAS:
    if not _name.startswith("_"):
        _LIBRARY.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# --- checked fakes ----------------------------------------------------------------------------
# They check what the kernels check without reading values (shapes, dtypes, devices), so that
# torch.compile, export and meta tensors report the kernels' errors.
def _is_integer(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _check_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


def _check_same_device(op: str, first: torch.Tensor, *others: torch.Tensor) -> None:
    for other in others:
        if other.device != first.device:
            raise ValueError(f"{op}: tensors on {first.device} and {other.device}")


_STORE_DTYPES = (torch.int64,) * 4 + (torch.float16, torch.uint8)
_STORE_NAMES = ("region_begin", "bitmap", "block_begin", "code_begin", "scales", "codes")


def _check_store(
    op: str,
    like: torch.Tensor,
    store: tuple,
    code_format: int,
    in_features: int,
    out_features: int,
) -> None:
    """The store's arrays: 1-D, their dtypes, ``like``'s device, sizes that fit
    ``out_features`` neurons (the kernels also check the values)."""
    for t, dtype, name in zip(store, _STORE_DTYPES, _STORE_NAMES, strict=True):
        if t.dtype != dtype:
            raise TypeError(f"spatium: memory {name} must be {dtype}, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"spatium: memory {name} must be 1-D, got {t.dim()}-D")
    _check_same_device(op, like, *store)
    if code_format not in reference.VALID_FORMATS:
        raise ValueError(
            f"spatium: the code format must be a width 1, 2, 4 or 8, {reference.ODD2_FORMAT} "
            f"(2-bit odd codes) or {reference.NF4_FORMAT} (nf4), got {code_format}"
        )
    region_begin, bitmap, block_begin, code_begin = store[:4]
    regions = region_begin.shape[0] - 1
    if regions < 1 or out_features < 1:
        raise ValueError("spatium: empty memory")
    directory = (out_features + 7) // 8 + 1
    if (
        bitmap.shape[0] != (out_features * regions + 63) // 64
        or block_begin.shape[0] != directory
        or code_begin.shape[0] != directory
    ):
        raise ValueError(
            f"spatium: memory arrays do not fit {out_features} neurons x {regions} regions "
            "(not from one SpatialMemory?)"
        )


def _check_rows(op: str, t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [batch, features], got {list(t.shape)}")
    _check_float(t, op, name)


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


@torch.library.register_fake("spatium::spatial_linear")
def _spatial_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *store_format_out: object,
) -> torch.Tensor:
    *store, code_format, out_features = store_format_out
    _check_rows("spatial_linear", x, "x")
    _check_store("spatial_linear", x, tuple(store), code_format, x.shape[1], out_features)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"spatial_linear: bias must be [{out_features}], got {list(bias.shape)}")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("spatium::spatial_linear_backward_input")
def _spatial_linear_backward_input_fake(
    grad_y: torch.Tensor, *store_format_in: object
) -> torch.Tensor:
    *store, code_format, in_features = store_format_in
    _check_rows("spatial_linear_backward_input", grad_y, "grad_y")
    _check_store(
        "spatial_linear_backward_input",
        grad_y,
        tuple(store),
        code_format,
        in_features,
        grad_y.shape[1],
    )
    return grad_y.new_empty((grad_y.shape[0], in_features))


@torch.library.register_fake("spatium::active_mask")
def _active_mask_fake(*store_in_out: object) -> torch.Tensor:
    *store, in_features, out_features = store_in_out
    _check_store("active_mask", store[0], tuple(store), 8, in_features, out_features)
    return store[0].new_empty((out_features, in_features), dtype=torch.bool)


@torch.library.register_fake("spatium::dequantize")
def _dequantize_fake(*store_format_in_out: object) -> torch.Tensor:
    *store, code_format, in_features, out_features = store_format_in_out
    _check_store("dequantize", store[0], tuple(store), code_format, in_features, out_features)
    return store[0].new_empty((out_features, in_features), dtype=torch.float32)


@torch.library.register_fake("spatium::requantize_")
def _requantize_fake(latent: torch.Tensor, *store_format: object) -> None:
    *store, code_format = store_format
    if latent.dim() != 2:
        raise ValueError(f"requantize_: latent must be 2-D [out, in], got {list(latent.shape)}")
    if not latent.dtype.is_floating_point:
        raise TypeError(f"requantize_: latent must be floating point, got {latent.dtype}")
    _check_store("requantize_", latent, tuple(store), code_format, latent.shape[1], latent.shape[0])


@torch.library.register_fake("spatium::activation")
def _activation_fake(x: torch.Tensor, fn: int) -> torch.Tensor:
    _check_float(x, "activation", "x")
    _check_fn(fn)
    return torch.empty_like(x)


@torch.library.register_fake("spatium::activation_backward")
def _activation_backward_fake(grad: torch.Tensor, x: torch.Tensor, fn: int) -> torch.Tensor:
    _check_float(x, "activation", "x")
    _check_fn(fn)
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError("activation_backward: grad must match x in shape and dtype")
    return torch.empty_like(x)


def _check_fn(fn: int) -> None:
    if not 0 <= fn < len(ACTIVATIONS):
        raise ValueError(f"activation: function index must be in [0, {len(ACTIVATIONS)}), got {fn}")


def _check_map(op: str, pre: torch.Tensor, cells: torch.Tensor, *others: torch.Tensor) -> None:
    _check_float(pre, op, "pre")
    if pre.dim() != 2:
        raise ValueError(f"{op}: pre must be [batch, neurons], got {list(pre.shape)}")
    if cells.dtype != torch.int64:
        raise TypeError(f"{op}: cells must be int64")
    if cells.dim() != 1 or cells.shape[0] != pre.shape[0]:
        raise ValueError(f"{op}: cells must be [batch] = [{pre.shape[0]}], got {list(cells.shape)}")
    _check_same_device(op, pre, cells, *others)


def _check_table(table: torch.Tensor, neurons: int) -> None:
    if table.dtype != torch.uint8:
        raise TypeError("activation_map: table must be uint8")
    if tuple(table.shape) != (neurons, CELLS):
        raise ValueError(f"activation_map: table must be [{neurons}, 64], got {list(table.shape)}")


@torch.library.register_fake("spatium::activation_map")
def _activation_map_fake(
    pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    _check_map("activation_map", pre, cells, table)
    _check_table(table, pre.shape[1])
    return torch.empty_like(pre)


@torch.library.register_fake("spatium::activation_map_backward")
def _activation_map_backward_fake(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    _check_map("activation_map_backward", pre, cells, table, grad)
    _check_table(table, pre.shape[1])
    return torch.empty_like(pre)


@torch.library.register_fake("spatium::learnable_map_backward")
def _learnable_map_backward_fake(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_map("learnable_map_backward", pre, cells, table, grad)
    _check_table(table, pre.shape[1])
    if grad.shape != pre.shape or grad.dtype != pre.dtype:
        raise ValueError("learnable_map_backward: grad must match pre")
    # [neurons, 64, 12] stored cell-major, as a learnable map's logits
    grad_logits = pre.new_empty((CELLS, len(ACTIVATIONS), pre.shape[1])).permute(2, 0, 1)
    return torch.empty_like(pre), grad_logits


@torch.library.register_fake("spatium::map_argmax")
def _map_argmax_fake(logits: torch.Tensor) -> torch.Tensor:
    _check_float(logits, "map_argmax", "logits")
    if logits.dim() != 3 or tuple(logits.shape[1:]) != (CELLS, len(ACTIVATIONS)):
        raise ValueError(
            f"map_argmax: logits must be [neurons, 64, {len(ACTIVATIONS)}], "
            f"got {list(logits.shape)}"
        )
    return logits.new_empty((CELLS, logits.shape[0]), dtype=torch.uint8).t()


@torch.library.register_fake("spatium::factored_map_backward")
def _factored_map_backward_fake(
    grad: torch.Tensor, pre: torch.Tensor, cells: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_map("factored_map_backward", pre, cells, table, grad)
    _check_table(table, pre.shape[1])
    if grad.shape != pre.shape or grad.dtype != pre.dtype:
        raise ValueError("factored_map_backward: grad must match pre")
    # [neurons, 12] stored function-major, as a factored map's neuron logits
    grad_neurons = pre.new_empty((len(ACTIVATIONS), pre.shape[1])).t()
    return torch.empty_like(pre), grad_neurons, pre.new_empty((CELLS, len(ACTIVATIONS)))


@torch.library.register_fake("spatium::factored_map_argmax")
def _factored_map_argmax_fake(
    neuron_logits: torch.Tensor,
    cell_logits: torch.Tensor,
    initial_table: torch.Tensor,
    lead: torch.Tensor,
) -> torch.Tensor:
    op = "factored_map_argmax"
    _check_float(neuron_logits, op, "neuron_logits")
    functions = len(ACTIVATIONS)
    if neuron_logits.dim() != 2 or neuron_logits.shape[1] != functions:
        raise ValueError(
            f"{op}: neuron_logits must be [neurons, {functions}], got {list(neuron_logits.shape)}"
        )
    if cell_logits.dtype != neuron_logits.dtype:
        raise TypeError(f"{op}: cell_logits must have neuron_logits' dtype")
    if tuple(cell_logits.shape) != (CELLS, functions):
        raise ValueError(
            f"{op}: cell_logits must be [{CELLS}, {functions}], got {list(cell_logits.shape)}"
        )
    _check_table(initial_table, neuron_logits.shape[0])
    if lead.dim() != 0 or lead.dtype != neuron_logits.dtype:
        raise ValueError(f"{op}: lead must be a 0-dim tensor of neuron_logits' dtype")
    _check_same_device(op, neuron_logits, cell_logits, initial_table, lead)
    return neuron_logits.new_empty((CELLS, neuron_logits.shape[0]), dtype=torch.uint8).t()


@torch.library.register_fake("spatium::simhash_cells")
def _simhash_cells_fake(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    _check_rows("simhash_cells", x, "x")
    if tuple(projections.shape) != (HASH_BITS, x.shape[1]):
        raise ValueError(
            f"simhash_cells: projections must be [{HASH_BITS}, {x.shape[1]}], got "
            f"{list(projections.shape)}"
        )
    if projections.dtype != x.dtype:
        raise TypeError("simhash_cells: projections must have x's dtype")
    _check_same_device("simhash_cells", x, projections)
    return x.new_empty((x.shape[0],), dtype=torch.int64)


@torch.library.register_fake("spatium::count_hits_")
def _count_hits_fake(hits: torch.Tensor, cells: torch.Tensor) -> None:
    if hits.dtype != torch.int64:
        raise TypeError("count_hits_: hits must be int64")
    if hits.dim() != 2 or hits.shape[1] != CELLS:
        raise ValueError(
            f"count_hits_: hits must be contiguous [neurons, 64], got {list(hits.shape)}"
        )
    if cells.dim() != 1:
        raise ValueError("count_hits_: cells must be [batch]")
    _check_same_device("count_hits_", hits, cells)


@torch.library.register_fake("spatium::track_activity_")
def _track_activity_fake(
    output: torch.Tensor, activity: torch.Tensor, output_mean: torch.Tensor, momentum: float
) -> None:
    if output.dim() != 2:
        raise ValueError(
            f"track_activity_: output must be [batch, neurons], got {list(output.shape)}"
        )
    for t in (activity, output_mean):
        if t.dim() != 1 or t.shape[0] != output.shape[1]:
            raise ValueError(
                f"track_activity_: statistics must be contiguous [{output.shape[1]}], got "
                f"{list(t.shape)}"
            )
    if not output.is_floating_point():
        raise TypeError(f"track_activity_: output must be floating point, got {output.dtype}")
    if activity.dtype != output_mean.dtype or activity.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            "track_activity_: activity and output_mean must both be float32 or float64, got "
            f"{activity.dtype} and {output_mean.dtype}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"track_activity_: momentum must be in [0, 1], got {momentum}")
    _check_same_device("track_activity_", output, activity, output_mean)


# --- autograd -----------------------------------------------------------------------------------
_STORE_ARGS = slice(3, 9)  # where spatial_linear's arguments hold the six store arrays


def _spatial_linear_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs[:3]
    code_format, out_features = inputs[9:]
    ctx.save_for_backward(x, *inputs[_STORE_ARGS])
    # Only the weight's identity and dtype are used (a graph outlives in-place edits of the
    # weight, such as a layout change), so it is kept without save_for_backward's version check.
    ctx.weight = weight
    ctx.code_format = code_format
    ctx.out_features = out_features
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _spatial_linear_backward(ctx: object, grad_y: torch.Tensor) -> tuple:
    """Input gradient through the quantized weights; latent-weight gradient straight through
    the quantizer, inside active blocks only; bias gradient as in nn.Linear. Under
    ``create_graph`` (gradient penalties, Hessian-vector products) the same gradients are built
    from differentiable ops, so higher-order gradients are exact too."""
    x, *store = ctx.saved_tensors
    weight = ctx.weight
    in_features = x.shape[1]
    grad_x = grad_weight = grad_bias = None
    differentiable = torch.is_grad_enabled()
    blockwise = ctx.needs_input_grad[1] and _blockwise(x, store, ctx.out_features, differentiable)
    mask = None
    if (ctx.needs_input_grad[1] and not blockwise) or (ctx.needs_input_grad[0] and differentiable):
        regions = store[0].shape[0] - 1
        # None when every block is active (nothing to mask)
        mask = (
            torch.ops.spatium.active_mask(*store, in_features, ctx.out_features)
            if store[4].shape[0] != ctx.out_features * regions
            else None
        )
    if ctx.needs_input_grad[0]:
        if differentiable:
            # The dequantized weight is a constant whose gradient goes straight through to the
            # latent weight inside active blocks, as in the first-order formula below.
            dense = torch.ops.spatium.dequantize(
                *store, ctx.code_format, in_features, ctx.out_features
            )
            dense = dense.to(grad_y.dtype)
            if weight is not None and weight.requires_grad:
                dense = dense + _masked(weight - weight.detach(), mask).to(grad_y.dtype)
            grad_x = grad_y @ dense
        else:
            grad_x = torch.ops.spatium.spatial_linear_backward_input(
                grad_y, *store, ctx.code_format, in_features
            )
    if ctx.needs_input_grad[1]:
        grad_weight = (
            _blockwise_weight_grad(grad_y, x, store[0], store[1], ctx.out_features)
            if blockwise
            else _masked(grad_y.t() @ x, mask, in_place=True)
        ).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_bias, *([None] * len(store)), None, None


# A sparse layer's latent-weight gradient is computed block by block (one product per region,
# over the neurons active there) where that beats the dense product and a mask: on the CPU,
# in eager first-order backward, with at most half the blocks active and at least this many
# weights (measured at density 0.25: 2x faster at 4096 x 4096, slower at 1024 x 1024, where
# the per-region calls cost more than the products they save).
BLOCKWISE_MIN_WEIGHTS = 1 << 22


def _blockwise(x: torch.Tensor, store: list, out_features: int, differentiable: bool) -> bool:
    regions = store[0].shape[0] - 1
    return (
        x.device.type == "cpu"
        and not differentiable
        and not torch.compiler.is_compiling()
        and out_features * x.shape[1] >= BLOCKWISE_MIN_WEIGHTS
        and 2 * store[4].shape[0] <= out_features * regions
    )


def _blockwise_weight_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    region_begin: torch.Tensor,
    bitmap: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """``grad_y^T x`` inside the active blocks, zero elsewhere: per region, the product of the
    active neurons' output gradients with the region's inputs."""
    bounds = region_begin.tolist()
    active = reference.active_blocks(bitmap, out_features, len(bounds) - 1)
    grad = x.new_zeros(out_features, x.shape[1])
    grad_t = grad_y.t()
    for r, neurons in enumerate(active.t().contiguous()):
        rows = neurons.nonzero().squeeze(1)
        if rows.numel():
            begin, end = bounds[r], bounds[r + 1]
            product = grad_t.index_select(0, rows) @ x[:, begin:end]
            grad[:, begin:end].index_copy_(0, rows, product)
    return grad


def _masked(t: torch.Tensor, mask: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """t with zeros outside the active blocks (a select, not a product: 0 x NaN stays 0); in
    place for a tensor nothing else holds (a fresh product: a second [out, in] pass saved)."""
    if mask is None:
        return t
    return t.masked_fill_(~mask, 0) if in_place else t.masked_fill(~mask, 0)


def _activation_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, fn = inputs
    ctx.save_for_backward(x)
    ctx.fn = fn


def _activation_backward(ctx: object, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return torch.ops.spatium.activation_backward(grad, x, ctx.fn), None


def _map_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _activation_map_backward(ctx: object, grad: torch.Tensor) -> tuple:
    pre, cells, table = ctx.saved_tensors
    return torch.ops.spatium.activation_map_backward(grad, pre, cells, table), None, None


for _name, _backward, _setup in (
    ("spatial_linear", _spatial_linear_backward, _spatial_linear_setup_context),
    ("activation", _activation_backward, _activation_setup_context),
    ("activation_map", _activation_map_backward, _map_setup_context),
):
    torch.library.register_autograd(f"spatium::{_name}", _backward, setup_context=_setup)
