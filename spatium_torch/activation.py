"""Activation maps: every neuron has an 8x8 grid of cells, each holding one of 12
activation functions; a SimHash of the layer's input picks the cell for each sample, so similar
inputs use the same cell."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spatium_torch import reference
from spatium_torch.ops import ACTIVATIONS, CELLS, HASH_BITS
from spatium_torch.store import check_tensor
from spatium_torch.tracked import TrackedParameter

GRID = 8
# CELLS = GRID * GRID cells, picked by HASH_BITS = 6 bits: 3 of row, 3 of column.
INITS = ("uniform", "random", "gradient")
# "gradient": this function in the central 4x4 cells, the other on the edge.
GRADIENT_CENTRE, GRADIENT_EDGE = "relu", "tanh"
# By default a learnable map's initial functions lead the others by this much in the logits.
INITIAL_LOGIT = 4.0
# How a learnable map holds its logits: "factored" (a neuron's logits plus its cell's, shared by
# the layer's neurons, plus the initial function's lead), or "full" (one per neuron, cell and
# function).
LOGIT_FORMS = ("factored", "full")
# The learnable parameters of each form, and whether each has a row per neuron.
_LOGIT_PARAMETERS = {
    "full": {"logits": True},
    "factored": {"neuron_logits": True, "cell_logits": False},
}


class _StraightThroughMap(torch.autograd.Function):
    """A learnable map while training: the forward applies each cell's argmax function (what
    eval applies too); the backward gives the logits the first-order change of the loss were
    a cell switched to each function (zero for its current one): per (neuron, cell, function)
    for full logits; summed over each neuron's cells and over each cell's neurons for factored
    logits, whose sum makes a cell's logits.

    Its forward takes ``ctx`` (no ``setup_context``): ``apply`` then does not bind the
    arguments through ``inspect.signature``, which cost about 60 us a call, more than the map's
    own kernels on a small layer. (functorch transforms need a ``setup_context``; nothing here
    runs under them.)"""

    @staticmethod
    def forward(
        ctx: Any,
        pre: torch.Tensor,
        cells: torch.Tensor,
        table: torch.Tensor,
        factored: bool,
        *logits: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(pre, cells, table)
        ctx.factored, ctx.logits_dtype = factored, logits[0].dtype
        return torch.ops.spatium.activation_map(pre, cells, table)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        pre, cells, table = ctx.saved_tensors
        ops = torch.ops.spatium
        backward = ops.factored_map_backward if ctx.factored else ops.learnable_map_backward
        grad_pre, *grad_logits = backward(grad.contiguous(), pre, cells, table)
        return grad_pre, None, None, None, *(g.to(ctx.logits_dtype) for g in grad_logits)


class ActivationMap(nn.Module):
    """Per-neuron 8x8 maps of activation functions.

    ``y = map(pre, hash_input)``: ``pre`` ``[..., num_features]`` are the pre-activations,
    ``hash_input`` ``[..., hash_features]`` the input that chooses the cell (for a layer, that
    layer's input). The cell of a sample is the signs of 6 fixed random projections of
    ``hash_input`` (seeded; saved in the state_dict): 3 bits of row, 3 of column.

    The state_dict holds the function table at 4 bits a cell (``table``, ``[neurons, 32]``
    uint8, cell 2i in the low half of byte i); states holding one byte a cell load too.

    Args:
        num_features: neurons (the size of ``pre``'s last dimension).
        hash_features: size of ``hash_input``'s last dimension.
        init: ``"uniform"`` (every cell relu), ``"random"``, or ``"gradient"`` (relu in the
            central 4x4 cells, tanh on the edge).
        learnable: per-cell logits over the 12 functions. The map applies each cell's argmax
            function in training as in eval (the argmax is recomputed once per change of the
            logits, i.e. once per optimizer step), and trains straight through it: the gradient
            of logit k is the first-order change of the loss were its cell switched to function
            k, and zero for the cell's current function. A cell switches when another logit
            overtakes its current one.
        logit_form: how a learnable map holds its logits. ``"factored"`` (the default): the
            logits of neuron n's cell c are ``neuron_logits[n] + cell_logits[c]`` plus
            ``initial_logit`` for the cell's initial function (``initial_table``, fixed), so a
            neuron learns which functions it prefers and a cell which functions its inputs
            prefer across the layer: 12 parameters a neuron and 768 a layer. ``"full"``: one
            logit per neuron, cell and function (``logits``, ``[neurons, 64, 12]``), 768 a
            neuron; every cell of every neuron learns on its own, and a training step costs
            about twice the relu model's (a factored map's: see the README).
        seed: seeds the projections and the ``"random"`` init.
        initial_logit: a learnable map's starting logit of each cell's initial function (the
            others start at 0): the lead another function has to make up before a cell
            switches, so > 0. With Adam at lr 3e-3, 4 takes 1,333 steps that all favour the
            same switch; on MNIST-1D no cell switches at 4 or 2 in 40 epochs.
    """

    def __init__(
        self,
        num_features: int,
        hash_features: int,
        *,
        init: str = "uniform",
        learnable: bool = False,
        logit_form: str = "factored",
        seed: int = 0,
        initial_logit: float = INITIAL_LOGIT,
    ) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("hash_features", hash_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if logit_form not in LOGIT_FORMS:
            raise ValueError(f"logit_form must be one of {LOGIT_FORMS}, got {logit_form!r}")
        if learnable and not (initial_logit > 0 and math.isfinite(initial_logit)):
            raise ValueError(
                "initial_logit must be finite and > 0: it is the lead of each cell's initial "
                f"function (at 0 every cell would start as {ACTIVATIONS[0]}), got {initial_logit!r}"
            )
        self.num_features = num_features
        self.hash_features = hash_features
        self.init = init
        self.learnable = learnable
        self.logit_form = logit_form
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "projections", torch.randn(HASH_BITS, hash_features, generator=generator)
        )
        table = _initial_table(num_features, init, generator)
        for name in ("logits", "neuron_logits", "cell_logits"):
            self.register_parameter(name, None)
        for name in ("table", "initial_table", "initial_lead"):
            self.register_buffer(name, None)
        if not learnable:
            self.table = table
        elif logit_form == "full":
            logits = torch.zeros(num_features, CELLS, len(ACTIVATIONS))
            logits.scatter_(2, table.long().unsqueeze(-1), float(initial_logit))
            self.logits = TrackedParameter(_cell_major(logits))
        else:
            functions = len(ACTIVATIONS)
            self.neuron_logits = TrackedParameter(torch.zeros(functions, num_features).t())
            self.cell_logits = TrackedParameter(torch.zeros(CELLS, functions))
            self.initial_table = _cell_major(table)
            self.initial_lead = torch.tensor(float(initial_logit))
        self.register_buffer("hits", torch.zeros(num_features, CELLS, dtype=torch.int64))
        self._argmax: torch.Tensor | None = None
        self._argmax_key: tuple | None = None
        # (table, its version, its cell-major copy); holding the table keeps its identity.
        self._table_copy: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def cells(self, hash_input: torch.Tensor) -> torch.Tensor:
        """The cell (row * 8 + column) of every sample: int64 ``[...]``."""
        self._check_hash_input(hash_input)
        flat = _rows(hash_input).to(self.projections.dtype)
        cells = torch.ops.spatium.simhash_cells(flat, self.projections)
        return cells if hash_input.dim() == 2 else cells.reshape(hash_input.shape[:-1])

    def _check_hash_input(self, hash_input: torch.Tensor) -> None:
        if hash_input.dim() == 0 or hash_input.shape[-1] != self.hash_features:
            raise ValueError(
                f"ActivationMap: hash input must be [..., {self.hash_features}], "
                f"got {tuple(hash_input.shape)}"
            )

    def function_table(self) -> torch.Tensor:
        """The function index of every cell ``[neurons, 64]`` (uint8; for a learnable map the
        argmax, recomputed only after the logits change)."""
        if self.table is not None:
            return self.table
        if torch.compiler.is_compiling():
            return self._argmax_of_logits()  # no cache to guard on
        key = self._logits_key()
        if key is None or key != self._argmax_key:
            self._argmax = self._argmax_of_logits()
            self._argmax_key = key
        return self._argmax

    def _argmax_of_logits(self) -> torch.Tensor:
        if self.logits is not None:
            return torch.ops.spatium.map_argmax(self.logits.detach())
        return torch.ops.spatium.factored_map_argmax(
            self.neuron_logits.detach(),
            self.cell_logits.detach(),
            self.initial_table,
            self.initial_lead.to(self.neuron_logits.dtype),
        )

    def _logits_key(self) -> tuple | None:
        """What the argmax depends on, stamped; None when a part cannot be followed (a plain
        Parameter assigned by hand)."""
        # Read from the module's dicts, not through nn.Module.__getattr__: once per forward.
        parameters = [p for p in self._parameters.values() if p is not None]
        if not all(isinstance(p, TrackedParameter) for p in parameters):
            return None
        buffers = (self._buffers["initial_table"], self._buffers["initial_lead"])
        return (
            *(p.stamp() for p in parameters),
            *((id(b), b._version, b.data_ptr()) for b in buffers if b is not None),
        )

    def learnable_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable map's parameters by name (none for a fixed or frozen map)."""
        parameters = {n: getattr(self, n) for n in _LOGIT_PARAMETERS[self.logit_form]}
        return {n: p for n, p in parameters.items() if p is not None}

    def parameter_moves(
        self, other: ActivationMap, rows: torch.Tensor | None = None
    ) -> list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
        """``(this map's parameter, other's, how its optimizer state follows)`` for each
        learnable parameter, where ``other`` is this map after a resize: the state of
        per-neuron logits follows ``rows`` (None: the neurons stayed), per-cell logits' stays."""
        per_neuron = _LOGIT_PARAMETERS[self.logit_form]
        return [
            (mine, getattr(other, name), _follow_rows(rows if per_neuron[name] else None))
            for name, mine in self.learnable_parameters().items()
        ]

    def _kernel_table(self) -> torch.Tensor:
        """function_table() stored cell-major, the layout the kernels read (a fixed map's table
        is transposed once per change, not per call)."""
        table = self.function_table()
        if table.t().is_contiguous():
            return table
        cached = self._table_copy
        if cached is None or cached[0] is not table or cached[1] != table._version:
            cached = self._table_copy = (table, table._version, _cell_major(table))
        return cached[2]

    def select_neurons(self, rows: torch.Tensor) -> ActivationMap:
        """A copy whose neuron i is this map's neuron rows[i]: cells, logits and hit counts
        follow their neuron (for growth and pruning)."""
        picked = copy.deepcopy(self)
        picked.num_features = int(rows.numel())
        if self.logits is not None:
            picked.logits = type(self.logits)(_cell_major(self.logits.detach()[rows]))
        if self.neuron_logits is not None:
            neuron_logits = self.neuron_logits.detach()[rows].t().contiguous().t()
            picked.neuron_logits = type(self.neuron_logits)(neuron_logits)
        if self.table is not None:
            picked.table = self.table[rows].clone()
        if self.initial_table is not None:
            picked.initial_table = _cell_major(self.initial_table[rows])
        if self.hits is not None:
            picked.hits = self.hits[rows].clone()
        picked._argmax_key = None  # the cache follows the new logits
        return picked

    def reset_hits(self) -> None:
        """Zeroes the hit counts."""
        self._checked_hits().zero_()

    def dead_cells(self) -> torch.Tensor:
        """``[neurons, 64]`` bool: cells no sample has hit since the last reset."""
        return self._checked_hits() == 0

    def _checked_hits(self) -> torch.Tensor:
        if self.hits is None:
            raise ValueError(
                "ActivationMap: the hit counts were dropped at freeze "
                "(st.freeze(model, keep_hits=True) keeps them)"
            )
        return self.hits

    def freeze(self, keep_hits: bool = False) -> None:
        """Fixes a learnable map to its argmax functions (the logits are dropped) and drops the
        hit counts unless ``keep_hits``: what inference needs, nothing more."""
        if self.table is None:
            table = self.function_table().contiguous()
            for name in self.learnable_parameters():
                self.register_parameter(name, None)
            self.register_buffer("initial_table", None)
            self.register_buffer("initial_lead", None)
            self.register_buffer("table", table)
            self._argmax = None
        if not keep_hits:
            self.register_buffer("hits", None)

    # --- state_dict ---------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            # Held cell- or function-major for the kernels; saved contiguous (safetensors takes
            # no other).
            for name in self.learnable_parameters():
                destination[prefix + name] = destination[prefix + name].contiguous()
        for name in ("table", "initial_table"):
            table = getattr(self, name)
            if table is not None and table.device.type != "meta":
                destination[prefix + name] = pack_nibbles(table)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Rewritten in place into what this map holds (torch hands a module its own copy of
        # the state): tables unpacked, a frozen map's table taken from saved logits, what a
        # frozen map dropped left out. Checked before anything is copied.
        where = f"ActivationMap state at {prefix!r}"
        table_key, hits_key = prefix + "table", prefix + "hits"
        for name in ("table", "initial_table"):
            if (key := prefix + name) in state_dict:
                check_tensor(state_dict, key, where)
                state_dict[key] = _loaded_table(state_dict[key], where)
        if self.table is not None and table_key not in state_dict:
            _table_from_saved_logits(state_dict, prefix, where)
        for form, names in _LOGIT_PARAMETERS.items():
            if (
                self.table is None
                and form != self.logit_form
                and prefix + next(iter(names)) in state_dict
            ):
                raise ValueError(
                    f"{where}: the state holds a learnable map's logits of logit_form={form!r}, "
                    f"this map holds logit_form={self.logit_form!r} (build it with "
                    f"logit_form={form!r}, or map_logit_form={form!r} for a SpatialLayer)"
                )
        if self.hits is None:
            state_dict.pop(hits_key, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, pre: torch.Tensor, hash_input: torch.Tensor) -> torch.Tensor:
        if pre.shape[-1] != self.num_features:
            raise ValueError(
                f"ActivationMap: pre-activations must be [..., {self.num_features}], "
                f"got {tuple(pre.shape)}"
            )
        self._check_hash_input(hash_input)
        if pre.shape[:-1] != hash_input.shape[:-1]:
            raise ValueError(
                "ActivationMap: pre-activations and hash input need the same leading shape, "
                f"got {tuple(pre.shape)} and {tuple(hash_input.shape)}"
            )
        cells = self.cells(_rows(hash_input))
        if self.hits is not None:
            with torch.no_grad():
                torch.ops.spatium.count_hits_(self.hits, cells)  # every neuron sees the cell
        flat = _rows(pre)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        table = self._kernel_table()
        if self.table is not None or not self.training or not torch.is_grad_enabled():
            y = torch.ops.spatium.activation_map(flat, cells, table)
        else:
            logits = self.learnable_parameters().values()
            factored = self.logit_form == "factored"
            y = _StraightThroughMap.apply(flat, cells, table, factored, *logits)
        return (y if y.dtype == pre.dtype else y.to(pre.dtype)).reshape(pre.shape)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, hash_features={self.hash_features}, "
            f"init={self.init!r}, learnable={self.learnable}"
            + (f", logit_form={self.logit_form!r}" if self.learnable else "")
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[samples, features]`` (no call when it already is: the forward is hot)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def pack_nibbles(table: torch.Tensor) -> torch.Tensor:
    """``[neurons, 64]`` function indices (< 16) as ``[neurons, 32]`` uint8, cell 2i in the low
    half of byte i."""
    table = table.to(torch.uint8)
    return (table[:, 0::2] | (table[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _loaded_table(table: torch.Tensor, where: str) -> torch.Tensor:
    """A saved table (4 bits a cell, or one byte) as ``[neurons, 64]`` function indices;
    raises ValueError for an index past the functions. Shapes are left to torch's checks."""
    if table.dtype != torch.uint8:
        raise ValueError(f"{where}: table must be a uint8 tensor, got {table.dtype}")
    if table.dim() == 2 and table.shape[1] == CELLS // 2:
        table = unpack_nibbles(table)
    if table.numel() and int(table.max()) >= len(ACTIVATIONS):
        raise ValueError(
            f"{where}: table holds function {int(table.max())}; there are {len(ACTIVATIONS)}"
        )
    return table


def _follow_rows(rows: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if rows is None:
        return lambda t: t
    return lambda t: t[rows]


def _table_from_saved_logits(state_dict: dict[str, Any], prefix: str, where: str) -> None:
    """For a frozen map loading a learnable map's state: the saved logits (either form) replaced
    in ``state_dict`` by the table of their argmax functions."""
    names = [n for form in _LOGIT_PARAMETERS.values() for n in form] + ["initial_lead"]
    saved = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
    for name in saved:
        check_tensor(state_dict, prefix + name, where)
    if "logits" in saved:
        table = saved["logits"].detach().argmax(-1).to(torch.uint8)
    elif {"neuron_logits", "cell_logits", "initial_lead"} <= saved.keys() and (
        prefix + "initial_table" in state_dict
    ):
        table = reference.factored_map_argmax(
            saved["neuron_logits"].detach(),
            saved["cell_logits"].detach(),
            state_dict.pop(prefix + "initial_table"),
            saved["initial_lead"].detach(),
        )
    else:
        return
    for name in saved:
        del state_dict[prefix + name]
    state_dict[prefix + "table"] = table.contiguous()


def _cell_major(values: torch.Tensor) -> torch.Tensor:
    """The same ``[neurons, 64]`` or ``[neurons, 64, 12]`` values, stored cell-major (neurons
    last in memory): the layout the kernels read, and a learnable map's logits keep, so that
    their argmax and gradient need no transposition."""
    order = (1, 0) if values.dim() == 2 else (1, 2, 0)
    inverse = [order.index(d) for d in range(values.dim())]
    return values.permute(order).contiguous().permute(inverse)


def _initial_table(neurons: int, init: str, generator: torch.Generator) -> torch.Tensor:
    if init == "random":
        return torch.randint(0, len(ACTIVATIONS), (neurons, CELLS), generator=generator).to(
            torch.uint8
        )
    table = torch.full((neurons, GRID, GRID), ACTIVATIONS.index("relu"), dtype=torch.uint8)
    if init == "gradient":
        table.fill_(ACTIVATIONS.index(GRADIENT_EDGE))
        table[:, 2:6, 2:6] = ACTIVATIONS.index(GRADIENT_CENTRE)
    return table.reshape(neurons, CELLS)
