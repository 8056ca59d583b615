"""spatium_torch: quantized, block-sparse neural layers whose weights live in a 3D spatial
memory addressed by Morton codes.

What exists so far: Morton codes of 3D positions (:func:`morton_encode`, :func:`morton_decode`),
registered as PyTorch ops under ``torch.ops.spatium``; the C++ core also holds the split-block
bloom filter that the spatial memory will use.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from spatium_torch import _C  # noqa: F401  (loading it registers torch.ops.spatium.*)
from spatium_torch.ops import built_with_cuda, morton_decode, morton_encode

__version__ = "0.1.0"

__all__ = ["built_with_cuda", "morton_decode", "morton_encode", "__version__"]
