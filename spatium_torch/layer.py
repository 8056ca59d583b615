"""SpatialLayer: a drop-in for nn.Linear whose weights live in a spatial memory."""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spatium_torch import layouts, resize
from spatium_torch.activation import ActivationMap
from spatium_torch.memory import LayerMemory
from spatium_torch.neurons import (
    NeuronChange,
    Stage,
    check_non_negative,
    parameter_like,
)
from spatium_torch.ops import CODE_BITS, VALID_BITS
from spatium_torch.reference import format_of
from spatium_torch.snapshot import Snapshot
from spatium_torch.store import (
    STATE_LOCK,
    SpatialStore,
    StoreArrays,
    check_tensor,
    upgrade_first_format,
)
from spatium_torch.tracked import TrackedParameter, is_stale

# Weight of the newest batch in the activity EMA (about the last 20 training batches count).
ACTIVITY_EMA = 0.05
# Children of a "duplicate" split differ by this much noise (relative to the parent's RMS weight).
DEFAULT_PERTURBATION = 0.2
CONNECTIVITIES = ("local", "random")
CODEBOOKS = ("int", "odd", "nf4")
INFERENCE_PRECISIONS = ("int8", "fp32")
# Whether this CPU runs the int8 inference kernels (AVX-512 VNNI, or AVX2 with FMA and F16C).
INT8_KERNELS: bool = torch.classes.spatium.InferencePack.supported()
try:
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:  # a torch that moved it: is_in_onnx_export() alone
    _onnx_flags = None

# Growth statistics: float32 whatever the layer's dtype (.half() must not round them).
_STATISTICS = ("activity", "output_mean")
# What only growth and pruning read: dropped at freeze (a frozen layer cannot change shape).
_TRAINING_STATISTICS = (*_STATISTICS, "split_cooldown")
# The buffers in the state_dict besides the store (positions change as layers grow).
_POSITIONS = ("input_positions", "neuron_positions")
_SAVED_BUFFERS = (*_POSITIONS, *_TRAINING_STATISTICS)


class SpatialLayer(nn.Module):
    """A linear layer ``y = x W_q^T + b`` whose weights ``W_q`` are quantized (1/2/4/8-bit)
    and block-sparse, held in a spatial memory addressed by the Morton codes of the inputs'
    3D positions.

    Training keeps a latent fp32 ``weight`` ``[out, in]`` (as in quantization-aware training):
    the forward pass runs on the quantized store, gradients reach the latent weight straight
    through the quantizer (inside active blocks only), and after any in-place change of the
    latent weight (an optimizer step) the store re-quantizes before the next forward. After
    :func:`freeze` the store is the only copy.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample (number of neurons).
        bits: code width, one of 1, 2, 4, 8.
        codebook: what a code stands for: ``"int"`` (default), an integer times its block's
            scale; ``"odd"`` (``bits=2`` only), an odd integer -3, -1, 1 or 3 times the
            scale: four evenly spaced levels without a zero, which fit bell-shaped weights
            better than the integer codes -1..2 and train more accurate 2-bit models; or
            ``"nf4"`` (``bits=4`` only), one of the 16 NormalFloat levels, denser
            near 0, times the scale: lower error on bell-shaped and heavy-tailed weights
            (pretrained models), for a re-quantization about 3x as long and int8 inference
            kernels that read 8-bit codes (see :attr:`inference_precision`).
        region_bits: a region (block) spans ``2**region_bits`` positions of Morton order.
        density: fraction of each neuron's regions active at the start, in (0, 1].
        connectivity: which regions start active when ``density < 1``: ``"local"`` (nearest to
            the neuron's position, both spaces scaled to the unit cube) or ``"random"``.
        bias: whether to learn an additive bias.
        activation: ``None`` (linear) or ``"map"``: an :class:`ActivationMap` after the linear
            part, hashing the layer's input (``map_init``, ``map_learnable``,
            ``map_logit_form``, ``map_seed`` as in ActivationMap's ``init``, ``learnable``,
            ``logit_form``, ``seed``). Not yet fused with the matmul.
        input_positions: ``[in_features, 3]`` distinct integer positions in ``[0, 65535]``
            (default: input j at ``morton_decode(j)``); see :mod:`spatium_torch.layouts`.
        grid_dims: ``(X, Y, Z)`` grid the neurons fill in Morton order (default: neuron j at
            ``morton_decode(j)``).
        inference_precision: ``"int8"`` or ``"fp32"``: how an eval-mode forward that needs no
            gradient computes on a CPU with AVX-512 VNNI or AVX2 (see
            :attr:`inference_precision`).

    Inputs ``[..., in_features]`` of float32 or float64 (bf16/fp16 are computed in fp32 and
    returned in their dtype) give ``[..., out_features]``. NaN/Inf in the input propagate as in
    nn.Linear; a non-finite latent weight makes its whole block NaN.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        codebook: str = "int",
        region_bits: int = 6,
        density: float = 1.0,
        connectivity: str = "local",
        bias: bool = True,
        activation: str | None = None,
        input_positions: torch.Tensor | None = None,
        grid_dims: Sequence[int] | None = None,
        map_init: str = "uniform",
        map_learnable: bool = False,
        map_logit_form: str = "factored",
        map_seed: int = 0,
        growth_threshold: float = 0.9,
        prune_threshold: float = 0.01,
        max_split_fraction: float = 0.25,
        cooldown: int = 2,
        max_neurons: int | None = None,
        inference_precision: str = "int8",
    ) -> None:
        super().__init__()
        layouts.check_count(in_features, "in_features")
        layouts.check_count(out_features, "out_features")
        if isinstance(bits, bool) or bits not in VALID_BITS:
            raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
        if codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {codebook!r}")
        if codebook == "nf4" and bits != 4:
            raise ValueError(f"codebook='nf4' takes bits=4, got bits={bits}")
        if codebook == "odd" and bits != 2:
            raise ValueError(f"codebook='odd' takes bits=2, got bits={bits}")
        if isinstance(region_bits, bool) or not isinstance(region_bits, int):
            raise ValueError(f"region_bits must be an int in [0, {CODE_BITS}], got {region_bits!r}")
        if not 0 <= region_bits <= CODE_BITS:
            raise ValueError(f"region_bits must be in [0, {CODE_BITS}], got {region_bits}")
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if connectivity not in CONNECTIVITIES:
            raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
        if activation not in (None, "map"):
            raise ValueError(f"activation must be None or 'map', got {activation!r}")
        _check_growth_settings(growth_threshold, prune_threshold, max_split_fraction, cooldown)
        if max_neurons is not None:
            layouts.check_count(max_neurons, "max_neurons")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.codebook = codebook
        self.region_bits = region_bits
        self.density = float(density)
        self.connectivity = connectivity
        self.growth_threshold = float(growth_threshold)
        self.prune_threshold = float(prune_threshold)
        self.max_split_fraction = float(max_split_fraction)
        self.cooldown = cooldown
        self.max_neurons = max_neurons
        self.inference_precision = inference_precision
        # The store re-laid for the int8 kernels: (the arrays it was built from, the pack).
        self._pack: tuple[StoreArrays, torch.ScriptObject] | None = None
        self.grid_dims = None if grid_dims is None else tuple(grid_dims)
        # Whether forward() updates `activity` from this layer's own output. A growth controller
        # turns it off and measures after the elementwise modules that follow (e.g. a ReLU).
        self.track_activity = True
        # Memory growth scores inactive regions by the dense weight gradient: while this is set,
        # every backward pass adds its squares per block into _region_gradients (see rewire).
        self.collect_region_gradients = False
        self._region_gradients: torch.Tensor | None = None

        # The layout is computed on the host and the module placed where factory functions
        # put tensors now (a `with torch.device(...)` block, "meta" included).
        device = torch.empty(0).device
        with torch.device("cpu"):
            positions = layouts.checked_positions(input_positions, in_features)
            sorted_codes, order = layouts.morton_order(positions)
            neurons = layouts.neuron_grid(out_features, grid_dims)
            memory = torch.classes.spatium.SpatialMemory(
                out_features, sorted_codes, self.code_format, region_bits
            )
            memory.set_active(
                layouts.initial_mask(
                    memory.parts()["region_begin"],
                    sorted_codes,
                    neurons,
                    self.density,
                    connectivity,
                )
            )
            # The map hashes the layer's input to pick each sample's cell.
            activation_map = (
                ActivationMap(
                    out_features, in_features, init=map_init, learnable=map_learnable,
                    logit_form=map_logit_form, seed=map_seed,
                )
                if activation == "map"
                else None
            )  # fmt: skip
        # Saved in the state_dict: growth moves neurons and gives consumers new inputs.
        self.register_buffer("input_positions", positions.to(device))
        self.register_buffer("neuron_positions", neurons.to(device))
        self._set_input_order(sorted_codes, order)

        self.register_parameter(
            "weight", TrackedParameter(torch.empty(out_features, in_features, device=device))
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        # Growth statistics: an EMA of the share of training samples with a non-zero output,
        # an EMA of the mean output (folded into the consumer's bias on a prune), and the growth
        # events a neuron must wait before it may split again.
        self.register_buffer("activity", torch.ones(out_features, device=device))
        self.register_buffer("output_mean", torch.zeros(out_features, device=device))
        self.register_buffer(
            "split_cooldown", torch.zeros(out_features, dtype=torch.int64, device=device)
        )
        # The quantized weights: buffers, never Parameters.
        self.store = SpatialStore(memory, device)
        # The latent weight's stamp when the store was last quantized from it.
        self._synced: tuple | None = None
        # Loads so far: a forward that sees it move while it runs computes again.
        self._loads = 0
        self._sync()
        self.activation_map = None if activation_map is None else activation_map.to(device)
        # torch's TransformerEncoderLayer, in eval without gradients, skips its submodules'
        # forward and reads linear1/linear2's `weight` itself (its "fast path") unless one of
        # its modules has hooks: it would compute with the latent fp32 weight (or fail on a
        # frozen layer's None). A hook on the store, which is never called, keeps this layer's
        # forward in charge; one on the layer would put its every call on nn.Module's slower
        # path for hooks (2 us).
        self.store.register_forward_pre_hook(_never_runs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> SpatialLayer:
        """A SpatialLayer with ``linear``'s shape, weight and bias (the weight as its latent
        weight, quantized at the first forward), on ``linear``'s device and in its dtype, in
        its training mode, its Parameters requiring gradients as ``linear``'s do. ``options``
        are the constructor's keyword arguments (``bits``, ``region_bits``, ``density``, ...);
        ``bias`` follows ``linear``. Raises TypeError for anything but an nn.Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if "bias" in options:
            raise TypeError("from_linear: bias follows the nn.Linear; do not pass it")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError("from_linear: the nn.Linear is on the meta device (no weights)")
        with torch.device(weight.device):
            layer = cls(
                linear.in_features, linear.out_features, bias=linear.bias is not None, **options
            )
        with torch.no_grad():
            # Inactive blocks of a sparse layer hold zeros, as in a freshly built one.
            layer.weight.copy_(weight.float() * layer.block_mask().to(weight.device))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        layer.to(weight.dtype)
        layer.train(linear.training)
        layer.weight.requires_grad_(weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    # --- set-up -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in +-1/sqrt(in_features)."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            weight = self._parameters["weight"]
            if weight is not None:
                weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _region_of_sorted_input(self) -> torch.Tensor:
        return layouts.region_of(self.store.region_begin, self.in_features)

    def _set_input_order(self, sorted_codes: torch.Tensor, order: torch.Tensor | None) -> None:
        """The inputs' Morton codes and order (derived from input_positions, not saved)."""
        device = self.input_positions.device
        self.register_buffer("_sorted_codes", sorted_codes.to(device), persistent=False)
        self.register_buffer(
            "_order", None if order is None else order.to(device), persistent=False
        )

    # --- the store ----------------------------------------------------------------------------
    @property
    def code_format(self) -> int:
        """The store's code format, as the ops take it: the width for integer codes,
        ``reference.NF4_FORMAT`` for nf4."""
        return format_of(self.bits, self.codebook)

    @property
    def inference_precision(self) -> str:
        """How an eval-mode forward that needs no gradient (``torch.no_grad()``,
        ``torch.inference_mode()``, or nothing requiring grad) computes on a CPU with AVX-512
        VNNI or AVX2 (with FMA and F16C), for float32, bf16 and fp16 inputs:

        - ``"int8"`` (default): each row's activations are quantized to int8 per region (scale
          max|x| / 127) and multiplied with the codes in integer dot products (``vpdpbusd``;
          AMX tiles for batches of 8 rows or more where the CPU has AMX-INT8; ``vpmaddubsw``
          with AVX2, the same sums). The
          outputs' relative error against the float32 product (a batch's outputs together) is
          about 5e-3 for Gaussian activations, tested <= 1e-2; a single output's varies more.
          The layer keeps its store re-laid for these kernels next to it (about the store's
          bytes again), rebuilt when the store changes.
        - ``"fp32"``: the float32 product with the dequantized weights, as in training.

        nf4 codes enter the kernels as 8-bit integers, ``round(127 * level)``, which adds each
        level's rounding (at most 1/254 of the block's scale) to the activations'.

        Training-mode forwards, anything autograd records, float64 inputs, NaN/Inf inputs and
        CPUs without either instruction set always take the float path."""
        return self._inference_precision

    @inference_precision.setter
    def inference_precision(self, value: str) -> None:
        if value not in INFERENCE_PRECISIONS:
            raise ValueError(
                f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {value!r}"
            )
        self._inference_precision = value

    @property
    def frozen(self) -> bool:
        """Whether the latent weights were dropped (:func:`freeze`)."""
        return self._parameters["weight"] is None

    @property
    def weight(self) -> torch.Tensor:
        """The latent weight ``[out, in]`` (a Parameter) while the layer trains. Once frozen,
        the weight it computes with (:meth:`dequantized_weight`, in the bias's dtype), for code
        that inspects ``.weight``: built at each read, so writing to it changes nothing."""
        parameters = self.__dict__["_parameters"]
        if "weight" not in parameters:  # during construction: nn.Module's checks ask
            raise AttributeError("weight")
        latent = parameters["weight"]
        if latent is not None:
            return latent
        bias = parameters["bias"]
        return self.dequantized_weight().to(torch.float32 if bias is None else bias.dtype)

    @property
    def memory(self) -> LayerMemory:
        """The spatial memory: point API (contains/read/write) and stats."""
        return LayerMemory(self)

    def _sorted_latent(self) -> torch.Tensor | None:
        # _parameters/_buffers directly: nn.Module attribute lookup costs ~1 us a call.
        weight, order = self._parameters["weight"], self._buffers["_order"]
        if weight is None or order is None:
            return weight
        return weight.index_select(1, order)

    def _sync(self) -> None:
        """Re-quantizes the store when the latent weight may have changed since the last time
        (any write: optimizer steps, ``.data`` edits, loads, device or dtype moves)."""
        weight = self._parameters["weight"]
        if weight is None or not is_stale(weight, self._synced):
            return
        if weight.device.type == "meta":
            return  # no values to quantize
        self._requantize()
        # An eager call of the op does not move the arrays' version counters: moving them lets
        # autograd refuse a backward through codes that changed since its forward.
        torch.autograd.graph.increment_version([self.store.scales, self.store.codes])
        self._synced = weight.stamp() if isinstance(weight, TrackedParameter) else None

    def _requantize(self) -> None:
        """Quantizes the latent weight into the store's scales and codes."""
        region_begin, bitmap, block_begin, code_begin, scales, codes = self.store.arrays()
        with torch.no_grad():
            torch.ops.spatium.requantize_(
                self._sorted_latent().detach(), region_begin, bitmap, block_begin, code_begin,
                scales, codes, self.code_format,
            )  # fmt: skip

    def _install(self, memory: torch.ScriptObject) -> None:
        """Makes ``memory`` (a host store) the layer's store; a layer with latent weights
        re-quantizes from them before its next forward."""
        self.store.install(memory)
        self._synced = None

    def _write(self, neuron: int, code: int, value: float) -> None:
        self._sync()
        host = self.store.host()
        was_active = host.contains(neuron, code) if 0 <= neuron < self.out_features else True
        host.write(neuron, code, value)  # raises for a bad neuron or a non-input
        self._install(host)
        if self.frozen:
            return
        column = int(torch.searchsorted(self._sorted_codes.cpu(), torch.tensor(code)))
        with torch.no_grad():
            if not was_active:
                # A block that starts now holds only what is written into it.
                region = self._region_of_sorted_input()
                columns = torch.nonzero(region == region[column]).flatten()
                self.weight[neuron, self._user_columns(columns)] = 0.0
            self.weight[neuron, self._user_columns(torch.tensor([column]))] = value
        self._sync()

    def _user_columns(self, sorted_columns: torch.Tensor) -> torch.Tensor:
        return sorted_columns if self._order is None else self._order[sorted_columns]

    def dequantized_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` float32 weight the store holds (zeros outside active
        blocks), columns in the order of the inputs."""
        self._sync()
        dense = torch.ops.spatium.dequantize(
            *self.store.arrays(), self.code_format, self.in_features, self.out_features
        )
        return layouts.to_input_order(dense, self._order)

    def block_mask(self) -> torch.Tensor:
        """``[out, in]`` bool: True where the weight lies in an active block."""
        mask = torch.ops.spatium.active_mask(
            *self.store.arrays(), self.in_features, self.out_features
        )
        return layouts.to_input_order(mask, self._order)

    # --- growth statistics ----------------------------------------------------------------------
    def region_mask(self) -> torch.Tensor:
        """``[out, regions]`` bool: which blocks (neuron x region) are active."""
        return self.store.region_mask()

    def region_sizes(self) -> torch.Tensor:
        """``[regions]`` int64: how many of the layer's inputs each region holds."""
        return self.store.region_sizes()

    def saturation(self) -> torch.Tensor:
        """``[out]`` float32: the share of each neuron's fan-in its active blocks cover."""
        covered = self.region_mask().to(torch.float32) @ self.region_sizes().to(torch.float32)
        return covered / self.in_features

    def should_split(self, neuron: int) -> bool:
        """Whether the neuron's saturation exceeds ``growth_threshold``."""
        if not 0 <= neuron < self.out_features:
            raise IndexError(f"neuron {neuron} out of range [0, {self.out_features})")
        return bool(self.saturation()[neuron] > self.growth_threshold)

    @torch.no_grad()
    def update_activity(self, output: torch.Tensor) -> None:
        """Folds a batch of this layer's neuron outputs ``[..., out]`` into the ``activity`` and
        ``output_mean`` EMAs (forward calls it in training unless ``track_activity`` is off).
        A frozen layer keeps no statistics: nothing to do."""
        if self._buffers["activity"] is None:
            return
        torch.ops.spatium.track_activity_(
            output.detach().reshape(-1, self.out_features),
            self._buffers["activity"],
            self._buffers["output_mean"],
            ACTIVITY_EMA,
        )

    def prune_candidates(self, threshold: float | None = None) -> torch.Tensor:
        """``[out]`` bool: neurons whose saturation or activity is under ``threshold`` (default:
        ``prune_threshold``; a frozen layer has no activity: saturation alone)."""
        limit = self.prune_threshold if threshold is None else _fraction(threshold, "threshold")
        candidates = self.saturation() < limit
        activity = self._buffers["activity"]
        return candidates if activity is None else candidates | (activity < limit)

    # --- growth, pruning, rewiring ----------------------------------------------------
    def grow(
        self,
        mode: str = "duplicate",
        *,
        perturbation: float = DEFAULT_PERTURBATION,
        threshold: float | None = None,
        max_split_fraction: float | None = None,
        cooldown: int | None = None,
        max_neurons: int | None = None,
    ) -> NeuronChange:
        """Splits the neurons that :meth:`should_split` (one growth event).

        Most saturated first, at most ``max_split_fraction`` of the layer (at least one neuron),
        never past ``max_neurons``, and not a neuron split within the last ``cooldown`` events
        (the settings default to the layer's attributes; ``threshold`` to
        ``growth_threshold``). ``"duplicate"``: both children copy the parent's blocks and
        latent weights, plus and minus ``perturbation`` times the parent's weight RMS times
        Gaussian noise (0: exact copies). ``"fresh"``: the first child is its parent; the second
        starts as a new neuron in the parent's blocks (weights drawn as ``reset_parameters``
        draws them, bias 0, and 0 for its weights in the consumer, so the function is unchanged;
        the controller zeroes its optimizer state). ``"partition"``: the children take complementary
        halves of the parent's active blocks in Morton order (only neurons with at least two
        blocks split). The first child keeps the parent's position, the second takes the nearest
        free grid position; outputs stay in Morton order of positions.

        Only this layer changes: the returned :class:`NeuronChange` tells the consumer of its
        outputs how to follow (:class:`~spatium_torch.GrowthController` does that, and keeps the
        optimizer in step).
        """
        change, stage = self.plan_growth(
            mode, perturbation, threshold, max_split_fraction, cooldown, max_neurons
        )
        stage.commit()
        return change

    def prune(self, threshold: float | None = None) -> NeuronChange:
        """Removes the neurons whose saturation or activity is under ``threshold`` (default:
        ``prune_threshold``); the neuron with the most saturation always stays. Only this layer
        changes; the returned :class:`NeuronChange` holds each removed neuron's constant output
        for the consumer's bias."""
        change, stage = self.plan_prune(threshold)
        stage.commit()
        return change

    def rewire(
        self,
        *,
        max_changes: int | None = None,
        grow_ratio: float = 1.0,
        drop_ratio: float = 0.05,
    ) -> tuple[int, int]:
        """Memory growth (one event): per neuron, activates the inactive region whose weight
        gradient (RMS per input, summed over the backward passes since
        ``collect_region_gradients`` was set) beats ``grow_ratio`` times the median of its
        active blocks', and drops active blocks whose latent weight RMS is under ``drop_ratio``
        times the median of the neuron's blocks (a neuron keeps at least one). At most
        ``max_changes`` blocks change (default: one per neuron); strongest first. New blocks
        start at zero, so the layer's function is unchanged by activation. Returns
        ``(activated, dropped)`` and stops the gradient collection."""
        activated, dropped, stage = self.plan_rewire(max_changes, grow_ratio, drop_ratio)
        stage.commit()
        return activated, dropped

    def _check_resizable(self) -> None:
        if self.frozen:
            raise ValueError(
                "SpatialLayer: a frozen layer cannot grow, be pruned or rewired (it has no latent "
                "weights); resize before st.freeze"
            )

    def _columns_of(self, region_mask: torch.Tensor) -> torch.Tensor:
        """``[rows, in]`` bool in the inputs' order: which inputs the given blocks cover."""
        return layouts.to_input_order(region_mask[:, self._region_of_sorted_input()], self._order)

    def plan_growth(
        self,
        mode: str = "duplicate",
        perturbation: float = DEFAULT_PERTURBATION,
        threshold: float | None = None,
        max_split_fraction: float | None = None,
        cooldown: int | None = None,
        max_neurons: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[NeuronChange, Stage]:
        """:meth:`grow`, built aside: the change for the consumer, and the Stage that commits
        it to this layer (nothing changes until then). ``generator`` draws the perturbation
        (default: the global one)."""
        self._check_resizable()
        if mode not in resize.SPLIT_MODES:
            raise ValueError(f"mode must be one of {resize.SPLIT_MODES}, got {mode!r}")
        check_non_negative(perturbation, "perturbation")
        threshold = self.growth_threshold if threshold is None else threshold
        fraction = self.max_split_fraction if max_split_fraction is None else max_split_fraction
        cooldown = self.cooldown if cooldown is None else cooldown
        _check_growth_settings(threshold, self.prune_threshold, fraction, cooldown)
        max_neurons = self.max_neurons if max_neurons is None else max_neurons
        if max_neurons is not None:
            layouts.check_count(max_neurons, "max_neurons")
        self._sync()
        region_mask = self.region_mask()
        grid_cells = None if self.grid_dims is None else math.prod(self.grid_dims)
        budget = resize.split_budget(self.out_features, fraction, max_neurons, grid_cells)
        parents = resize.split_parents(
            self.saturation(), self.split_cooldown, region_mask, mode=mode,
            threshold=threshold, budget=budget,
        )  # fmt: skip
        # A growth event counts down every neuron's cooldown, whether or not anything splits.
        waiting = (self.split_cooldown - 1).clamp(min=0)
        if len(parents) == 0:
            # Nothing splits: the layer keeps its parameters (and their optimizer state).
            return NeuronChange.unchanged(self.neuron_positions), Stage(
                lambda: self._buffers.update(split_cooldown=waiting)
            )
        rows, moved, positions, is_child = resize.split_rows(
            self.neuron_positions, parents, self.grid_dims
        )
        change = NeuronChange(
            rows=rows,
            consumer_scale=_consumer_scale(mode, is_child, moved),
            moved=moved,
            positions=positions,
            split=len(parents),
            fresh=mode == "fresh",
        )
        new_mask = region_mask[rows]
        weight = self.weight.detach()[rows]
        bias = None
        if mode == "partition":
            new_mask = resize.partition_masks(new_mask, is_child, moved)
        elif mode == "fresh":
            columns = self._columns_of(new_mask[moved])
            bound = 1.0 / math.sqrt(self.in_features)  # reset_parameters' range
            resize.fresh_children(weight, moved, columns, bound, generator)
            if self._parameters["bias"] is not None:
                bias = self._parameters["bias"].detach()[rows].masked_fill(moved, 0.0)
        elif perturbation > 0:
            columns = self._columns_of(region_mask[parents])
            parent_weight = self.weight.detach()[parents]
            resize.perturb_children(
                weight, rows, moved, parents, parent_weight, columns, perturbation, generator
            )
        stage = self._stage_neurons(
            rows,
            positions=positions,
            region_mask=new_mask,
            weight=weight,
            bias=bias,
            cooldown=waiting[rows].masked_fill(is_child, cooldown),
        )
        return change, stage

    def plan_prune(self, threshold: float | None = None) -> tuple[NeuronChange, Stage]:
        """:meth:`prune`, built aside: the change for the consumer (with the removed neurons'
        constant outputs), and the Stage that commits it to this layer."""
        self._check_resizable()
        self._sync()
        saturation = self.saturation()
        rows, removed = resize.prune_rows(self.prune_candidates(threshold), saturation)
        exact = (saturation[removed] == 0) & (self.activation_map is None)
        bias = self._parameters["bias"]
        constant = bias.detach()[removed] if bias is not None else torch.zeros(len(removed))
        change = NeuronChange(
            rows=rows,
            consumer_scale=torch.ones(len(rows)),
            moved=torch.zeros(len(rows), dtype=torch.bool),
            positions=self.neuron_positions[rows],
            removed=removed,
            removed_output=torch.where(exact, constant, self.output_mean[removed]).float(),
            removed_exact=exact,
        )
        if len(removed) == 0:
            return change, Stage(lambda: None)
        return change, self._stage_neurons(rows)

    def plan_rewire(
        self, max_changes: int | None = None, grow_ratio: float = 1.0, drop_ratio: float = 0.05
    ) -> tuple[int, int, Stage]:
        """:meth:`rewire`, built aside: ``(activated, dropped, stage)``."""
        self._check_resizable()
        if max_changes is not None and (isinstance(max_changes, bool) or max_changes < 0):
            raise ValueError(f"max_changes must be a non-negative int, got {max_changes!r}")
        check_non_negative(grow_ratio, "grow_ratio")
        check_non_negative(drop_ratio, "drop_ratio")
        self._sync()
        mask = self.region_mask()
        sizes = self.region_sizes().to(torch.float32)
        latent = self._sorted_latent().detach().float()
        squares = resize.sum_per_region(latent.square(), self._region_of_sorted_input(), len(sizes))
        gradients = self._region_gradients
        activate, drop = resize.rewire_masks(
            mask,
            (squares / sizes).sqrt(),
            None if gradients is None else (gradients / sizes).sqrt(),
            grow_ratio=grow_ratio,
            drop_ratio=drop_ratio,
            budget=self.out_features if max_changes is None else max_changes,
        )
        stage = self._stage_regions((mask | activate) & ~drop)
        return int(activate.sum()), int(drop.sum()), stage

    def set_active_regions(self, region_mask: torch.Tensor) -> None:
        """Sets which blocks are active (``[out, regions]`` bool, see :meth:`region_mask`).
        Kept blocks keep their weights; a block that starts now holds zeros."""
        self._check_resizable()
        region_mask = torch.as_tensor(region_mask)
        expected = (self.out_features, self.store.num_regions)
        if region_mask.dtype != torch.bool or tuple(region_mask.shape) != expected:
            raise ValueError(
                f"region_mask must be a bool tensor of shape {list(expected)}, got "
                f"{region_mask.dtype} {list(region_mask.shape)}"
            )
        self._stage_regions(region_mask.cpu()).commit()

    def _stage_regions(self, region_mask: torch.Tensor) -> Stage:
        self._sync()
        memory = self.store.host().select_neurons(torch.arange(self.out_features))
        memory.set_active(region_mask.cpu())
        started = self._columns_of(region_mask & ~self.region_mask())

        def commit() -> None:
            self._install(memory)
            with torch.no_grad():
                # A block that starts now holds only what learning writes into it.
                self._parameters["weight"].masked_fill_(started, 0.0)
            self._region_gradients = None
            self.collect_region_gradients = False

        return Stage(commit)

    def _add_region_gradients(self, sorted_input: torch.Tensor, grad_output: torch.Tensor) -> None:
        """Adds the squared dense weight gradient of one backward pass, summed per block."""
        grad_weight = grad_output.detach().reshape(-1, self.out_features).t().float()
        grad_weight = grad_weight @ sorted_input.float()
        sums = resize.sum_per_region(
            grad_weight.square(), self._region_of_sorted_input(), self.store.num_regions
        )
        previous = self._region_gradients
        self._region_gradients = sums if previous is None else previous + sums

    def plan_inputs(
        self, columns: torch.Tensor, scale: torch.Tensor, positions: torch.Tensor
    ) -> Stage:
        """How a consumer follows a change of its producer's neurons, built aside: this layer
        with input i continuing input ``columns[i]`` (its weights times ``scale[i]``) at
        ``positions[i]``. A block is active where one of its inputs continues
        an input of an active block; the other inputs of a block that starts so hold zero."""
        self._check_resizable()
        positions = layouts.checked_positions(positions, len(columns))
        self._sync()
        inherited = self.block_mask()[:, columns]
        weight = self.weight.detach()[:, columns] * scale
        sorted_codes, order = layouts.morton_order(positions)
        memory = torch.classes.spatium.SpatialMemory(
            self.out_features, sorted_codes, self.code_format, self.region_bits
        )
        region = layouts.region_of(memory.parts()["region_begin"], len(columns))
        sorted_inherited = inherited if order is None else inherited[:, order]
        region_mask = (
            resize.sum_per_region(sorted_inherited.float(), region, memory.num_regions()) > 0
        )
        memory.set_active(region_mask)
        covered = layouts.to_input_order(region_mask[:, region], order)
        weight[covered & ~inherited] = 0.0
        old_weight = self._parameters["weight"]
        new_weight = parameter_like(old_weight, weight)
        new_map = None
        replaced = [(old_weight, new_weight, lambda t: t[:, columns])]
        if self.activation_map is not None:
            # The hash keeps its value: a duplicated input's projections are split like weights.
            new_map = copy.deepcopy(self.activation_map)
            new_map.projections = self.activation_map.projections[:, columns] * scale
            new_map.hash_features = len(columns)
            replaced.extend(self.activation_map.parameter_moves(new_map))

        def commit() -> None:
            self._install(memory)
            self.in_features = len(columns)
            self._parameters["weight"] = new_weight
            self._buffers["input_positions"] = positions.to(self.input_positions.device)
            self._set_input_order(sorted_codes, order)
            if new_map is not None:
                self.activation_map = new_map
            self._region_gradients = None

        return Stage(commit, replaced)

    def _select_neurons(self, rows: torch.Tensor) -> None:
        """Makes neuron i the current neuron rows[i] (a row twice: a copy; left out: removed):
        memory, latent weight, bias, activation map and statistics follow, atomically. The
        caller keeps optimizers and consumers in step."""
        rows = torch.as_tensor(rows)
        if rows.dim() != 1 or rows.numel() == 0 or rows.is_floating_point():
            raise ValueError(
                f"rows must be a non-empty 1-D integer tensor, got {tuple(rows.shape)}"
            )
        rows = rows.to("cpu", torch.int64)
        if (rows < 0).any() or (rows >= self.out_features).any():
            raise IndexError(f"rows must lie in [0, {self.out_features})")
        self._stage_neurons(rows).commit()

    def _stage_neurons(
        self,
        rows: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cooldown: torch.Tensor | None = None,
    ) -> Stage:
        """Builds this layer with neuron i continuing neuron rows[i]: memory, latent weight
        and bias (``weight``, ``bias`` when given), activation map, statistics and positions
        follow; ``region_mask`` sets the new neurons' active blocks."""
        self._sync()
        memory = self.store.host().select_neurons(rows.cpu())
        if region_mask is not None:
            memory.set_active(region_mask.cpu())
        old_weight, old_bias = self._parameters["weight"], self._parameters["bias"]
        if weight is None and old_weight is not None:
            weight = old_weight.detach()[rows]
        new_weight = None if weight is None else parameter_like(old_weight, weight.clone())
        new_bias = None
        if old_bias is not None:
            bias = old_bias.detach()[rows] if bias is None else bias
            new_bias = parameter_like(old_bias, bias.clone())
        new_map = None if self.activation_map is None else self.activation_map.select_neurons(rows)
        buffers = {
            "neuron_positions": self.neuron_positions[rows] if positions is None else positions,
            "activity": self.activity[rows],
            "output_mean": self.output_mean[rows],
            "split_cooldown": self.split_cooldown[rows] if cooldown is None else cooldown,
        }

        def commit() -> None:
            self._install(memory)
            self.out_features = int(rows.numel())
            self._parameters["weight"] = new_weight
            self._parameters["bias"] = new_bias
            self._buffers.update(buffers)
            if new_map is not None:
                self.activation_map = new_map
            self._region_gradients = None

        stage = Stage(commit)
        by_rows = lambda t: t[rows]  # noqa: E731  (state follows like the parameter)
        for old, new in ((old_weight, new_weight), (old_bias, new_bias)):
            if old is not None:
                stage.replaced.append((old, new, by_rows))
        if new_map is not None:
            stage.replaced.extend(self.activation_map.parameter_moves(new_map, rows))
        return stage

    def freeze(self, keep_hits: bool = False) -> None:
        """Drops the latent weight (the store becomes the only copy) and the growth statistics
        (``activity``, ``output_mean``, ``split_cooldown``), and freezes the activation map
        (:meth:`ActivationMap.freeze`; ``keep_hits`` keeps its hit counts)."""
        if self.activation_map is not None:
            self.activation_map.freeze(keep_hits)
        if self.frozen:
            return
        self._sync()
        del self.weight
        self.register_parameter("weight", None)
        for name in _TRAINING_STATISTICS:
            self._buffers[name] = None
        self.store.frozen = True

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting_to_onnx():
            raise NotImplementedError(
                "SpatialLayer: the quantized store is read by a custom op "
                "(spatium::spatial_linear) that has no ONNX form: export st.portable(model), the "
                "same weights in standard ops, or call st.export_onnx(model, args, f), which does"
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SpatialLayer: expected a tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(
                f"SpatialLayer: expected input of shape [..., {self.in_features}], got a scalar"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SpatialLayer: expected input of shape [..., {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"SpatialLayer: expected a floating-point input, got {x.dtype}")
        store = self._modules["store"]
        if torch.compiler.is_compiling():
            # In a compiled graph the store follows the latent weight on every call: the
            # check that spares eager calls a re-quantize would guard on Python state.
            if self._parameters["weight"] is not None:
                self._requantize()
            arrays, loads = store.arrays(), None
        else:
            with STATE_LOCK:  # a load swaps the store and the state it pairs with under it
                self._sync()
                arrays, loads = store.arrays(), self._loads
        if x.device != arrays.codes.device:
            raise ValueError(
                f"SpatialLayer: input is on {x.device}, the layer on {arrays.codes.device}; "
                "move one of them (layer.to(device))"
            )
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32 and flat.dtype != torch.float64:
            flat = flat.float()  # bf16/fp16: computed in fp32
        y, sorted_input = self._linear(flat, arrays)
        if loads is not None and self._loads != loads:
            # A load ran meanwhile and copied its bias in place, maybe while this read it:
            # compute again, keeping loads off.
            with STATE_LOCK:
                self._sync()
                y, sorted_input = self._linear(flat, store.arrays())
        if self.collect_region_gradients and y.requires_grad:
            y.register_hook(functools.partial(self._add_region_gradients, sorted_input.detach()))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        if self.activation_map is not None:
            y = self.activation_map(y, x)
        if self.training and self.track_activity:
            self.update_activity(y)
        return y

    def _linear(self, flat: torch.Tensor, arrays: StoreArrays) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat W_q^T + b, flat in Morton order)`` for a ``[batch, in]`` input, on the
        store's ``arrays``."""
        order = self._buffers["_order"]
        if order is not None:
            flat = flat.index_select(1, order)
        if self._takes_int8_path(flat):
            bias = self._parameters["bias"]
            if bias is not None and bias.dtype != torch.float32:
                bias = bias.float()  # the kernels add fp32 (a bf16 layer)
            y = self._inference_pack(arrays).linear(flat, bias)
            if y is not None:  # None: NaN or Inf in the input, which the float path handles
                return y, flat
        y = torch.ops.spatium.spatial_linear(
            flat,
            self._sorted_latent(),
            self._parameters["bias"],
            *arrays,
            self.code_format,
            self.out_features,
        )
        return y, flat

    def _takes_int8_path(self, flat: torch.Tensor) -> bool:
        """Whether this forward runs on the int8 kernels (see :attr:`inference_precision`)."""
        if self._inference_precision != "int8" or self.training or not INT8_KERNELS:
            return False
        if flat.dtype != torch.float32 or not flat.is_cpu:
            return False
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False  # graphs keep the registered op
        if torch.is_grad_enabled():
            weight, bias = self._parameters["weight"], self._parameters["bias"]
            if flat.requires_grad or any(p is not None and p.requires_grad for p in (weight, bias)):
                return False
        return True

    def inference_bytes(self) -> int:
        """Bytes of the store re-laid for the int8 kernels (what an int8 forward reads), held
        next to the store since the last int8 forward; 0 before one."""
        return 0 if self._pack is None else int(self._pack[1].nbytes())

    def _inference_pack(self, arrays: StoreArrays) -> torch.ScriptObject:
        """The store re-laid for the int8 kernels, for the store's arrays. The pack keeps the
        arrays it was built from and builds again itself when one of them is written."""
        cached = self._pack
        if cached is None or any(map(operator.is_not, cached[0], arrays)):
            pack = torch.classes.spatium.InferencePack(
                *arrays, self.code_format, self.in_features, self.out_features
            )
            cached = self._pack = (arrays, pack)
        return cached[1]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            + (f"codebook={self.codebook!r}, " if self.codebook != "int" else "")
            + f"region_bits={self.region_bits}, density={self.density}, "
            + f"bias={self.bias is not None}"
            + (", frozen" if self.frozen else "")
        )

    def __prepare_scriptable__(self) -> SpatialLayer:
        # torch.jit.script calls this on every submodule before compiling it.
        raise NotImplementedError(
            "SpatialLayer cannot be compiled by torch.jit.script (its forward is Python around "
            "custom ops); use torch.jit.trace, torch.compile or torch.export"
        )

    # --- copying, moving and state_dict ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_pack": None}  # a cache; copies and pickles rebuild it

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("codebook", "int")  # pickled before codebooks existed
        super().__setstate__(state)
        self._synced = None  # a copy's latent weight is a new tensor: quantize it again
        self._loads = 0

    def _apply(self, fn: Any, recurse: bool = True) -> SpatialLayer:
        # .half()/.bfloat16()/.double() cast the latent weight and bias; the statistics stay
        # float32 (the store's arrays are integers and never change).
        # A store in step with the latent weight stays as it is: the cast rounds the latent
        # weight, but the codes keep what they hold until the weight really changes.
        statistics = {name: self._buffers[name] for name in _STATISTICS}
        weight = self._parameters["weight"]
        in_step = weight is not None and not is_stale(weight, self._synced)
        super()._apply(fn, recurse)
        for name, before in statistics.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        weight = self._parameters["weight"]
        if in_step and isinstance(weight, TrackedParameter):
            self._synced = weight.stamp()
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._sync()  # the saved codes are the quantization of the saved latent weight
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Default positions are left out: a load that finds none takes the defaults.
        for name, default in self._default_positions().items():
            held = self._buffers[name]
            if held.device.type != "meta" and torch.equal(held.cpu(), default):
                del destination[prefix + name]

    def _default_positions(self) -> dict[str, torch.Tensor]:
        """The positions this layer's configuration gives its inputs and neurons (host)."""
        return {
            "input_positions": layouts.default(self.in_features),
            "neuron_positions": layouts.neuron_grid(self.out_features, self.grid_dims),
        }

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Checks this layer's entries of ``state_dict`` (keys ``prefix + name``) as a load does
        before it changes anything, changing neither the layer nor ``state_dict``. Raises
        ValueError naming the problem (TypeError for an entry that is not a tensor)."""
        self._checked_state(dict(state_dict), prefix)  # checked in a copy it may rewrite

    def _checked_state(
        self, state_dict: dict[str, Any], prefix: str
    ) -> tuple[torch.Tensor, torch.ScriptObject | None]:
        """Every check of a load: returns the input positions the state holds and the host
        memory of its store (None when it has no store entries). Rewrites the state in place
        into what this layer loads: a state of the first format upgraded, the default positions
        a packed store leaves out filled in, the growth statistics of older frozen states
        dropped."""
        where = f"SpatialLayer state at {prefix!r}"
        if prefix + "_extra_state" in state_dict:
            upgrade_first_format(state_dict, prefix, where)
        store_prefix = prefix + "store."
        if store_prefix + "packed" in state_dict:
            for name, default in self._default_positions().items():
                state_dict.setdefault(prefix + name, default)
        if self.frozen:
            for name in _TRAINING_STATISTICS:
                state_dict.pop(prefix + name, None)
        saved = [(n, t) for n, t in self._parameters.items() if t is not None]
        saved += [(n, self._buffers[n]) for n in _SAVED_BUFFERS if self._buffers[n] is not None]
        for name, tensor in saved:
            key = prefix + name
            if key not in state_dict:
                continue
            check_tensor(state_dict, key, where)
            if state_dict[key].shape != tensor.shape:
                raise ValueError(
                    f"{where}: {name} has shape {tuple(state_dict[key].shape)}, this layer "
                    f"{tuple(tensor.shape)}"
                )
        positions = state_dict.get(prefix + "input_positions", self.input_positions)
        positions = _checked_positions(positions, self.in_features, "input_positions", None, where)
        if prefix + "neuron_positions" in state_dict:
            # Growth places new neurons among these: refused now rather than at the next grow.
            neurons = state_dict[prefix + "neuron_positions"]
            _checked_positions(
                neurons, self.out_features, "neuron_positions", self.grid_dims, where
            )
        if not any(key.startswith(store_prefix) for key in state_dict):
            if not torch.equal(positions, self.input_positions.cpu()):
                raise ValueError(f"{where}: new input_positions need the store too")
            return positions, None
        frozen = bool(self.store.saved_header(state_dict, store_prefix)["frozen"])
        if frozen != self.frozen:
            kind = "frozen" if frozen else "with latent weights"
            mine = "frozen" if self.frozen else "not"
            raise ValueError(
                f"{where}: saved {kind}, this layer is {mine}; call st.freeze(model) "
                "first to load a frozen state"
            )
        sorted_codes = layouts.morton_order(positions)[0]
        memory = self.store.check_state(state_dict, store_prefix, sorted_codes)
        layout = torch.classes.spatium.SpatialMemory(
            1, sorted_codes, self.code_format, self.region_bits
        )
        if not torch.equal(memory.parts()["input_codes"], layout.parts()["input_codes"]):
            raise ValueError(f"{where}: the store's input positions differ from the layer's")
        return positions, memory

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
        # Everything is checked before anything is copied: a bad state leaves the layer as it
        # was. Then the store, latent weight, bias and stamp change together under the lock a
        # forward takes its references under.
        positions, memory = self._checked_state(state_dict, prefix)
        sorted_codes, order = layouts.morton_order(positions)
        install = memory is not None and self.store.device.type != "meta"
        with STATE_LOCK:
            self._loads += 1  # before the in-place copies: a forward running now computes again
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs,
            )  # fmt: skip
            if install:
                self.store.install(memory)
            self._set_input_order(sorted_codes, order)
            self._synced = None


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
) -> tuple[list[str], list[str]]:
    """``nn.Module.load_state_dict(model, state_dict, strict, assign)``, all or nothing.

    ``model.load_state_dict`` loads module by module: each SpatialLayer checks its own entries
    before it changes anything, but a refusal further on (a damaged layer after it, or torch's
    own errors, which come after every module has loaded) leaves the modules before it loaded.
    This first checks every SpatialLayer's entries (:meth:`SpatialLayer.check_state_dict`),
    then keeps what the model holds (:class:`~spatium_torch.snapshot.Snapshot`: its Parameter,
    buffer and submodule objects, module attributes and a copy of every value) and puts it back
    if the load raises: torch's missing or unexpected keys under ``strict``, a size mismatch in
    any module, a refused SpatialLayer. The copy takes memory for the model's state a second
    time while the load runs. Returns torch's ``(missing_keys, unexpected_keys)``.
    :class:`~spatium_torch.SpatialNetwork` loads this way.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be dict-like, got {type(state_dict).__name__}")
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SpatialLayer):
            module.check_state_dict(state_dict, f"{name}." if name else "")
    snapshot = Snapshot([model], values=True)
    try:
        return nn.Module.load_state_dict(model, state_dict, strict=strict, assign=assign)
    except BaseException:
        snapshot.restore()
        raise


def freeze(model: nn.Module, *, keep_hits: bool = False) -> nn.Module:
    """Makes every SpatialLayer in ``model`` an inference layer (:meth:`SpatialLayer.freeze`):
    each store becomes the only copy of its weights, growth statistics are dropped, activation
    maps keep their argmax functions (and their hit counts if ``keep_hits``). Forward and the
    backward to the input still work. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, SpatialLayer):
            module.freeze(keep_hits)
    return model


def _checked_positions(
    positions: Any, count: int, name: str, grid_dims: Sequence[int] | None, where: str
) -> torch.Tensor:
    """A saved state's positions, checked (:func:`layouts.checked_positions`); raises
    ValueError saying where."""
    try:
        return layouts.checked_positions(positions, count, name, grid_dims)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def _never_runs(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook on a module that is never called (see SpatialLayer.__init__)."""


def _consumer_scale(mode: str, is_child: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """The factor on the consumer's weights for each neuron after a split: halves for both
    children of a duplicate (the sum is the parent's), 0 for a fresh child (it starts silent),
    1 otherwise."""
    if mode == "duplicate":
        return torch.where(is_child, 0.5, 1.0)
    if mode == "fresh":
        return torch.where(moved, 0.0, 1.0)
    return torch.ones(len(is_child))


def _fraction(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _exporting_to_onnx() -> bool:
    """Whether an ONNX export is tracing the model. The dynamo exporter's strict capture folds
    ``torch.onnx.is_in_onnx_export()`` to False, so its own (private) flag is read as well.
    The TorchScript exporter runs the model under ``torch.jit`` tracing: only then is its
    ``is_in_onnx_export()`` asked, which takes longer than the rest of an int8 forward's
    checks together (2.4 us)."""
    if _onnx_flags is not None and getattr(_onnx_flags, "_is_onnx_exporting", False):
        return True
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def _check_growth_settings(
    growth_threshold: float, prune_threshold: float, max_split_fraction: float, cooldown: int
) -> None:
    _fraction(growth_threshold, "growth_threshold")
    _fraction(prune_threshold, "prune_threshold")
    if not (isinstance(max_split_fraction, (int, float)) and 0.0 < max_split_fraction <= 1.0):
        raise ValueError(f"max_split_fraction must be in (0, 1], got {max_split_fraction!r}")
    if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
        raise ValueError(f"cooldown must be a non-negative int, got {cooldown!r}")
