"""What happened during training: growth events and per-step records (for logs and plots)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from spatium_torch.neurons import NeuronChange
from spatium_torch.stats import network_stats

EVENT_KINDS = ("grow", "prune", "rewire")


@dataclass(frozen=True)
class GrowthEvent:
    """One growth, pruning or rewiring event of one layer.

    Attributes:
        step: optimizer steps taken when the event ran (it ran right after that step).
        layer: the layer's qualified name in the model.
        kind: ``"grow"``, ``"prune"`` or ``"rewire"``.
        split: neurons split (each gave two children).
        pruned: neurons removed.
        rewired: blocks activated plus blocks dropped.
        widths: every SpatialLayer's ``out_features`` after the event, in module order.
        loss_before: the loss before the event (the closure's, or the last recorded), if known.
        loss_after: the loss right after the event (only with a closure).
        change: for "grow" and "prune", the layer's :class:`NeuronChange` (its index maps).
    """

    step: int
    layer: str
    kind: str
    split: int
    pruned: int
    rewired: int
    widths: tuple[int, ...]
    loss_before: float | None = None
    loss_after: float | None = None
    change: NeuronChange | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class HistoryRecord:
    """The network after one optimizer step: loss (when recorded), width and average saturation
    of every SpatialLayer in module order."""

    step: int
    loss: float | None
    widths: tuple[int, ...]
    saturation: tuple[float, ...]


@dataclass
class TrainingHistory:
    """Per-step records and growth events of one training run (``GrowthController.history``).

    Attributes:
        layer_names: the SpatialLayers' qualified names, in module order.
        records: one :class:`HistoryRecord` per recorded step.
        events: the :class:`GrowthEvent` log.
    """

    layer_names: tuple[str, ...] = ()
    records: list[HistoryRecord] = field(default_factory=list)
    events: list[GrowthEvent] = field(default_factory=list)

    def record(self, step: int, model: nn.Module, loss: float | None = None) -> HistoryRecord:
        """Appends the state of ``model``'s SpatialLayers after ``step``."""
        stats = network_stats(model)
        self.layer_names = tuple(s.name for s in stats.layer_stats)
        entry = HistoryRecord(
            step=step,
            loss=loss,
            widths=tuple(s.neuron_count for s in stats.layer_stats),
            saturation=tuple(s.average_saturation for s in stats.layer_stats),
        )
        self.records.append(entry)
        return entry

    def state_dict(self) -> dict[str, Any]:
        """The history as plain values (``torch.load(weights_only=True)`` reads them). Events
        are saved without their ``change`` (index maps that only mattered at the event)."""
        return {
            "layer_names": list(self.layer_names),
            "records": [asdict(record) for record in self.records],
            "events": [
                {f.name: getattr(event, f.name) for f in fields(event) if f.name != "change"}
                for event in self.events
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainingHistory:
        """The history :meth:`state_dict` saved."""
        return cls(
            layer_names=tuple(state["layer_names"]),
            records=[
                HistoryRecord(
                    step=r["step"],
                    loss=r["loss"],
                    widths=tuple(r["widths"]),
                    saturation=tuple(r["saturation"]),
                )
                for r in state["records"]
            ],
            events=[GrowthEvent(**{**e, "widths": tuple(e["widths"])}) for e in state["events"]],
        )
