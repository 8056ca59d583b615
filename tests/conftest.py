import pytest
import torch

import spatium_torch as st

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and st.built_with_cuda()),
    reason="needs a GPU and a CUDA build of the extension",
)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: random inputs are reproducible."""
    torch.manual_seed(0)
