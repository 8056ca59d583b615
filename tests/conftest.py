import os
import tempfile

import pytest
import torch

import spatium_torch as st

# torch.compile's on-disk cache, fresh for each run: its keys do not cover a custom op's fake
# impl, so artifacts compiled against an earlier build of the ops could be reused.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="spatium-inductor-")

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and st.built_with_cuda()),
    reason="needs a GPU and a CUDA build of the extension",
)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: random inputs are reproducible."""
    torch.manual_seed(0)
