"""Converting a model's nn.Linear layers to SpatialLayers, in place."""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from spatium_torch.layer import SpatialLayer

logger = logging.getLogger("spatium_torch")

# The attribute of a Hugging Face config where convert records what it did, so that
# save_pretrained writes it to config.json and from_pretrained can do it again.
CONVERSIONS_KEY = "spatium_conversions"

# Modules that read their children's weights directly instead of calling them: a SpatialLayer
# there would never run (MultiheadAttention's out_proj) or its weight would be used unquantized.
WEIGHT_READERS = (nn.MultiheadAttention,)


def weight_readers(model: nn.Module) -> dict[str, nn.Module]:
    """The children of :data:`WEIGHT_READERS` in ``model``, by name, with the module that reads
    their weights."""
    return {
        f"{name}.{child}" if name else child: module
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, WEIGHT_READERS)
        for child, _ in module.named_children()
    }


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert` does with one nn.Linear: ``converted`` or not, and why not."""

    name: str
    converted: bool
    reason: str = ""


def plan_conversion(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    keep_output: bool = True,
) -> list[Conversion]:
    """What :func:`convert` would do with each nn.Linear of ``model`` (module order), without
    changing anything.

    An nn.Linear is left alone when its parent reads its weights directly (the projections of
    an ``nn.MultiheadAttention``), when its weight is shared with another module (tied to an
    embedding), when it is the model's last nn.Linear and ``keep_output`` (the output head, as
    bitsandbytes and torchao leave it), when ``include`` is given and no pattern matches its
    name, or when a pattern of ``exclude`` does (``fnmatch`` patterns over module names, e.g.
    ``"*.mlp.*"``)."""
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name
    ]
    readers = weight_readers(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(f"{name}.{parameter_name}")
    plan = []
    for index, (name, linear) in enumerate(linears):
        tied = [owner for owner in owners[id(linear.weight)] if owner != f"{name}.weight"]
        if name in readers:
            reason = f"its parent {type(readers[name]).__name__} reads its weight directly"
        elif tied:
            reason = f"its weight is tied to {tied[0]}"
        elif keep_output and index == len(linears) - 1:
            reason = "the output head (keep_output=False converts it)"
        elif include is not None and not any(fnmatch.fnmatch(name, p) for p in include):
            reason = "not in include"
        elif any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
            reason = "in exclude"
        else:
            reason = ""
        plan.append(Conversion(name, not reason, reason))
    return plan


def convert(
    model: nn.Module,
    *,
    bits: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    keep_output: bool = True,
    **options: Any,
) -> nn.Module:
    """Replaces ``model``'s nn.Linear layers by SpatialLayers (:meth:`SpatialLayer.from_linear`
    with ``bits`` and ``options``) in place and returns ``model``. Which layers, and why the
    others stay: :func:`plan_conversion` (same arguments); the plan is logged at INFO level on
    the ``"spatium_torch"`` logger. Every new layer is built before any is installed: an error
    (a bad option) leaves the model as it was. ``nn.TransformerEncoder`` modules get
    ``use_nested_tensor = False``: their nested-tensor fast path reads the layers' weights
    directly. On a model with a Hugging Face ``config``, the converted names, ``bits`` and
    ``options`` are recorded there (``config.spatium_conversions``), so that ``save_pretrained``
    saves them and :func:`~spatium_torch.from_pretrained` converts a fresh model alike."""
    plan = plan_conversion(model, include=include, exclude=exclude, keep_output=keep_output)
    built = {
        entry.name: SpatialLayer.from_linear(model.get_submodule(entry.name), bits=bits, **options)
        for entry in plan
        if entry.converted
    }
    for name, layer in built.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and built:
            module.use_nested_tensor = False
    if built:
        _record(model, list(built), bits, options)
    skipped = [entry for entry in plan if not entry.converted]
    logger.info(
        "convert: %d nn.Linear converted to %d-bit SpatialLayers, %d kept%s",
        len(built),
        bits,
        len(skipped),
        "".join(f"\n  kept {entry.name}: {entry.reason}" for entry in skipped),
    )
    return model


def _record(model: nn.Module, names: list[str], bits: int, options: dict[str, Any]) -> None:
    """Appends this conversion to the model's Hugging Face config, if it has one."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):
        return
    entry = {"layers": names, "bits": bits, **options}
    try:
        json.dumps(entry)
    except TypeError:
        logger.warning(
            "convert: options %s are not JSON values, so config.json cannot record them and "
            "from_pretrained cannot convert a fresh model alike",
            sorted(options),
        )
        return
    setattr(config, CONVERSIONS_KEY, [*getattr(config, CONVERSIONS_KEY, []), entry])
