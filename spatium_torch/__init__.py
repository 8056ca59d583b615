"""spatium_torch: quantized, block-sparse neural layers whose weights live in a 3D spatial
memory addressed by Morton codes.

``SpatialLayer`` replaces ``nn.Linear`` (``SpatialLayer.from_linear``, or ``convert`` for a whole
model; ``from_pretrained`` loads a converted Hugging Face model); ``freeze`` drops its latent
weights; ``portable`` / ``export_onnx`` give the same model in standard ops (ONNX);
``load_state_dict`` loads a whole model's state all or nothing; ``SpatialNetwork``
stacks layers;
``GrowthController`` grows, prunes and rewires layers between optimizer steps, and
``load_grown``/``match_widths`` load its checkpoints into freshly built models;
``network_stats`` summarises them; ``morton_encode``/``morton_decode`` and ``layouts`` place
inputs in space. ``st.viz`` draws pictures and ``st.Dashboard`` shows training live
(matplotlib and rich, loaded on first use).
"""

import importlib
from typing import Any

import torch  # noqa: F401  (loads libtorch, which _C links against)

from spatium_torch import (
    _C,  # noqa: F401  (loading it registers torch.ops.spatium.*)
    layouts,
)
from spatium_torch.activation import ActivationMap
from spatium_torch.convert import Conversion, convert, plan_conversion
from spatium_torch.growth import GrowthController, load_grown, match_widths
from spatium_torch.history import GrowthEvent, HistoryRecord, TrainingHistory
from spatium_torch.layer import SpatialLayer, freeze, load_state_dict
from spatium_torch.memory import LayerMemory, MemoryStats
from spatium_torch.network import SpatialNetwork
from spatium_torch.neurons import NeuronChange
from spatium_torch.ops import built_with_cuda, morton_decode, morton_encode
from spatium_torch.plateau import Plateau, Progress
from spatium_torch.portable import PortableLinear, export_onnx, portable
from spatium_torch.pretrained import from_pretrained
from spatium_torch.stats import LayerStats, NetworkStats, network_stats

__version__ = "0.1.0"

__all__ = [
    "ActivationMap",
    "Conversion",
    "GrowthController",
    "GrowthEvent",
    "HistoryRecord",
    "LayerStats",
    "NetworkStats",
    "NeuronChange",
    "Plateau",
    "Progress",
    "PortableLinear",
    "TrainingHistory",
    "LayerMemory",
    "MemoryStats",
    "SpatialLayer",
    "SpatialNetwork",
    "__version__",
    "built_with_cuda",
    "convert",
    "export_onnx",
    "freeze",
    "from_pretrained",
    "layouts",
    "load_grown",
    "load_state_dict",
    "match_widths",
    "morton_decode",
    "morton_encode",
    "network_stats",
    "plan_conversion",
    "portable",
]


def __getattr__(name: str) -> Any:
    # Pictures and the dashboard need matplotlib and rich: loaded on first use, never by the core.
    if name in _LAZY_MODULES:
        return importlib.import_module(f"spatium_torch.{name}")
    if name == "Dashboard":
        return importlib.import_module("spatium_torch.dashboard").Dashboard
    raise AttributeError(f"module 'spatium_torch' has no attribute {name!r}")


_LAZY_MODULES = ("viz", "dashboard", "compare")
