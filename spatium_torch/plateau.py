"""When to grow, from the loss: on a plateau (:class:`Plateau`) or while it improves
(:class:`Progress`), and a stop once growing stops paying."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _check_finite(loss: float, criterion: str) -> None:
    if not math.isfinite(loss):
        raise ValueError(f"{criterion}: the loss is {loss}; growth decisions need a finite loss")


@dataclass
class Plateau:
    """Decides at each scheduled growth check whether the model should grow, from the loss.

    It grows only once learning has stalled at the current width: the loss has not improved on
    its best by more than ``tolerance`` (relative) for ``patience`` checks in a row. And it
    stops for good when a growth did not pay: when, at the plateau after a growth, the best loss
    is not ``min_gain`` (relative) below the best loss at the plateau before it. The width a
    model ends at is thus the one where more width stopped lowering the loss.

    Give it the loss that says whether width helps: a held-out loss (the controller's
    ``closure``) measures that; the training loss keeps falling with width on data a model can
    memorise, so with it growth stops later, or at ``max_neurons``.
    """

    patience: int = 2
    tolerance: float = 0.01
    min_gain: float = 0.01
    best: float = math.inf
    stalled: int = 0
    best_at_growth: float | None = None
    stopped: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ValueError(f"patience must be a positive int, got {self.patience!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be a positive int, got {self.patience!r}")
        for name in ("tolerance", "min_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    def should_grow(self, loss: float) -> bool:
        """Takes the loss measured at this check; True when the model should grow now."""
        _check_finite(loss, "Plateau")
        if self.stopped:
            return False
        if loss < self.best - self.tolerance * abs(self.best) or math.isinf(self.best):
            self.best, self.stalled = loss, 0  # still learning at this width
            return False
        self.stalled += 1
        if self.stalled < self.patience:
            return False
        self.stalled = 0
        previous = self.best_at_growth
        if previous is not None and self.best > previous - self.min_gain * abs(previous):
            self.stopped = True  # the last growth did not lower the plateau: width is enough
            return False
        self.best_at_growth = self.best
        return True


@dataclass
class Progress:
    """Decides at each scheduled growth check whether the model should grow: while the loss
    keeps improving, and never again once it stops.

    The first growth comes at check ``window``. From check ``2 * window`` on, the model grows at
    every check where the best loss of the last ``window`` checks is at least ``min_gain``
    below the best of the ``window`` checks before them; at the first check where it is not,
    growth stops for good. So width is added while training still turns it into a better
    held-out result, and not later, when new neurons would have too few steps left.

    Give it the held-out error (1 - accuracy) through the controller's ``closure``: held-out
    cross-entropy stops improving (over-confidence) long before the error does, and the
    training loss keeps falling on data a model can memorise. ``min_gain`` is in the loss's own
    units (0.01: one point of error).
    """

    window: int = 2
    min_gain: float = 0.01
    losses: list[float] = field(default_factory=list)  # the last 2 * window checks
    stopped: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int, got {self.window!r}")
        if not (
            isinstance(self.min_gain, (int, float))
            and not isinstance(self.min_gain, bool)
            and math.isfinite(self.min_gain)
            and self.min_gain >= 0.0
        ):
            raise ValueError(f"min_gain must be a finite number >= 0, got {self.min_gain!r}")

    def should_grow(self, loss: float) -> bool:
        """Takes the loss measured at this check; True when the model should grow now."""
        _check_finite(loss, "Progress")
        if self.stopped:
            return False
        window = self.window
        self.losses.append(float(loss))
        del self.losses[: -2 * window]  # older checks never decide again
        checks = len(self.losses)
        if checks < 2 * window:
            return checks == window
        recent = min(self.losses[-window:])
        before = min(self.losses[-2 * window : -window])
        if before - recent >= self.min_gain:
            return True
        self.stopped = True  # the last checks did not improve on the ones before: width is enough
        return False
