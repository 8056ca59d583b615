"""ActivationMap: cells by SimHash, fixed and learnable maps, hit counts, the argmax cache."""

import pytest
import torch
from helpers import train_digits, train_digits_mlp
from torch import nn

import spatium_torch as st
from spatium_torch import reference as ref
from spatium_torch.activation import LOGIT_FORMS
from spatium_torch.ops import ACTIVATIONS


def reference(pre, cells, table):
    """Each element through its (neuron, cell) function, one function at a time."""
    out = torch.empty_like(pre)
    fn = table.long()[torch.arange(pre.shape[1]).unsqueeze(0), cells.unsqueeze(1)]  # [B, N]
    for k, name in enumerate(ACTIVATIONS):
        out = torch.where(fn == k, st.ops.activation(pre, name), out)
    return out


def logits_of(amap):
    """A learnable map's logits ``[neurons, 64, 12]``, whichever form holds them."""
    if amap.logit_form == "full":
        return amap.logits.detach()
    return ref.factored_map_logits(
        amap.neuron_logits.detach(),
        amap.cell_logits.detach(),
        amap.initial_table,
        amap.initial_lead.to(amap.neuron_logits.dtype),
    )


def randomize(amap):
    """Random logits (of either form), so that cells hold different functions."""
    with torch.no_grad():
        for parameter in amap.learnable_parameters().values():
            parameter.copy_(4 * torch.randn_like(parameter))


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_uniform_map_is_relu_exactly(learnable, form):
    amap = st.ActivationMap(7, 16, learnable=learnable, logit_form=form).eval()
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


@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_eval_learnable_map_applies_the_argmax_function(form):
    amap = st.ActivationMap(6, 10, learnable=True, logit_form=form, init="random", seed=1)
    randomize(amap)
    amap.eval()
    pre, x = torch.randn(100, 6), torch.randn(100, 10)
    table = logits_of(amap).argmax(-1).to(torch.uint8)
    assert len(table.unique()) > 6  # the test sees many functions
    assert torch.equal(amap(pre, x), reference(pre, amap.cells(x), table))


@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_training_applies_the_argmax_function_as_eval_does(form):
    amap = st.ActivationMap(4, 5, learnable=True, logit_form=form, seed=2)
    randomize(amap)
    pre, x = torch.randn(30, 4, dtype=torch.float64, requires_grad=True), torch.randn(30, 5)
    table = logits_of(amap).argmax(-1).to(torch.uint8)
    expected = reference(pre.detach(), amap.cells(x), table)
    assert torch.equal(amap(pre, x), expected)  # training, with grad
    with torch.no_grad():
        assert torch.equal(amap(pre, x), expected)
    assert torch.equal(amap.eval()(pre, x), expected)


def switch_gains(pre, cells, table, grad):
    """The logits' gradient by its definition: for each (neuron, cell, function k), the change of
    sum(grad * y) were the cell's function switched to k, one switch at a time."""
    neurons = pre.shape[1]
    base = (grad * reference(pre, cells, table)).sum(0)  # [N]
    gains = torch.zeros(neurons, 64, len(ACTIVATIONS), dtype=pre.dtype)
    for cell in cells.unique().tolist():
        for k in range(len(ACTIVATIONS)):
            switched = table.clone()
            switched[:, cell] = k
            gains[:, cell, k] = (grad * reference(pre, cells, switched)).sum(0) - base
    return gains


@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_logits_gradient_is_the_first_order_gain_of_switching_each_cell(form):
    amap = st.ActivationMap(3, 6, learnable=True, logit_form=form, init="random", seed=4)
    amap = amap.double()
    x = torch.randn(40, 6, dtype=torch.float64)
    pre = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(40, 3, dtype=torch.float64)
    amap(pre, x).backward(grad)
    cells, table = amap.cells(x), amap.function_table()
    # The map is linear in each sample's function: switching one cell changes sum(grad * y)
    # by exactly the gradient, and the current function's entry is zero. A factored map's
    # logits add up to a cell's: their gradients are those gains summed over the neuron's
    # cells and over the cell's neurons.
    gains = switch_gains(pre.detach(), cells, table, grad)
    if form == "full":
        torch.testing.assert_close(amap.logits.grad, gains)
        chosen = amap.logits.grad.gather(-1, table.long().unsqueeze(-1))
        assert torch.equal(chosen, torch.zeros_like(chosen))
    else:
        torch.testing.assert_close(amap.neuron_logits.grad, gains.sum(1))
        torch.testing.assert_close(amap.cell_logits.grad, gains.sum(0))
    # the pre-activations' gradient is the argmax functions' (gradcheck away from kinks)
    away = pre.detach().where(pre.detach().abs() > 1e-2, 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: amap(p, x), (away,))


@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_cells_switch_to_the_function_that_lowers_the_loss(form):
    # Target |pre|: abs is the one function that fits, and every other function that beats relu
    # is beaten by abs, so the trained cells (all relu at first) end on abs.
    torch.manual_seed(0)
    amap = st.ActivationMap(2, 4, learnable=True, logit_form=form, initial_logit=1.0)
    optimizer = torch.optim.Adam(amap.parameters(), lr=0.05)
    x = torch.randn(256, 4)
    losses = []
    for _ in range(100):
        pre = torch.randn(256, 2)
        loss = (amap(pre, x) - pre.abs()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.3 and losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    hit = amap.hits > 0
    on_abs = amap.function_table()[hit] == ACTIVATIONS.index("abs")
    assert hit.sum() > 64 and on_abs.float().mean() > 0.8
    pre, x = torch.randn(100, 2), x[:100]
    fits = (amap.function_table() == ACTIVATIONS.index("abs"))[:, amap.cells(x)].t()
    assert torch.equal(amap.eval()(pre, x)[fits], pre.abs()[fits])


def test_ops_pass_opcheck():
    pre, cells = torch.randn(6, 3), torch.tensor([0, 9, 63, 9, 1, 2])
    table = torch.randint(0, 12, (3, 64), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.spatium.activation_map.default, (pre, cells, table))
    grad = torch.randn(6, 3)
    torch.library.opcheck(
        torch.ops.spatium.activation_map_backward.default, (grad, pre, cells, table)
    )
    for layout in (table, table.t().contiguous().t()):
        torch.library.opcheck(
            torch.ops.spatium.learnable_map_backward.default, (grad, pre, cells, layout)
        )
    logits = torch.randn(3, 64, 12)
    for layout in (logits, logits.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        torch.library.opcheck(torch.ops.spatium.map_argmax.default, (layout,))
    for layout in (table, table.t().contiguous().t()):
        torch.library.opcheck(
            torch.ops.spatium.factored_map_backward.default, (grad, pre, cells, layout)
        )
    cell_logits = torch.randn(64, 12)
    for neuron_logits in (torch.randn(3, 12), torch.randn(12, 3).t()):
        for initial in (table, table.t().contiguous().t()):
            torch.library.opcheck(
                torch.ops.spatium.factored_map_argmax.default,
                (neuron_logits, cell_logits, initial, torch.tensor(1.5)),
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
@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_argmax_is_computed_once_per_optimizer_step(fused, form, monkeypatch):
    amap = st.ActivationMap(4, 6, learnable=True, logit_form=form)
    optimizer = torch.optim.Adam(amap.parameters(), lr=0.1, fused=fused)
    pre, x = torch.randn(16, 4, requires_grad=True), torch.randn(16, 6)
    calls = []
    name = "map_argmax" if form == "full" else "factored_map_argmax"
    argmax = getattr(torch.ops.spatium, name)
    monkeypatch.setattr(
        st.activation.torch.ops.spatium, name, lambda *a: calls.append(1) or argmax(*a)
    )
    for step in range(3):
        for _ in range(4):  # several forwards and backwards (gradient accumulation) per step
            amap(pre, x).sum().backward()
        assert len(calls) == step + 1
        optimizer.step()
        optimizer.zero_grad()
    amap(pre, x)
    assert len(calls) == 4


@pytest.mark.parametrize("form", LOGIT_FORMS)
def test_state_dict_round_trip(form):
    amap = st.ActivationMap(4, 6, learnable=True, logit_form=form, init="random", seed=8)
    randomize(amap)
    amap(torch.randn(5, 4), torch.randn(5, 6))
    other = st.ActivationMap(4, 6, learnable=True, logit_form=form, initial_logit=2.0, seed=9)
    other.load_state_dict(amap.state_dict())
    pre, x = torch.randn(10, 4), torch.randn(10, 6)
    assert torch.equal(other(pre, x), amap(pre, x))
    assert torch.equal(other.projections, amap.projections)
    assert torch.equal(other.function_table(), amap.function_table())
    frozen = st.ActivationMap(4, 6, learnable=True, logit_form=form, seed=10)
    frozen.freeze()
    frozen.load_state_dict(amap.state_dict())  # a frozen map takes the argmax of saved logits
    assert torch.equal(frozen.table, amap.function_table())
    assert torch.equal(frozen(pre, x), amap(pre, x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        st.ActivationMap(3, 4, init="checkerboard")
    with pytest.raises(ValueError, match="logit_form"):
        st.ActivationMap(3, 4, learnable=True, logit_form="low-rank")
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
    grads = [p.grad for p in learnable.activation_map.learnable_parameters().values()]
    assert x.grad is not None and len(grads) == 2 and all(g is not None for g in grads)
    other = st.SpatialLayer(100, 12, activation="map", map_init="random", map_learnable=True)
    other.load_state_dict(learnable.state_dict())
    learnable.eval()
    other.eval()
    assert torch.equal(other(x), learnable(x))


@pytest.mark.parametrize("form", LOGIT_FORMS)
@pytest.mark.parametrize("init", ["gradient", "random"])
def test_initial_logit_is_the_lead_of_the_initial_function(form, init):
    amap = st.ActivationMap(2, 3, learnable=True, logit_form=form, init=init, initial_logit=0.5)
    fixed = st.ActivationMap(2, 3, init=init)
    assert torch.equal(amap.function_table(), fixed.table)
    top2 = logits_of(amap).topk(2, dim=-1).values
    assert torch.equal(top2[..., 0] - top2[..., 1], torch.full((2, 64), 0.5))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="initial_logit must be finite and > 0"):
            st.ActivationMap(2, 3, learnable=True, logit_form=form, initial_logit=bad)


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


def test_learnable_logits_are_held_cell_major_and_saved_contiguous():
    # Cell-major logits (neurons last in memory) make their argmax and gradient
    # transposition-free; a state_dict holds them contiguous (safetensors).
    amap = st.ActivationMap(5, 7, learnable=True, logit_form="full", init="random")
    cell_major = lambda t: t.permute(1, 2, 0).is_contiguous()  # noqa: E731
    assert cell_major(amap.logits)
    amap(torch.randn(9, 5), torch.randn(9, 7)).sum().backward()
    assert cell_major(amap.logits.grad)
    torch.optim.Adam(amap.parameters()).step()
    assert cell_major(amap.logits)
    state = amap.state_dict()
    assert state["logits"].is_contiguous() and torch.equal(state["logits"], amap.logits)
    twin = st.ActivationMap(5, 7, learnable=True, logit_form="full")
    twin.load_state_dict(state)
    assert cell_major(twin.logits) and torch.equal(twin.logits, amap.logits)
    picked = amap.select_neurons(torch.tensor([4, 0, 0]))
    assert cell_major(picked.logits) and torch.equal(picked.logits[1], amap.logits[0])


def test_factored_logits_are_held_function_major_and_saved_contiguous():
    # Function-major neuron logits and a cell-major initial table (neurons last in memory), as
    # the kernels read them; a state_dict holds them contiguous, the table at 4 bits a cell.
    amap = st.ActivationMap(5, 7, learnable=True, init="random")
    neurons_last = lambda t: t.t().is_contiguous()  # noqa: E731
    assert neurons_last(amap.neuron_logits) and neurons_last(amap.initial_table)
    amap(torch.randn(9, 5), torch.randn(9, 7)).sum().backward()
    assert neurons_last(amap.neuron_logits.grad) and amap.cell_logits.grad.shape == (64, 12)
    torch.optim.Adam(amap.parameters()).step()
    state = amap.state_dict()
    assert state["neuron_logits"].is_contiguous() and state["initial_table"].shape == (5, 32)
    twin = st.ActivationMap(5, 7, learnable=True)
    twin.load_state_dict(state)
    for name in ("neuron_logits", "initial_table"):
        assert neurons_last(getattr(twin, name))
        assert torch.equal(getattr(twin, name), getattr(amap, name))
    rows = torch.tensor([4, 0, 0])
    picked = amap.select_neurons(rows)
    assert neurons_last(picked.neuron_logits) and neurons_last(picked.initial_table)
    assert torch.equal(picked.function_table(), amap.function_table()[rows])
    assert torch.equal(picked.cell_logits, amap.cell_logits)


def test_a_factored_map_has_twelve_logits_a_neuron():
    full = st.ActivationMap(256, 40, learnable=True, logit_form="full")
    factored = st.ActivationMap(256, 40, learnable=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) == 256 * 64 * 12 and count(factored) == 256 * 12 + 64 * 12


def test_a_state_of_the_other_logit_form_is_refused_by_name():
    full = st.ActivationMap(3, 4, learnable=True, logit_form="full")
    factored = st.ActivationMap(3, 4, learnable=True)
    before = factored.state_dict()
    with pytest.raises(ValueError, match="logit_form='full'"):
        factored.load_state_dict(full.state_dict())
    for key, value in factored.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="logit_form='factored'"):
        full.load_state_dict(before)
