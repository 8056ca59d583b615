"""Loading converted Hugging Face models saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spatium_torch.convert import CONVERSIONS_KEY, convert
from spatium_torch.growth import load_grown
from spatium_torch.layer import SpatialLayer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def from_pretrained(model_class: Any, path: str | os.PathLike[str]) -> nn.Module:
    """Loads a model that :func:`~spatium_torch.convert` converted and ``save_pretrained``
    saved, from the local directory ``path``.

    ``model_class`` is a ``transformers`` model class (``LlamaForCausalLM``) or auto class
    (``AutoModelForCausalLM``). The model is built from the saved config, the layers recorded
    in its ``spatium_conversions`` are converted with the recorded settings, and the saved
    weights are loaded with :func:`~spatium_torch.load_grown` (grown widths resized to, frozen
    layers frozen). Tied weights (a language-model head tied to its embedding) are tied again.
    Returns the model in eval mode, as ``transformers`` does. Raises ``FileNotFoundError``
    without a saved model, ``ValueError`` when the config records no conversion or the saved
    weights do not fit the model (keys missing or unexpected)."""
    import transformers  # only this function needs it

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no config.json: not a save_pretrained directory"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    conversions = getattr(config, CONVERSIONS_KEY, None)
    if not conversions:
        raise ValueError(
            f"{directory / 'config.json'} records no spatium_torch conversion: the model was "
            f"saved before st.convert, or without a Hugging Face config; load it with "
            f"{model_class.__name__}.from_pretrained"
        )
    state = _saved_state(directory)
    build = getattr(model_class, "from_config", model_class)
    setattr(config, CONVERSIONS_KEY, [])  # convert records each conversion again
    model = build(config)
    for entry in conversions:
        options = dict(entry)
        layers, bits = options.pop("layers"), options.pop("bits")
        convert(model, bits=bits, include=layers, keep_output=False, **options)
        missed = [
            name for name in layers if not isinstance(model.get_submodule(name), SpatialLayer)
        ]
        if missed:
            raise ValueError(
                f"{type(model).__name__} built from {directory} cannot convert {missed}"
            )
    missing, unexpected = load_grown(model, state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[key]) for key in tensors.keys() - set(missing)}
    untied = [key for key in missing if id(tensors[key]) not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"the weights saved in {directory} do not fit {type(model).__name__}: "
            f"missing {untied}, unexpected {unexpected}"
        )
    return model.eval()


def _saved_state(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained wrote: one safetensors file, or the shards its index names."""
    from safetensors.torch import load_file

    if (directory / SAFETENSORS).is_file():
        return load_file(directory / SAFETENSORS)
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    raise FileNotFoundError(
        f"{directory} holds no {SAFETENSORS} or {SAFETENSORS_INDEX}: save with "
        "save_pretrained(..., safe_serialization=True), the default"
    )
