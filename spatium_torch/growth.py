"""GrowthController: growth, pruning and memory growth between optimizer steps.

The controller pairs every SpatialLayer with the module that consumes its outputs and, when a
layer's width changes, resizes that consumer, the norms in between and the optimizer's state
with the same index maps. Every change is built aside and installed at the end, all or nothing,
so an error leaves model and optimizer as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spatium_torch import layouts
from spatium_torch.activation import ActivationMap
from spatium_torch.convert import weight_readers
from spatium_torch.history import GrowthEvent, TrainingHistory
from spatium_torch.layer import DEFAULT_PERTURBATION, SpatialLayer, load_state_dict
from spatium_torch.neurons import (
    NeuronChange,
    Stage,
    check_non_negative,
    commit_all,
    parameter_like,
    place_children,
)
from spatium_torch.plateau import Plateau, Progress
from spatium_torch.resize import SPLIT_MODES
from spatium_torch.snapshot import Snapshot
from spatium_torch.store import read_header

# Modules that act on each feature alone: a consumer may sit behind them.
ELEMENTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Threshold,
    nn.Dropout,
    nn.AlphaDropout,
)
# Per-feature modules resized with the layer before them.
NORMS = (nn.LayerNorm, nn.BatchNorm1d)
CONSUMERS = (SpatialLayer, nn.Linear)
# The loss criteria grow_when takes, by name.
LOSS_CRITERIA: dict[str, type[Plateau] | type[Progress]] = {
    "plateau": Plateau,
    "progress": Progress,
}


def _criterion_kind(grow_when: str | Plateau | Progress) -> str | None:
    """The name of a loss criterion; None for growth on saturation."""
    for name, kind in LOSS_CRITERIA.items():
        if isinstance(grow_when, kind):
            return name
    return None


@dataclass
class Link:
    """A SpatialLayer, the modules between it and its consumer, and the consumer (None for the
    model's last layer, whose outputs are the model's)."""

    name: str
    layer: SpatialLayer
    tail: list[tuple[str, nn.Module]] = field(default_factory=list)
    consumer: tuple[str, nn.Module] | None = None


def link_layers(model: nn.Module) -> list[Link]:
    """Pairs each SpatialLayer of ``model`` (module order) with its consumer: the next
    SpatialLayer or nn.Linear, across elementwise modules, activation maps and
    LayerNorm/BatchNorm1d. Raises ValueError naming any other module in between, and any module
    used at more than one place (its calls could not be told apart)."""
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    readers = weight_readers(model)
    links: list[Link] = []
    for name, module in _leaves(model):
        reader = readers.get(name)
        pending = links[-1] if links and links[-1].consumer is None else None
        if reader is not None and isinstance(module, SpatialLayer):
            raise ValueError(
                f"GrowthController: SpatialLayer {name!r} sits inside a "
                f"{type(reader).__name__}, which reads its weights directly rather than calling "
                "it: its width cannot change (keep nn.Linear there)"
            )
        if reader is not None and pending is not None and isinstance(module, CONSUMERS):
            raise ValueError(
                f"GrowthController: the module after SpatialLayer {pending.name!r} is {name!r}, "
                f"inside a {type(reader).__name__} that reads its weights directly: it cannot "
                "follow a resize (does the layer's output join a residual stream?)"
            )
        if pending is not None and isinstance(module, CONSUMERS):
            for between in pending.tail:
                _check_between(pending, *between)
                if len(places[id(between[1])]) > 1:
                    raise ValueError(
                        f"GrowthController: {' and '.join(places[id(between[1])])} are the same "
                        f"{type(between[1]).__name__}; give each place its own module"
                    )
            _check_consumer(pending, name, module)
            pending.consumer = (name, module)
        elif pending is not None:
            pending.tail.append((name, module))
        if isinstance(module, SpatialLayer):
            links.append(Link(name, module))
    if links and links[-1].consumer is None:
        links[-1].tail = []  # the model's outputs: nothing after the last layer is resized
    return links


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (SpatialLayer, ActivationMap)) or not any(child.children()):
            yield qualified, child
        else:
            yield from _leaves(child, qualified)


def _check_between(link: Link, name: str, module: nn.Module) -> None:
    width = link.layer.out_features
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return
    if isinstance(module, ELEMENTWISE):
        return
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (width,):
        return
    if isinstance(module, nn.BatchNorm1d) and module.num_features == width:
        return
    if isinstance(module, ActivationMap) and module.num_features == width:
        return
    raise ValueError(
        f"GrowthController: cannot resize {name!r} ({type(module).__name__}) between "
        f"SpatialLayer {link.name!r} and the module that consumes its outputs; only elementwise "
        "modules, activation maps, LayerNorm and BatchNorm1d over its features may sit there"
    )


def _check_consumer(link: Link, name: str, module: nn.Module) -> None:
    if module.in_features != link.layer.out_features:
        raise ValueError(
            f"GrowthController: {name!r} takes {module.in_features} inputs but SpatialLayer "
            f"{link.name!r} before it gives {link.layer.out_features}; the model's module order "
            "must follow its data flow"
        )
    if isinstance(module, SpatialLayer) and module.frozen:
        raise ValueError(f"GrowthController: SpatialLayer {name!r} is frozen and cannot resize")


class GrowthController:
    """Runs growth, pruning and memory growth between optimizer steps (an optimizer step
    post-hook), so the training loop keeps only ``loss.backward(); opt.step();
    opt.zero_grad()``.

    Every ``grow_every`` steps each SpatialLayer that has a consumer splits its saturated
    neurons (:meth:`SpatialLayer.grow`); every ``prune_every`` steps it drops idle ones
    (:meth:`SpatialLayer.prune`); every ``rewire_every`` steps every SpatialLayer rewires its
    blocks (:meth:`SpatialLayer.rewire`), scored by the dense weight gradient of the step
    before. The consumer (the next SpatialLayer or nn.Linear), LayerNorm/BatchNorm1d and
    activation maps in between, and the optimizer's parameters and per-parameter state follow.
    The last layer never changes width. Settings left None use each layer's own.

    Activity (for pruning) is measured where the consumer sees a neuron: after the elementwise
    modules that follow the layer (e.g. its ReLU).

    Layers inside (or feeding) an ``nn.MultiheadAttention`` are refused at construction: it
    reads its projections' weights directly. A residual add does not show in the module order,
    so before the first growth or prune :meth:`check_resizes` runs the model once with each
    layer resized (a dry run, undone) and refuses a layer whose resize breaks the forward.

    Args:
        model: the model; its module order must follow its data flow.
        optimizer: the optimizer over ``model``'s parameters.
        grow_every, prune_every, rewire_every: period in optimizer steps (None: never).
        growth_threshold, prune_threshold, max_neurons, max_split_fraction, cooldown: override
            the layers' settings.
        mode: ``"fresh"`` (the default), ``"duplicate"`` or ``"partition"`` (see
            :meth:`SpatialLayer.grow`). Fresh children start as new neurons in their parents'
            blocks, with zero weight in the consumer and zeroed optimizer state; on MNIST-1D
            and digits they ended 4.2 and 0.2 points above duplicated children, at about
            half the bytes on MNIST-1D (README, "Growth").
        perturbation: noise between ``"duplicate"`` children.
        grow_ratio, drop_ratio: memory growth's thresholds (see :meth:`SpatialLayer.rewire`).
        closure: optional callable returning the loss on fixed data; it is evaluated (without
            gradients) before and after every event for the log.
        history_every: record widths, saturation and the last loss every this many steps.
        example_input: an input of the model (a tensor, or a tuple of its arguments): when
            given, :meth:`check_resizes` runs on it now, so a model whose layers cannot change
            width is refused here. Otherwise the check runs on the last training input at the
            first optimizer step (when growing or pruning) or before the first event.
        grow_when: what decides a scheduled growth check (every ``grow_every`` steps).
            ``"saturated"``: split the neurons over ``growth_threshold``, whatever the loss
            does. A loss criterion, ``"plateau"`` or a :class:`Plateau`, ``"progress"`` or a
            :class:`Progress`: ask it with the loss (``closure``'s if given, else the mean of
            the losses given to :meth:`record_loss` since the last check); when it says grow,
            split up to ``max_split_fraction`` of each layer (any neuron with blocks). A
            Plateau grows when learning has stalled at this width and stops for good once a
            growth did not lower the loss; a Progress grows while the loss keeps improving and
            stops for good once it does not. ``"auto"`` (the default): a ``Progress()`` at every
            check that has a loss (a closure, or losses given to :meth:`record_loss` since the
            last check), saturation at a check that has none (with a warning once a layer's
            every neuron is saturated). On MNIST-1D and digits Progress stopped best on the
            training losses given to :meth:`record_loss` with pruning beside it (a 32-32 start
            ended at 877-1361 and 52-57 first-layer neurons, never at the cap), or on a held-out
            error closure without pruning; README "Growth".
        seed: seeds the split perturbations (event by event), so that runs and ranks draw the
            same; None: the global generator, or under torch.distributed a seed rank 0 draws
            and shares.

    Under torch.distributed (DistributedDataParallel), every rank makes the same change at the
    same step: activity and output means (pruning) and the collected gradients (rewiring) are
    averaged over the ranks before each decision, and perturbations come from the shared seed.
    A resize replaces Parameters that DDP holds: after each step, ``ddp =
    controller.rewrap(ddp)`` gives a new wrapper after an event (the same one otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grow_every: int | None = None,
        prune_every: int | None = None,
        rewire_every: int | None = None,
        growth_threshold: float | None = None,
        prune_threshold: float | None = None,
        max_neurons: int | None = None,
        max_split_fraction: float | None = None,
        cooldown: int | None = None,
        mode: str = "fresh",
        perturbation: float = DEFAULT_PERTURBATION,
        grow_ratio: float = 1.0,
        drop_ratio: float = 0.05,
        closure: Callable[[], torch.Tensor | float] | None = None,
        history_every: int = 10,
        example_input: torch.Tensor | tuple | None = None,
        seed: int | None = None,
        grow_when: str | Plateau | Progress = "auto",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        for name, value in (
            ("grow_every", grow_every),
            ("prune_every", prune_every),
            ("rewire_every", rewire_every),
            ("history_every", history_every),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if mode not in SPLIT_MODES:
            raise ValueError(f"mode must be one of {SPLIT_MODES}, got {mode!r}")
        for name, value in (
            ("perturbation", perturbation),
            ("grow_ratio", grow_ratio),
            ("drop_ratio", drop_ratio),
        ):
            check_non_negative(value, name)
        self.links = link_layers(model)
        if not self.links:
            raise ValueError("GrowthController: the model has no SpatialLayer")
        for link in self.links:
            if link.layer.frozen:
                raise ValueError(
                    f"GrowthController: SpatialLayer {link.name!r} is frozen and cannot resize"
                )
        self.model = model
        self.optimizer = optimizer
        self.grow_every, self.prune_every, self.rewire_every = grow_every, prune_every, rewire_every
        self.growth_threshold = growth_threshold
        self.prune_threshold = prune_threshold
        self.max_neurons = max_neurons
        self.max_split_fraction = max_split_fraction
        self.cooldown = cooldown
        self.mode = mode
        self.perturbation = perturbation
        self.grow_ratio, self.drop_ratio = grow_ratio, drop_ratio
        self.closure = closure
        self.history_every = history_every
        self.history = TrainingHistory()
        self.distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )
        if seed is None and self.distributed:
            shared = [int(torch.randint(0, 2**62, ())) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            seed = shared[0]
        self.seed = seed
        if isinstance(grow_when, str) and grow_when in LOSS_CRITERIA:
            grow_when = LOSS_CRITERIA[grow_when]()
        if _criterion_kind(grow_when) is None and grow_when not in ("auto", "saturated"):
            raise ValueError(
                "grow_when must be 'auto', 'saturated', 'plateau', 'progress', a Plateau or a "
                f"Progress, got {grow_when!r}"
            )
        self.grow_when = grow_when
        # The loss criterion growth checks ask: grow_when's own, or under "auto" a Progress
        # (asked at the checks that have a loss); None: growth on saturation only.
        self.criterion: Plateau | Progress | None = (
            Progress() if grow_when == "auto" else None if grow_when == "saturated" else grow_when
        )
        self._decided_by_loss = False  # whether the last growth check asked the criterion
        self._loss_sum, self._loss_count = 0.0, 0
        self._changed_since_wrap = False
        self.steps = 0
        self.last_loss: float | None = None
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self._input_handle = model.register_forward_pre_hook(self._record_input, with_kwargs=True)
        self._last_input: tuple[tuple, dict] | None = None
        self._resizes_checked = False
        self._warned_saturated: set[str] = set()
        for link in self.links:
            self._measure_activity(link)
        if grow_every is not None:
            for link in self.links:
                if link.consumer is not None:
                    self._warn_if_growth_ignores_learning(link)
        if example_input is not None:
            example = example_input if isinstance(example_input, tuple) else (example_input,)
            self.check_resizes(*example)
        if rewire_every == 1:
            self._collect_gradients(True)

    @property
    def events(self) -> list[GrowthEvent]:
        """The event log."""
        return self.history.events

    def _signal(self) -> str:
        """grow_when by name: "auto", "saturated", "plateau" or "progress"."""
        return (
            self.grow_when if isinstance(self.grow_when, str) else _criterion_kind(self.grow_when)
        )

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Gives the controller the last training loss: for the history and the log, and,
        under ``grow_when="auto"`` or a loss criterion without a closure, the mean of those
        since the last growth check is the loss the check decides from."""
        self.last_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self._loss_sum += self.last_loss
        self._loss_count += 1

    def remove(self) -> None:
        """Detaches the controller from the optimizer and the model."""
        self._handle.remove()
        self._input_handle.remove()
        for link in self.links:
            link.layer.track_activity = True
            link.layer.collect_region_gradients = False
            for _, module in link.tail:
                hooks = module._forward_hooks
                for key in [k for k, h in hooks.items() if isinstance(h, _ActivityProbe)]:
                    del hooks[key]

    # Copies (copy.deepcopy, pickling a SpatialNetwork) hook the copied optimizer again; the
    # activity probes and the input recorder travel with the copied modules.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_handle"]
        state["_last_input"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handle = self.optimizer.register_step_post_hook(self._after_step)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped: the optimizer steps taken
        (the schedule counts them), the losses recorded since the last check, the loss criterion's
        state, the seed, the history and the layers' activity as this controller measured it
        (a new controller starts measuring over). Plain values and tensors only, so it can sit
        in a checkpoint read with ``torch.load(weights_only=True)``. The layers' own state
        (widths, weights, cooldowns) is in the model's state_dict: load that first
        (:func:`load_grown`), then build the optimizer and the controller, then load their
        states."""
        return {
            "steps": self.steps,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "last_loss": self.last_loss,
            "resizes_checked": self._resizes_checked,
            "seed": self.seed,
            "plateau": None
            if self.criterion is None
            else {"kind": self._signal(), **asdict(self.criterion)},
            "history": self.history.state_dict(),
            # Measured through this controller's probes; a new controller starts them over.
            "activity": {link.name: link.layer.activity.clone() for link in self.links},
            "output_mean": {link.name: link.layer.output_mean.clone() for link in self.links},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a :meth:`state_dict`: build the controller as before on the resumed
        model and optimizer, then load. All or nothing: a state that does not fit (missing
        keys, a loss criterion's state where this controller grows on saturation or the other way
        round) raises ValueError and changes nothing."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"GrowthController.load_state_dict: the state lacks {missing}")
        saved_plateau = state["plateau"]
        saved_kind = "saturated" if saved_plateau is None else saved_plateau.get("kind", "plateau")
        if saved_kind != self._signal():
            raise ValueError(
                "GrowthController.load_state_dict: the state was saved by a controller with "
                f"grow_when={saved_kind!r}, this one has grow_when={self._signal()!r}"
            )
        widths = {link.name: (link.layer.out_features,) for link in self.links}
        for key in ("activity", "output_mean"):
            saved = {name: tuple(t.shape) for name, t in state[key].items()}
            if saved != widths:
                raise ValueError(
                    f"GrowthController.load_state_dict: {key} of widths {saved} does not fit "
                    f"the layers, {widths}: load the model's state first (st.load_grown)"
                )
        criterion = None
        if saved_plateau is not None:
            fields = {key: value for key, value in saved_plateau.items() if key != "kind"}
            criterion = type(self.criterion)(**fields)
        history = TrainingHistory.from_state_dict(state["history"])
        with torch.no_grad():
            for link in self.links:
                link.layer.activity.copy_(state["activity"][link.name])
                link.layer.output_mean.copy_(state["output_mean"][link.name])
        self.steps = int(state["steps"])
        self._loss_sum, self._loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.last_loss = state["last_loss"]
        self._resizes_checked = bool(state["resizes_checked"])
        self.seed = state["seed"]
        if criterion is not None:
            self.criterion = criterion
            if self.grow_when != "auto":
                self.grow_when = criterion
        self.history = history
        # Gradients for the next rewire are collected over the step before it.
        if self.rewire_every and (self.steps + 1) % self.rewire_every == 0:
            self._collect_gradients(True)

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._last_input = (args, kwargs)

    def check_resizes(self, *args: Any, **kwargs: Any) -> None:
        """Checks that the model still runs when each layer that may grow or be pruned changes
        width: resizes each by one neuron, runs the model on ``args``/``kwargs`` (by default
        the last input it was called with) in eval mode without gradients, and puts everything
        back. Raises ValueError naming the first layer whose resize breaks the forward: its
        outputs reach something other than its consumer, such as a residual add.

        It runs by itself before the first growth or pruning event, on the last training
        input; call it on an example input right after construction to hear of a problem
        before training starts."""
        if not args and not kwargs:
            if self._last_input is None:
                raise ValueError(
                    "GrowthController.check_resizes: the model has not run since the "
                    "controller was built; pass an example input"
                )
            args, kwargs = self._last_input
        for link in self.links:
            if link.consumer is not None:
                self._try_resize(link, args, kwargs)
        self._resizes_checked = True

    def _try_resize(self, link: Link, args: tuple, kwargs: dict) -> None:
        width = link.layer.out_features
        # The snapshot puts back the modules' attributes too: their training modes.
        snapshot = Snapshot([self.model], values=True)
        try:
            _resize_link(link, width - 1 if width > 1 else width + 1)
            self.model.eval()
            with torch.no_grad():
                self.model(*args, **kwargs)
        except Exception as error:
            raise ValueError(
                f"GrowthController: the model no longer runs when SpatialLayer {link.name!r} "
                f"changes width ({type(error).__name__}: {error}); its outputs must reach "
                f"{link.consumer[0]!r} only through the modules between them, never a residual "
                "add or another module"
            ) from error
        finally:
            snapshot.restore()

    # --- events ---------------------------------------------------------------------------------
    def grow(self) -> list[GrowthEvent]:
        """One growth event on every layer with a consumer, now."""
        return self._event("grow", self._grow_link)

    def prune(self, threshold: float | None = None) -> list[GrowthEvent]:
        """One pruning event on every layer with a consumer, now."""
        limit = self.prune_threshold if threshold is None else threshold
        return self._event("prune", lambda link: self._prune_link(link, limit))

    def rewire(self) -> list[GrowthEvent]:
        """One memory-growth event on every layer, now (blocks are activated only where the
        dense gradient was collected: see ``rewire_every``)."""
        return self._event("rewire", self._rewire_link)

    def _warn_if_growth_ignores_learning(self, link: Link) -> None:
        """Warns when this link's growth setting cannot do what it says: partition splits of
        neurons with one block, or every neuron saturated from the start."""
        layer = link.layer
        if self.mode == "partition" and layer.store.num_regions == 1:
            warnings.warn(
                f"GrowthController: SpatialLayer {link.name!r} has one block per neuron "
                f"({layer.in_features} inputs, region_bits {layer.region_bits}), and a "
                "partition split needs two: it will never grow. Use a smaller region_bits or "
                "mode='fresh'",
                stacklevel=3,
            )
        if self.grow_when == "saturated":
            self._warn_if_all_saturated(link, stacklevel=4)

    def _warn_if_all_saturated(self, link: Link, stacklevel: int) -> None:
        """Warns, once per layer, when growth on saturation has become unconditional for it:
        every neuron saturated, at construction (a dense layer) or later (a sparse layer whose
        memory growth filled its fan-in). Under ``grow_when="auto"``, at the first check that
        had no loss to decide from."""
        if link.name in self._warned_saturated:
            return
        layer = link.layer
        threshold = (
            layer.growth_threshold if self.growth_threshold is None else self.growth_threshold
        )
        if not bool((layer.saturation() > threshold).all()):
            return
        self._warned_saturated.add(link.name)
        when = "is" if self.steps == 0 else f"has become, at step {self.steps},"
        no_loss = (
            "grow_when='auto' had no loss to decide from (no closure, nothing given to "
            "record_loss since the last check), so it grows on saturation, and "
            if self.grow_when == "auto"
            else ""
        )
        warnings.warn(
            f"GrowthController: {no_loss}every neuron of SpatialLayer {link.name!r} {when} "
            "saturated "
            f"(saturation > growth_threshold {threshold}): each growth event will split "
            "max_split_fraction of it until max_neurons, whatever the loss does. Saturation "
            "is the share of the fan-in a neuron's blocks cover, always 1 at density 1 and "
            "reached by a sparse layer once memory growth fills its fan-in; use a sparser "
            "layer, a higher growth_threshold, a lower max_neurons, or a loss criterion: "
            "grow_when='progress' on the training losses given to record_loss (with pruning) "
            "or on a held-out error closure (without)",
            stacklevel=stacklevel,
        )

    def _average_over_ranks(self, *tensors: torch.Tensor | None) -> None:
        """Under torch.distributed, replaces each tensor by its mean over the ranks, in place."""
        if not self.distributed:
            return
        for tensor in tensors:
            if tensor is not None:
                dist.all_reduce(tensor)
                tensor.div_(dist.get_world_size())

    def rewrap(self, ddp: DistributedDataParallel) -> DistributedDataParallel:
        """``ddp`` itself when no event changed the model since the last call, else a new
        DistributedDataParallel over ``ddp.module`` with ``ddp``'s settings (the old one's
        gradient hooks removed). Call it on every rank after each optimizer step: every rank
        has the same events, so every rank builds its new wrapper at the same step."""
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"rewrap takes a DistributedDataParallel, got {type(ddp).__name__}")
        if not self._changed_since_wrap:
            return ddp
        self._changed_since_wrap = False
        # The old reducer's hooks sit on the Parameters the resize kept: they must not fire for
        # a wrapper that no longer runs.
        ddp._remove_autograd_hooks()
        settings = dict(
            device_ids=ddp.device_ids,
            output_device=ddp.output_device,
            dim=ddp.dim,
            process_group=ddp.process_group,
            bucket_cap_mb=ddp.bucket_bytes_cap / 2**20,
            find_unused_parameters=ddp.find_unused_parameters,
            gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            static_graph=ddp.static_graph,
        )
        # Newer torch renamed broadcast_buffers to forward_sync_buffers.
        if hasattr(ddp, "forward_sync_buffers"):
            settings["forward_sync_buffers"] = ddp.forward_sync_buffers
        else:
            settings["broadcast_buffers"] = ddp.broadcast_buffers
        return DistributedDataParallel(ddp.module, **settings)

    def _growth_allowed(self) -> bool:
        """Whether a scheduled growth check grows: the loss criterion's answer when it decides
        (always under a criterion; under ``"auto"`` when the check has a loss), else yes, and
        the saturated neurons split. Records which of the two decided."""
        self._decided_by_loss = False
        if self.criterion is None:
            return True
        if self.closure is not None:
            loss = self._loss()
        elif self._loss_count:
            loss = self._loss_sum / self._loss_count  # the mean since the last check
        elif self.grow_when == "auto":
            return True
        else:
            raise ValueError(
                f"GrowthController: grow_when={_criterion_kind(self.grow_when)!r} decides from "
                "the loss: pass closure= (a held-out loss or error, best) or call "
                "controller.record_loss(loss) every step; or "
                "set grow_when='saturated' to split saturated neurons on schedule"
            )
        self._loss_sum, self._loss_count = 0.0, 0
        self._decided_by_loss = True
        return self.criterion.should_grow(loss)

    def _check_once(self) -> None:
        if not self._resizes_checked and self._last_input is not None:
            self.check_resizes()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.grow_every or self.prune_every:
            self._check_once()  # at the first step, not at the first event steps later
        self.steps += 1
        step = self.steps
        if self.rewire_every and step % self.rewire_every == 0:
            self.rewire()
        if self.grow_every and step % self.grow_every == 0 and self._growth_allowed():
            self._event("grow", lambda link: self._grow_link(link, scheduled=True))
        if self.prune_every and step % self.prune_every == 0:
            self.prune()
        if self.rewire_every and (step + 1) % self.rewire_every == 0:
            self._collect_gradients(True)
        if step % self.history_every == 0:
            self.history.record(step, self.model, self.last_loss)

    def _event(
        self, kind: str, run: Callable[[Link], tuple[NeuronChange | None, int]]
    ) -> list[GrowthEvent]:
        if kind != "rewire":
            self._check_once()
        events = []
        for link in self.links:
            if kind != "rewire" and link.consumer is None:
                continue
            before = self._loss()
            change, rewired = run(link)
            if rewired == 0 and (change is None or not change.changed):
                continue
            widths = tuple(lk.layer.out_features for lk in self.links)
            after = self._loss() if self.closure is not None else None
            split = 0 if change is None else change.split
            pruned = 0 if change is None else change.pruned
            event = GrowthEvent(
                self.steps, link.name, kind, split, pruned, rewired, widths, before, after, change
            )
            self.history.events.append(event)
            events.append(event)
            self._changed_since_wrap = True
        return events

    def _loss(self) -> float | None:
        if self.closure is None:
            return self.last_loss
        # In eval mode: measuring the loss must not move running statistics or activity.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                return float(self.closure())
        finally:
            for module, training in modes:
                module.training = training

    def _grow_link(self, link: Link, scheduled: bool = False) -> tuple[NeuronChange, int]:
        generator = None
        if self.seed is not None:  # one stream per event and layer
            draw = self.seed + 1_000_003 * self.steps + self.links.index(link)
            generator = torch.Generator().manual_seed(draw % 2**63)
        # A loss criterion decided that the model grows: any neuron with blocks may split.
        by_loss = scheduled and self._decided_by_loss
        if scheduled and not by_loss:
            self._warn_if_all_saturated(link, stacklevel=1)
        change, stage = link.layer.plan_growth(
            self.mode,
            self.perturbation,
            0.0 if by_loss else self.growth_threshold,
            self.max_split_fraction,
            self.cooldown,
            self.max_neurons,
            generator,
        )
        self._apply(link, change, stage)
        return change, 0

    def _prune_link(self, link: Link, threshold: float | None) -> tuple[NeuronChange, int]:
        self._average_over_ranks(link.layer.activity, link.layer.output_mean)
        change, stage = link.layer.plan_prune(threshold)
        self._apply(link, change, stage)
        return change, 0

    def _rewire_link(self, link: Link) -> tuple[None, int]:
        self._average_over_ranks(link.layer._region_gradients)
        rewired = link.layer.rewire(grow_ratio=self.grow_ratio, drop_ratio=self.drop_ratio)
        return None, sum(rewired)

    def _apply(self, link: Link, change: NeuronChange, layer_stage: Stage) -> None:
        """Builds every stage of the resize, then commits them all or none."""
        stages = [layer_stage]
        if change.changed:
            stages += [_stage_tail_module(module, change) for _, module in link.tail]
            stages.append(_stage_consumer(link, change, self._folded_outputs(link, change)))
            replaced = [entry for stage in stages for entry in stage.replaced]
            if change.fresh:
                replaced = _fresh_state(replaced, change, link.consumer[1].weight)
            stages.append(_stage_optimizer(self.optimizer, replaced))
        changed = [link.layer, *(module for _, module in link.tail), link.consumer[1]]
        commit_all(stages, changed, self.optimizer)

    def _folded_outputs(self, link: Link, change: NeuronChange) -> torch.Tensor:
        """The removed neurons' constant outputs as the consumer sees them: an exact constant
        goes through the modules in between (in eval mode); the others are the mean output
        measured there."""
        values = change.removed_output.clone()
        exact = change.removed_exact
        if not exact.any():
            return values
        if any(isinstance(module, ActivationMap) for _, module in link.tail):
            return link.layer.output_mean[change.removed].float()
        # In the layer's dtype, as the tail expects (the statistics themselves are float32).
        vector = link.layer.output_mean.to(link.layer.weight.dtype, copy=True)
        vector[change.removed] = change.removed_output.to(vector.dtype)
        vector = vector.unsqueeze(0)
        with torch.no_grad():
            for _, module in link.tail:
                was_training = module.training
                module.eval()
                try:
                    vector = module(vector)
                finally:
                    module.train(was_training)
        values[exact] = vector[0, change.removed[exact]].to(values.dtype)
        return values

    def _measure_activity(self, link: Link) -> None:
        measured = [m for _, m in link.tail if not isinstance(m, (nn.Dropout, nn.AlphaDropout))]
        if not measured:
            return
        layer = link.layer
        layer.track_activity = False
        with torch.no_grad():
            # What was measured before the elementwise modules does not describe the outputs
            # the consumer sees: start over (no evidence of idleness yet).
            layer.activity.fill_(1.0)
            layer.output_mean.zero_()
        measured[-1].register_forward_hook(_ActivityProbe(layer))

    def _collect_gradients(self, on: bool) -> None:
        for link in self.links:
            link.layer.collect_region_gradients = on


class _ActivityProbe:
    """Forward hook on the last elementwise module after a layer: updates the layer's activity
    from the outputs its consumer sees (a class, not a closure, so models can be copied and
    pickled with it)."""

    def __init__(self, layer: SpatialLayer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.layer.training and output.shape[-1] == self.layer.out_features:
            self.layer.update_activity(output)


def _stage_tail_module(module: nn.Module, change: NeuronChange) -> Stage:
    rows = change.rows
    if isinstance(module, ActivationMap):
        new_map = module.select_neurons(rows)

        def adopt() -> None:
            # In place: the module keeps its identity (and hooks) in the model.
            module._parameters.update(new_map._parameters)
            module._buffers.update(new_map._buffers)
            module.num_features = new_map.num_features
            module._argmax_key = None

        stage = Stage(adopt)
        stage.replaced.extend(module.parameter_moves(new_map, rows))
        return stage
    if not isinstance(module, NORMS):
        return Stage(lambda: None)
    params = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
    new_params = {n: parameter_like(p, p.detach()[rows].clone()) for n, p in params.items()}
    buffers = {
        n: b[rows].clone()
        for n, b in module.named_buffers(recurse=False)
        if b is not None and b.dim() == 1
    }
    width = int(rows.numel())

    def commit() -> None:
        module._parameters.update(new_params)
        module._buffers.update(buffers)
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (width,)
        else:
            module.num_features = width

    replaced = [(params[n], new_params[n], lambda t: t[rows]) for n in params]
    return Stage(commit, replaced)


def _stage_consumer(link: Link, change: NeuronChange, folded: torch.Tensor) -> Stage:
    _, consumer = link.consumer
    rows, scale = change.rows, change.consumer_scale
    if isinstance(consumer, SpatialLayer):
        positions = _consumer_positions(consumer, link.layer, change)
        stage = consumer.plan_inputs(rows, scale, positions)
    else:
        new_weight = parameter_like(consumer.weight, consumer.weight.detach()[:, rows] * scale)

        def resize() -> None:
            consumer._parameters["weight"] = new_weight
            consumer.in_features = int(rows.numel())

        stage = Stage(resize, [(consumer.weight, new_weight, lambda t: t[:, rows])])
    bias = consumer.bias
    if bias is None or change.pruned == 0:
        return stage
    # The weights the forward pass uses: a SpatialLayer's quantized ones.
    if isinstance(consumer, SpatialLayer):
        weight = consumer.dequantized_weight()
    else:
        weight = consumer.weight.detach()
    shift = weight[:, change.removed].double() @ folded.double()
    # A new bias Parameter (its optimizer state follows as is), so the commit writes nothing in
    # place and a failed event can put the old one back.
    new_bias = parameter_like(bias, bias.detach() + shift.to(bias.dtype))
    resize_inputs = stage.commit

    def commit() -> None:
        resize_inputs()
        consumer._parameters["bias"] = new_bias

    return Stage(commit, [*stage.replaced, (bias, new_bias, lambda t: t)])


def _consumer_positions(
    consumer: SpatialLayer, producer: SpatialLayer, change: NeuronChange
) -> torch.Tensor:
    """The consumer's input positions after the change: the producer's neuron positions when
    the two coincide (the default layouts), else the old input positions with each moved input
    at the free position nearest its parent's."""
    if torch.equal(consumer.input_positions, producer.neuron_positions):
        return change.positions
    positions = consumer.input_positions[change.rows].clone()
    moved = torch.nonzero(change.moved).flatten()
    positions[moved] = place_children(positions, moved, None)
    return positions


def _fresh_state(
    replaced: list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]],
    change: NeuronChange,
    consumer_weight: nn.Parameter,
) -> list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
    """The replaced Parameters with the fresh children's optimizer state zeroed: their rows of
    the layer's and the norms' Parameters, their columns of the consumer's weight. A fresh
    child that took its parent's momentum would move as its parent did."""
    children = torch.nonzero(change.moved).flatten()
    width = len(change.rows)

    def zeroed(follow: Callable, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: follow(t).index_fill(dim, children.to(t.device), 0.0)

    entries = []
    for old, new, follow in replaced:
        if old is consumer_weight:
            follow = zeroed(follow, 1)
        elif new.dim() and new.shape[0] == width and new.shape != old.shape:
            follow = zeroed(follow, 0)
        entries.append((old, new, follow))
    return entries


def _stage_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]],
) -> Stage:
    """Swaps each replaced Parameter in its param group; its state (momentum, moments) follows
    with the same index map; scalars such as the step count are kept."""
    where = {
        id(p): (g, i)
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
    }
    swaps = []
    for old, new, follow in replaced:
        if id(old) not in where:
            continue
        state = optimizer.state.get(old)
        new_state = None
        if state is not None:
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != old.shape:
                    raise ValueError(
                        f"GrowthController: optimizer state {key!r} has shape "
                        f"{tuple(value.shape)}, not its parameter's {tuple(old.shape)}; "
                        f"{type(optimizer).__name__} state cannot follow a resize"
                    )
            new_state = {
                key: follow(value).clone()
                if isinstance(value, torch.Tensor) and value.shape == old.shape
                else value
                for key, value in state.items()
            }
        swaps.append((where[id(old)], old, new, new_state))

    def commit() -> None:
        for (g, i), old, new, new_state in swaps:
            optimizer.param_groups[g]["params"][i] = new
            optimizer.state.pop(old, None)
            if new_state is not None:
                optimizer.state[new] = new_state

    return Stage(commit)


# --- grown checkpoints ----------------------------------------------------------------------------
def saved_widths(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, int]:
    """The width (out_features) each SpatialLayer of ``model`` has in ``state_dict``, by module
    name, for the layers whose width there differs from the model's. Reads the stores' headers
    (or the latent weight of a state without a store); changes nothing."""
    differing = {}
    for name, module, header in _saved_layers(model, state_dict):
        prefix = f"{name}." if name else ""
        if header is not None:
            width = header["out_features"]
        elif isinstance(state_dict.get(prefix + "weight"), torch.Tensor):
            width = state_dict[prefix + "weight"].shape[0]
        else:
            continue
        if width != module.out_features:
            differing[name] = int(width)
    return differing


def match_widths(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Resizes ``model``'s SpatialLayers to the widths saved in ``state_dict``, so that a
    checkpoint of a grown or pruned model loads into a freshly built one (``load_state_dict``
    right after; :func:`load_grown` does both). The consumer of each resized layer and the
    norms and activation maps in between follow, as in a growth event. The resized layers'
    values are placeholders (copies of existing neurons) until the load overwrites them.

    Call it before building the optimizer, or build it again after: resized Parameters are
    new objects. With Lightning, call it from ``on_load_checkpoint(checkpoint)`` with
    ``checkpoint["state_dict"]``: both ``load_from_checkpoint`` and resuming ``fit`` call that
    hook before they load the weights and before optimizers are built.

    All or nothing: on error the model is left as it was. Raises ValueError when a width
    cannot be matched (the model's last SpatialLayer, whose outputs are the model's; a frozen
    layer; a model whose layers :class:`GrowthController` could not resize). Returns
    ``{name: (old width, saved width)}`` for the layers it resized.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be dict-like, got {type(state_dict).__name__}")
    widths = saved_widths(model, state_dict)
    if not widths:
        return {}
    links = {link.name: link for link in link_layers(model)}
    snapshot = Snapshot([model])
    resized = {}
    try:
        for name, link in links.items():  # in module order: a consumer's inputs come first
            if name not in widths:
                continue
            if link.consumer is None:
                raise ValueError(
                    f"match_widths: SpatialLayer {name!r} has {widths[name]} outputs in the "
                    f"state but {link.layer.out_features} here, and it is the model's last "
                    "layer (growth never resizes it): the state is of another model"
                )
            resized[name] = (link.layer.out_features, widths[name])
            _resize_link(link, widths[name])
    except BaseException:
        snapshot.restore()
        raise
    return resized


def _resize_link(link: Link, width: int) -> None:
    """Resizes ``link``'s layer to ``width`` neurons (the first ones kept, the others copies of
    them) and its tail and consumer with it."""
    layer = link.layer
    layer._check_resizable()
    layouts.check_count(width, "saved width")
    rows = torch.arange(width) % layer.out_features
    moved = torch.arange(width) >= layer.out_features
    positions = layouts.neuron_grid(width, layer.grid_dims)
    change = NeuronChange(rows, torch.ones(width), moved, positions)
    stages = [layer._stage_neurons(rows, positions=positions)]
    stages += [_stage_tail_module(module, change) for _, module in link.tail]
    stages.append(_stage_consumer(link, change, torch.zeros(0)))
    commit_all(stages, [layer, *(module for _, module in link.tail), link.consumer[1]])


def load_grown(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Loads a checkpoint of a grown (or pruned) model into a freshly built one: resizes the
    layers to the saved widths (:func:`match_widths`), freezes the layers saved frozen
    (:meth:`SpatialLayer.freeze`), then loads all or nothing
    (:func:`~spatium_torch.load_state_dict`). On error the model is left as it was. Returns
    torch's ``(missing_keys, unexpected_keys)``."""
    snapshot = Snapshot([model], values=True)
    try:
        match_widths(model, state_dict)
        for _, module, header in _saved_layers(model, state_dict):
            if header is not None and header["frozen"] and not module.frozen:
                module.freeze()
        return load_state_dict(model, state_dict, strict=strict)
    except BaseException:
        snapshot.restore()
        raise


def _saved_layers(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> Iterator[tuple[str, SpatialLayer, dict[str, int] | None]]:
    """Each SpatialLayer of ``model`` with the header of its store in ``state_dict`` (None when
    the state holds no store for it)."""
    for name, module in model.named_modules():
        if isinstance(module, SpatialLayer):
            prefix = f"{name}.store." if name else "store."
            held = any(key.startswith(prefix) for key in state_dict)
            yield name, module, read_header(state_dict, prefix) if held else None
