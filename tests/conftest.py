import pytest
import torch

import spatium_torch as st

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and st.built_with_cuda()),
    reason="needs a GPU and a CUDA build of the extension",
)
