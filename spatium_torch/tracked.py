"""A Parameter that knows when it may have changed.

In-place ops bump a tensor's version counter, and a new tensor (``.data = t``, ``.to()``) changes
its storage; but a write through ``.data`` (EMA updates, some clipping utilities) bypasses the
version counter, because ``.data`` is an alias with a counter of its own. Caches derived from a
Parameter (a layer's quantized store, an activation map's argmax) use :class:`TrackedParameter`
to know when to recompute.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_PARAMETER_DATA = nn.Parameter.data  # the tensor's own `.data` descriptor


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` that can tell whether its contents may have changed since a given
    moment (:meth:`stamp`): a SpatialLayer's latent weight (the store re-quantizes when it
    changed) and a learnable activation map's logits (the cached argmax is recomputed).

    In-place ops bump the version counter, and a new tensor (``.data = t``, ``.to()``) changes
    the storage; but a write through ``.data`` (EMA updates, some clipping utilities) bypasses
    the version counter, because ``.data`` is an alias with a counter of its own. So every
    alias ``.data`` hands out is followed: its own counter while it lives, and its death counts
    as a possible write.
    """

    def __new__(
        cls, data: torch.Tensor | None = None, requires_grad: bool = True
    ) -> TrackedParameter:
        return super().__new__(cls, data, requires_grad)

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        alias = _PARAMETER_DATA.__get__(self)
        self._follow(alias)
        return alias

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _PARAMETER_DATA.__set__(self, value)
        self._follow(value)

    def _follow(self, alias: torch.Tensor) -> None:
        tracker = self.__dict__.setdefault("_tracker", _AliasTracker())
        tracker.follow(alias)

    def stamp(self) -> tuple:
        """A value that differs from any earlier one whenever the contents may have changed."""
        tracker = self.__dict__.get("_tracker")
        aliases = tracker.stamp() if tracker is not None else ()
        # A new storage (a move, a cast, `.data = t`) changes the data pointer; on the meta
        # device, where it is 0, moves go through the `.data` setter, which the aliases note.
        steps = self.__dict__.get("_optimizer_steps", 0)
        return (id(self), self._version, self.data_ptr(), aliases, steps)

    def __getstate__(self) -> dict:
        return {}  # the alias tracker is not part of the weight

    def __reduce_ex__(self, protocol: int) -> Any:
        # Saved and copied as a plain Parameter's data, restored as a TrackedParameter.
        return (_rebuild, (_PARAMETER_DATA.__get__(self), self.requires_grad))

    def __deepcopy__(self, memo: dict) -> TrackedParameter:
        result = TrackedParameter(_PARAMETER_DATA.__get__(self).clone(), self.requires_grad)
        memo[id(self)] = result
        return result

    def __repr__(self) -> str:
        return "TrackedParameter containing:\n" + repr(_PARAMETER_DATA.__get__(self))


def _rebuild(data: torch.Tensor, requires_grad: bool) -> TrackedParameter:
    return TrackedParameter(data, requires_grad)


class _AliasTracker:
    """The live ``.data`` aliases of one TrackedParameter, and how many have died."""

    def __init__(self) -> None:
        self.aliases: list[weakref.ref] = []
        self.deaths = 0

    def follow(self, alias: torch.Tensor) -> None:
        self.aliases = [ref for ref in self.aliases if ref() is not None]
        self.aliases.append(weakref.ref(alias, self._died))

    def _died(self, ref: weakref.ref) -> None:
        self.deaths += 1

    def stamp(self) -> tuple:
        versions = tuple(a._version for ref in self.aliases if (a := ref()) is not None)
        return (self.deaths, len(self.aliases), versions)


def _note_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """After any optimizer's step: each TrackedParameter it holds with a gradient counts as
    possibly changed. Fused optimizers (``Adam(fused=True)`` and the like on the CPU) update
    parameters in kernels that leave their version counters as they were."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if isinstance(parameter, TrackedParameter) and parameter.grad is not None:
                parameter.__dict__["_optimizer_steps"] = (
                    parameter.__dict__.get("_optimizer_steps", 0) + 1
                )


register_optimizer_step_post_hook(_note_optimizer_step)


def is_stale(parameter: torch.Tensor, stamp: tuple | None) -> bool:
    """Whether ``parameter`` may differ from when its stamp was ``stamp``. A plain Parameter
    (one assigned by hand) cannot be followed through ``.data`` and always counts as changed."""
    return not isinstance(parameter, TrackedParameter) or parameter.stamp() != stamp
