"""What modules and optimizers hold at one moment, put back when a change fails part-way.

A growth event installs a new layer, consumer, norms and optimizer state one after the other; a
whole-model load copies into every module in turn. :class:`Snapshot` keeps what they held
before, so that an exception half way through leaves them exactly as they were: the same
Parameter, buffer and submodule objects, the same values and the same optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# The containers nn.Module keeps its parameters, buffers and submodules in: changed in place
# (register_buffer, setattr), so their contents are kept, not just the containers.
_REGISTRIES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class Snapshot:
    """What ``modules`` (each with its submodules) and ``optimizers`` hold now; :meth:`restore`
    puts it back.

    Kept by reference: each module's Parameter, buffer and submodule objects and its other
    attributes (shallow: a list attribute changed in place stays changed), each optimizer's
    param groups, the Parameters in them and the per-parameter state. That undoes every change
    that swaps objects, as growth and the store's arrays do. With ``values=True`` the values of
    every parameter and persistent buffer are copied too, and those written in place since
    (their version counter moved, as a ``copy_`` in ``load_state_dict`` moves it) get them
    back: memory for the modules' state a second time.
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        optimizers: Iterable[torch.optim.Optimizer] = (),
        *,
        values: bool = False,
    ) -> None:
        every = {id(m): m for root in modules for m in root.modules()}
        self._modules = [_ModuleState(module) for module in every.values()]
        self._optimizers = [_OptimizerState(optimizer) for optimizer in optimizers]
        self._values: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        if values:
            tensors = {id(t): t for module in every.values() for t in _persistent(module)}
            self._values = [(t, t._version, t.detach().clone()) for t in tensors.values()]

    def restore(self) -> None:
        """Puts back what the modules and optimizers held when the snapshot was taken."""
        for state in (*self._modules, *self._optimizers):
            state.restore()
        with torch.no_grad():
            for tensor, version, value in self._values:
                if tensor._version != version:
                    tensor.copy_(value)


class _ModuleState:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attributes = dict(module.__dict__)
        self.registries = {
            name: type(registry)(registry)
            for name in _REGISTRIES
            if (registry := module.__dict__.get(name)) is not None
        }

    def restore(self) -> None:
        attributes = self.module.__dict__
        for name in attributes.keys() - self.attributes.keys():
            del attributes[name]
        attributes.update(self.attributes)
        for name, saved in self.registries.items():
            registry = attributes[name]
            registry.clear()
            registry.update(saved)


class _OptimizerState:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.groups = list(optimizer.param_groups)
        self.params = [list(group["params"]) for group in self.groups]
        self.state = dict(optimizer.state)

    def restore(self) -> None:
        self.optimizer.param_groups[:] = self.groups
        for group, params in zip(self.groups, self.params, strict=True):
            group["params"][:] = params
        self.optimizer.state.clear()
        self.optimizer.state.update(self.state)


def _persistent(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and the buffers its state_dict holds."""
    skipped = module._non_persistent_buffers_set
    buffers = [t for name, t in module._buffers.items() if t is not None and name not in skipped]
    return [t for t in module._parameters.values() if t is not None] + buffers
