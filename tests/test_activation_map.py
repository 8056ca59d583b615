"""ActivationMap: cells by SimHash, fixed and learnable maps, hit counts, the softmax cache."""

import pytest
import torch
from helpers import train_digits, train_digits_mlp
from torch import nn

import spatium_torch as st
from spatium_torch.ops import ACTIVATIONS


def reference(pre, cells, table):
    """Each element through its (neuron, cell) function, one function at a time."""
    out = torch.empty_like(pre)
    fn = table.long()[torch.arange(pre.shape[1]).unsqueeze(0), cells.unsqueeze(1)]  # [B, N]
    for k, name in enumerate(ACTIVATIONS):
        out = torch.where(fn == k, st.ops.activation(pre, name), out)
    return out


@pytest.mark.parametrize("learnable", [False, True])
def test_uniform_map_is_relu_exactly(learnable):
    amap = st.ActivationMap(7, 16, learnable=learnable).eval()
    pre, x = torch.randn(50, 7), torch.randn(50, 16)
    assert torch.equal(amap(pre, x), torch.relu(pre))


@pytest.mark.parametrize("init", ["random", "gradient"])
def test_fixed_map_applies_each_cells_function(init):
    amap = st.ActivationMap(9, 12, init=init, seed=3)
    pre, x = torch.randn(200, 9), torch.randn(200, 12)
    assert torch.equal(amap(pre, x), reference(pre, amap.cells(x), amap.table))


def test_gradient_init_has_relu_centre_and_tanh_edge():
    table = st.ActivationMap(2, 4, init="gradient").table.view(2, 8, 8)
    assert (table[:, 2:6, 2:6] == ACTIVATIONS.index("relu")).all()
    assert (table[:, 0] == ACTIVATIONS.index("tanh")).all()
    assert (table[:, :, 7] == ACTIVATIONS.index("tanh")).all()


def test_eval_learnable_map_applies_the_argmax_function():
    amap = st.ActivationMap(6, 10, learnable=True, seed=1)
    with torch.no_grad():
        amap.logits.copy_(torch.randn_like(amap.logits))
    amap.eval()
    pre, x = torch.randn(100, 6), torch.randn(100, 10)
    table = amap.logits.argmax(-1).to(torch.uint8)
    assert torch.equal(amap(pre, x), reference(pre, amap.cells(x), table))


def test_training_mixture_is_the_probability_weighted_sum():
    amap = st.ActivationMap(4, 5, learnable=True, seed=2)
    with torch.no_grad():
        amap.logits.copy_(torch.randn_like(amap.logits))
    pre, x = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 5)
    cells = amap.cells(x)
    probs = torch.softmax(amap.logits.double(), -1)[torch.arange(4), :, :][:, cells].permute(
        1, 0, 2
    )
    values = torch.stack([st.ops.activation(pre, name) for name in ACTIVATIONS], -1)
    torch.testing.assert_close(amap(pre, x), (probs * values).sum(-1))


def test_gradcheck_pre_activation_and_logits():
    amap = st.ActivationMap(3, 6, learnable=True, init="random", seed=4).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    pre = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    cells = amap.cells(x)

    def mixture(pre, logits):
        probs = torch.softmax(logits, -1).detach()
        return st.activation._LogitsMixture.apply(pre, cells, logits, probs)

    logits = amap.logits.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(mixture, (pre, logits))
    table = amap.function_table()
    away = pre.detach().where(pre.detach().abs() > 1e-2, 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: torch.ops.spatium.activation_map(p, cells, table), (away,)
    )


def test_ops_pass_opcheck():
    pre, cells = torch.randn(6, 3), torch.tensor([0, 9, 63, 9, 1, 2])
    table = torch.randint(0, 12, (3, 64), dtype=torch.uint8)
    probs = torch.softmax(torch.randn(3, 64, 12), -1)
    torch.library.opcheck(torch.ops.spatium.activation_map.default, (pre, cells, table))
    torch.library.opcheck(torch.ops.spatium.activation_mixture.default, (pre, cells, probs))
    grad = torch.randn(6, 3)
    torch.library.opcheck(
        torch.ops.spatium.activation_map_backward.default, (grad, pre, cells, table)
    )
    torch.library.opcheck(
        torch.ops.spatium.activation_mixture_backward.default, (grad, pre, cells, probs)
    )
    logits = torch.randn(3, 64, 12)
    torch.library.opcheck(torch.ops.spatium.map_softmax.default, (logits,))
    torch.library.opcheck(
        torch.ops.spatium.map_softmax_backward.default, (torch.randn(3, 64, 12), probs)
    )


def test_same_input_same_cell_and_small_perturbations_keep_it():
    amap = st.ActivationMap(2, 64, seed=5)
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(amap.cells(x), amap.cells(x.clone()))
    noise = torch.randn(1000, 64, generator=torch.Generator().manual_seed(7))
    perturbed = x + 1e-3 * x.norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True)
    kept = (amap.cells(x) == amap.cells(perturbed)).float().mean().item()
    assert kept >= 0.9, kept
    assert amap.cells(x).min() >= 0 and amap.cells(x).max() < 64


def test_hit_counts_sum_to_samples_times_neurons_and_reset():
    amap = st.ActivationMap(5, 8)
    amap(torch.randn(37, 5), torch.randn(37, 8))
    amap.eval()
    amap(torch.randn(2, 3, 5), torch.randn(2, 3, 8))
    assert amap.hits.sum() == (37 + 6) * 5
    assert amap.dead_cells().any()  # 43 samples cannot reach all 64 cells of every neuron... often
    amap.reset_hits()
    assert amap.hits.sum() == 0 and amap.dead_cells().all()


@pytest.mark.parametrize("fused", [False, True])
def test_softmax_is_computed_once_per_optimizer_step(fused):
    amap = st.ActivationMap(4, 6, learnable=True)
    optimizer = torch.optim.Adam(amap.parameters(), lr=0.1, fused=fused)
    pre, x = torch.randn(16, 4, requires_grad=True), torch.randn(16, 6)
    for step in range(3):
        for _ in range(4):  # several forwards and backwards (gradient accumulation) per step
            amap(pre, x).sum().backward()
        assert amap.softmax_computations == step + 1
        optimizer.step()
        optimizer.zero_grad()
    amap(pre, x)
    assert amap.softmax_computations == 4


def test_state_dict_round_trip():
    amap = st.ActivationMap(4, 6, learnable=True, seed=8)
    with torch.no_grad():
        amap.logits.normal_()
    amap(torch.randn(5, 4), torch.randn(5, 6))
    other = st.ActivationMap(4, 6, learnable=True, seed=9)
    other.load_state_dict(amap.state_dict())
    pre, x = torch.randn(10, 4), torch.randn(10, 6)
    assert torch.equal(other(pre, x), amap(pre, x))
    assert torch.equal(other.projections, amap.projections)


def test_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        st.ActivationMap(3, 4, init="checkerboard")
    with pytest.raises(ValueError, match="num_features"):
        st.ActivationMap(0, 4)
    amap = st.ActivationMap(3, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        amap(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        amap(torch.randn(2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="leading shape"):
        amap(torch.randn(2, 3), torch.randn(3, 4))


class MapMLP(nn.Module):
    """64-128-10 with an activation map after the hidden layer (hashing the layer's input)."""

    def __init__(self, make_layer, learnable: bool) -> None:
        super().__init__()
        self.hidden = make_layer(64, 128)
        self.map = st.ActivationMap(128, 64, learnable=learnable)
        self.out = make_layer(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.map(self.hidden(x), x))


def test_digits_learnable_map_within_two_points_of_relu():
    relu = train_digits_mlp(nn.Linear)
    torch.manual_seed(0)
    learned = train_digits(MapMLP(nn.Linear, learnable=True))
    assert learned >= relu - 0.02, (learned, relu)


def test_spatial_layer_with_a_map():
    layer = st.SpatialLayer(100, 12, bits=4, region_bits=3, activation="map")
    x = torch.randn(5, 3, 100)
    linear = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), torch.relu(linear))  # uniform map: relu
    assert layer.activation_map.hits.sum() == 15 * 12
    learnable = st.SpatialLayer(100, 12, activation="map", map_init="random", map_learnable=True)
    x = torch.randn(4, 100, requires_grad=True)
    learnable(x).sum().backward()
    assert x.grad is not None and learnable.activation_map.logits.grad is not None
    other = st.SpatialLayer(100, 12, activation="map", map_init="random", map_learnable=True)
    other.load_state_dict(learnable.state_dict())
    learnable.eval()
    other.eval()
    assert torch.equal(other(x), learnable(x))


def test_initial_logit_sets_the_starting_mixture():
    sure = st.ActivationMap(2, 3, learnable=True)
    even = st.ActivationMap(2, 3, learnable=True, initial_logit=0.0)
    assert sure.probabilities()[..., 0].min() > 0.8  # relu
    torch.testing.assert_close(even.probabilities(), torch.full((2, 64, 12), 1 / 12))


def test_cells_are_the_signs_of_the_projections():
    amap = st.ActivationMap(3, 40, seed=10)
    x = torch.randn(300, 40)
    dots = x.double() @ amap.projections.double().t()
    expected = ((dots > 0).long() * (1 << torch.arange(6))).sum(-1)
    clear = (dots.abs() > 1e-4).all(-1)  # away from a sign decided by rounding
    assert torch.equal(amap.cells(x)[clear], expected[clear])
    assert torch.equal(amap.cells(x.view(3, 100, 40)), amap.cells(x).view(3, 100))


def test_hit_counts_follow_each_cell():
    amap = st.ActivationMap(4, 8)
    x = torch.randn(70, 8)
    amap(torch.randn(70, 4), x)
    counts = torch.bincount(amap.cells(x), minlength=64)
    assert torch.equal(amap.hits, counts.expand(4, 64))


def test_new_ops_pass_opcheck():
    x, projections = torch.randn(5, 7), torch.randn(6, 7)
    torch.library.opcheck(torch.ops.spatium.simhash_cells.default, (x, projections))
    hits = torch.zeros(3, 64, dtype=torch.int64)
    cells = torch.tensor([0, 9, 63, 9])
    torch.library.opcheck(torch.ops.spatium.count_hits_.default, (hits, cells))


def test_mixture_reads_any_probability_layout():
    pre, cells = torch.randn(9, 5), torch.randint(0, 64, (9,))
    probs = torch.softmax(torch.randn(5, 64, 12), -1)
    cell_major = probs.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    y = torch.ops.spatium.activation_mixture(pre, cells, probs)
    assert torch.equal(torch.ops.spatium.activation_mixture(pre, cells, cell_major), y)
    grad = torch.randn(9, 5)
    gx, gp = torch.ops.spatium.activation_mixture_backward(grad, pre, cells, probs)
    gx2, gp2 = torch.ops.spatium.activation_mixture_backward(grad, pre, cells, cell_major)
    assert torch.equal(gx, gx2) and torch.equal(gp, gp2)
    assert gp.stride() == probs.stride() and gp2.stride() == cell_major.stride()
    torch.library.opcheck(torch.ops.spatium.activation_mixture.default, (pre, cells, cell_major))
    torch.library.opcheck(
        torch.ops.spatium.activation_mixture_backward.default, (grad, pre, cells, cell_major)
    )


def test_fixed_map_follows_changes_of_its_table():
    amap = st.ActivationMap(6, 10, init="random", seed=11)
    pre, x = torch.randn(40, 6), torch.randn(40, 10)
    amap(pre, x)  # caches the table's cell-major copy
    with torch.no_grad():
        amap.table[2] = ACTIVATIONS.index("sin")
    assert torch.equal(amap(pre, x), reference(pre, amap.cells(x), amap.table))
    amap.load_state_dict(st.ActivationMap(6, 10, init="gradient").state_dict())
    assert torch.equal(amap(pre, x), reference(pre, amap.cells(x), amap.table))


def test_batch_one_and_batched_maps_agree():
    amap = st.ActivationMap(300, 20, init="random", seed=12)
    pre, x = torch.randn(33, 300), torch.randn(33, 20)
    rows = torch.cat([amap(pre[i : i + 1], x[i : i + 1]) for i in range(33)])
    assert torch.equal(rows, amap(pre, x))


def test_training_mixture_without_grad_matches_with_grad():
    amap = st.ActivationMap(5, 7, learnable=True, init="random", seed=13)
    pre, x = torch.randn(20, 5), torch.randn(20, 7)
    with torch.no_grad():
        y = amap(pre, x)
    assert torch.equal(y, amap(pre, x).detach())


def test_learnable_logits_are_held_cell_major_and_saved_contiguous():
    # Cell-major logits (neurons last in memory) make the softmax, its backward and the
    # logits' gradient transposition-free; a state_dict holds them contiguous (safetensors).
    amap = st.ActivationMap(5, 7, learnable=True, init="random")
    cell_major = lambda t: t.permute(1, 2, 0).is_contiguous()  # noqa: E731
    assert cell_major(amap.logits)
    amap(torch.randn(9, 5), torch.randn(9, 7)).sum().backward()
    assert cell_major(amap.logits.grad)
    torch.optim.Adam(amap.parameters()).step()
    assert cell_major(amap.logits)
    state = amap.state_dict()
    assert state["logits"].is_contiguous() and torch.equal(state["logits"], amap.logits)
    twin = st.ActivationMap(5, 7, learnable=True)
    twin.load_state_dict(state)
    assert cell_major(twin.logits) and torch.equal(twin.logits, amap.logits)
    picked = amap.select_neurons(torch.tensor([4, 0, 0]))
    assert cell_major(picked.logits) and torch.equal(picked.logits[1], amap.logits[0])
