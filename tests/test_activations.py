"""The 12 activation-map functions (C++): values against torch, gradients, opcheck."""

import pytest
import torch
import torch.nn.functional as F

import spatium_torch as st
from spatium_torch.ops import ACTIVATIONS

REFERENCE = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "identity": lambda x: x,
    "sin": torch.sin,
    "gaussian": lambda x: torch.exp(-x * x),
    "abs": torch.abs,
}


def points(dtype):
    x = torch.linspace(-30, 30, 601, dtype=dtype)
    return torch.cat([x, torch.tensor([0.0, 1e-3, -1e-3], dtype=dtype)])


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_torch(name, dtype):
    x = points(dtype).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y = st.ops.activation(x, name)
    expected = REFERENCE[name](ref_x)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gradcheck_and_opcheck(name):
    x = (torch.randn(3, 7, dtype=torch.float64) * 2).requires_grad_()
    x = x.detach().where(x.detach().abs() > 1e-2, 0.5).requires_grad_()  # away from kinks
    assert torch.autograd.gradcheck(lambda t: st.ops.activation(t, name), (x,))
    fn = ACTIVATIONS.index(name)
    torch.library.opcheck(torch.ops.spatium.activation.default, (x, fn))
    torch.library.opcheck(
        torch.ops.spatium.activation_backward.default, (torch.randn_like(x), x.detach(), fn)
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="one of"):
        st.ops.activation(torch.randn(3), "swish")
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        torch.ops.spatium.activation(torch.randn(3), 12)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.spatium.activation(torch.ones(3, dtype=torch.int64), 0)
