"""Growth, pruning, memory growth, the GrowthController and the stats."""

import io
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import digits, train_growing_digits
from torch import nn

import spatium_torch as st
from spatium_torch import growth
from spatium_torch.neurons import Stage


def saturate(layer, neurons):
    """Activates every block of the given neurons (as writes through the point API would)."""
    mask = layer.region_mask()
    mask[neurons] = True
    layer.set_active_regions(mask)


def layer_with_empty_neuron(neuron):
    """A sparse layer whose `neuron` holds no block (its output is its bias)."""
    torch.manual_seed(0)
    layer = sparse_layer()
    mask = layer.region_mask()
    mask[neuron] = False
    layer.set_active_regions(mask)
    return layer


def sparse_layer(out=8, **kw):
    return st.SpatialLayer(64, out, region_bits=3, density=0.375, **kw)


def step(model, optimizer, x, target):
    loss = F.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


# --- layer level ------------------------------------------------------------------------------
def test_saturation_activity_and_should_split():
    layer = sparse_layer(growth_threshold=0.5)
    assert torch.allclose(layer.saturation(), torch.full((8,), 3 / 8))
    for neuron, xyz in ((2, (3, 3, 3)), (2, (3, 0, 3)), (5, (3, 3, 3))):
        layer.memory.write(neuron, xyz, 0.5)
    assert layer.saturation()[2] == 5 / 8 and layer.saturation()[5] == 4 / 8
    assert [layer.should_split(n) for n in range(8)] == [n == 2 for n in range(8)]
    with pytest.raises(IndexError):
        layer.should_split(8)
    layer.train()
    layer.track_activity = False  # measured after the relu below, as a controller does
    with torch.no_grad():
        layer.bias[:4] = -100.0  # these outputs are never positive
        layer.bias[4:] = 100.0  # these always are
    for _ in range(200):
        layer.update_activity(torch.relu(layer(torch.rand(16, 64))))
    assert (layer.activity[:4] < 0.01).all() and (layer.activity[4:] > 0.9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_track_activity_op_matches_the_reference(dtype):
    output = torch.randn(33, 70).to(dtype)
    output[:, 3] = 0
    output[::2, 5] = 0
    activity, mean = torch.rand(70), torch.randn(70)
    expected_activity = 0.9 * activity + 0.1 * (output != 0).float().mean(0)
    expected_mean = 0.9 * mean + 0.1 * output.double().mean(0).float()
    torch.ops.spatium.track_activity_(output, activity, mean, 0.1)
    torch.testing.assert_close(activity, expected_activity)
    torch.testing.assert_close(mean, expected_mean)
    args = (output.float(), activity, mean, 0.1)
    torch.library.opcheck(torch.ops.spatium.track_activity_.default, args)
    with pytest.raises(ValueError, match="statistics"):
        torch.ops.spatium.track_activity_(output, activity[:5], mean, 0.1)


@pytest.mark.parametrize("mode", ["duplicate", "partition"])
def test_grow_splits_the_saturated_neurons_and_training_goes_on(mode):
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [1, 6])
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.rand(64, 64), torch.rand(64, 3)
    before = [step(model, optimizer, x, target) for _ in range(5)]
    controller = st.GrowthController(model, optimizer, mode=mode)
    (event,) = controller.grow()
    assert (event.split, layer.out_features, model[2].in_features) == (2, 10, 10)
    assert torch.isfinite(model(x)).all()
    # Positions stay distinct and the outputs in Morton order of them.
    codes = st.morton_encode(layer.neuron_positions)
    assert (codes[1:] > codes[:-1]).all()
    after = [step(model, optimizer, x, target) for _ in range(60)]
    assert all(map(torch.isfinite, map(torch.tensor, after)))
    assert after[-1] < 0.5 * before[-1]
    if mode == "partition":
        blocks = layer.region_mask().sum(1)
        children = torch.nonzero(layer.split_cooldown).flatten()
        assert blocks[children].tolist() == [4, 4, 4, 4]  # 8 blocks split into halves


def splitting_model(consumer, *between):
    """A sparse 64-8 layer whose neurons 0, 3 and 5 are saturated (2 split at the next event),
    ``between`` modules, and a 4-output consumer: nn.Linear or an 8-bit SpatialLayer."""
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [0, 3, 5])
    head = nn.Linear(8, 4) if consumer == "linear" else st.SpatialLayer(8, 4, bits=8)
    return layer, head, nn.Sequential(layer, *between, head)


@pytest.mark.parametrize("consumer", ["linear", "spatial"])
def test_duplicate_split_without_perturbation_keeps_the_function(consumer):
    layer, head, model = splitting_model(consumer, nn.Tanh())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(32, 64)
    with torch.no_grad():
        before = model(x)
    controller = st.GrowthController(model, optimizer, perturbation=0.0)
    (event,) = controller.grow()
    assert event.split == 2  # at most a quarter of 8 per event
    with torch.no_grad():
        after = model(x)
    if consumer == "linear":
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    else:
        # The halved consumer weights are quantized again: the error is below half a code
        # step of each changed block (8 bits: a few thousandths here).
        torch.testing.assert_close(after, before, rtol=0, atol=5e-3)


def test_an_event_that_changes_nothing_keeps_the_parameters_in_the_optimizer():
    layer = sparse_layer()  # saturation 0.375: nothing splits, nothing is pruned
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    step(model, optimizer, torch.rand(4, 64), torch.rand(4, 2))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    controller = st.GrowthController(model, optimizer)
    assert controller.grow() == [] and controller.prune(0.001) == []
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert layer.weight is params[0] and layer.weight in optimizer.state


def test_growth_respects_the_bound_cooldown_and_max_neurons():
    layer = sparse_layer(out=8, growth_threshold=0.1, cooldown=1, max_neurons=14)
    widths = []
    for _ in range(4):
        change = layer.grow()
        widths.append(layer.out_features)
        assert change.split <= max(1, int(0.25 * (layer.out_features - change.split)))
    assert widths == [10, 12, 14, 14]
    # Children wait one event: at the second event only the original neurons split.
    layer = sparse_layer(out=8, growth_threshold=0.1, cooldown=1)
    first = layer.grow()
    children = torch.nonzero(torch.isin(first.rows, first.rows[first.moved])).flatten()
    second = layer.grow()
    assert not torch.isin(second.rows[second.moved], children).any()


def test_grid_dims_bound_growth_and_children_sit_next_to_their_parent():
    layer = sparse_layer(out=6, growth_threshold=0.1, grid_dims=(2, 2, 2), max_split_fraction=1.0)
    change = layer.grow()
    assert layer.out_features == 8  # the 2x2x2 grid is full
    assert layer.grow().split == 0
    parents = change.positions[~change.moved][
        torch.isin(change.rows[~change.moved], change.rows[change.moved])
    ]
    children = change.positions[change.moved]
    assert ((children - parents).abs().max(1).values <= 1).all()


# --- pruning ----------------------------------------------------------------------------------
def test_pruning_a_neuron_with_no_blocks_folds_its_output_into_the_consumer_bias():
    layer = layer_with_empty_neuron(4)
    model = nn.Sequential(layer, nn.Sigmoid(), st.SpatialLayer(8, 5, bits=8))
    optimizer = torch.optim.Adam(model.parameters())
    controller = st.GrowthController(model, optimizer)
    x = torch.rand(16, 64)
    with torch.no_grad():
        before = model(x)
    (event,) = controller.prune(0.01)
    assert (event.pruned, layer.out_features, model[2].in_features) == (1, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_pruning_a_trained_digits_layer_costs_little():
    x_train, _, y_train, _ = digits()
    torch.manual_seed(0)
    model = nn.Sequential(st.SpatialLayer(64, 64, region_bits=3), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    controller = st.GrowthController(model, optimizer)
    for _ in range(6):
        for start in range(0, len(x_train), 64):
            loss = F.cross_entropy(model(x_train[start : start + 64]), y_train[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        before = F.cross_entropy(model(x_train), y_train).item()
    (event,) = controller.prune(0.02)
    with torch.no_grad():
        after = F.cross_entropy(model(x_train), y_train).item()
    assert 0 < event.pruned < 64 and model[2].in_features == 64 - event.pruned
    assert after <= 1.1 * before


# --- the optimizer follows ----------------------------------------------------------------------
OPTIMIZERS = {
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    "sgd": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), ("momentum_buffer",)),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-2), ("square_avg",)),
}


@pytest.mark.parametrize("consumer", ["linear", "spatial"])
def test_fresh_split_adds_silent_new_neurons_with_fresh_optimizer_state(consumer):
    layer, head, model = splitting_model(consumer, nn.LayerNorm(8), nn.Tanh())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(32, 64)
    step(model, optimizer, x, torch.rand(32, 4))
    model.eval()  # the LayerNorm mixes features: its statistics change with a new neuron
    norm_free = nn.Sequential(model[0], model[2], model[3])
    with torch.no_grad():
        before = norm_free(x)
    parent_weight = layer.weight.detach().clone()
    mask = layer.block_mask()
    controller = st.GrowthController(model, optimizer, mode="fresh")
    (event,) = controller.grow()
    change = event.change
    children = torch.nonzero(change.moved).flatten()
    parents = change.rows[children]
    assert event.split == 2 and change.fresh
    # New weights, drawn in the parent's blocks only; bias 0; silent in the consumer.
    assert not torch.equal(layer.weight.detach()[children], parent_weight[parents])
    assert torch.equal(layer.weight.detach()[children] != 0, mask[parents])
    assert layer.weight.detach()[children].abs().max() <= 1 / 8  # +-1/sqrt(64)
    assert torch.equal(layer.bias.detach()[children], torch.zeros(2))
    consumer_weight = head.weight.detach()
    assert torch.equal(consumer_weight[:, children], torch.zeros(4, 2))
    with torch.no_grad():
        after = nn.Sequential(model[0], model[2], model[3])(x)
    # The function is unchanged, up to the order the consumer's product sums in (a BLAS may
    # block two more, zero, columns otherwise: 1.5e-8 on one CPU); a SpatialLayer consumer
    # quantizes its regrouped inputs again.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6 if consumer == "linear" else 5e-3)
    # The children's optimizer state starts at zero; the others keep theirs.
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[layer.weight][key]
        assert torch.equal(state[children], torch.zeros(2, 64))
        assert state[change.rows[~change.moved]].abs().sum() > 0
        assert torch.equal(optimizer.state[head.weight][key][:, children], torch.zeros(4, 2))
        assert torch.equal(optimizer.state[model[1].weight][key][children], torch.zeros(2))
    model.train()
    step(model, optimizer, x, torch.rand(32, 4))
    assert head.weight.detach()[:, children].abs().sum() > 0  # they start to learn


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_follows_splits_and_prunes(name):
    make, keys = OPTIMIZERS[name]
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [2, 7])
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 3))
    optimizer = make(model.parameters())
    x, target = torch.rand(32, 64), torch.rand(32, 3)
    for _ in range(3):
        step(model, optimizer, x, target)
    # Duplicated children inherit their parent's state (fresh ones start at zero: tested above).
    controller = st.GrowthController(model, optimizer, mode="duplicate")
    old = {
        key: [optimizer.state[p][key].clone() for p in (layer.weight, layer.bias, model[2].weight)]
        for key in keys
    }
    steps_before = optimizer.state[layer.weight].get("step")
    (event,) = controller.grow()
    rows = event.change.rows
    assert event.split == 2 and sorted(rows.tolist()) == sorted([*range(8), 2, 7])
    new_params = (layer.weight, layer.bias, model[2].weight)
    grouped = [q for g in optimizer.param_groups for q in g["params"]]
    assert all(any(p is q for q in grouped) for p in new_params) and len(grouped) == 4
    for key in keys:
        weight, bias, head = (optimizer.state[p][key] for p in new_params)
        old_weight, old_bias, old_head = old[key]
        assert weight.shape == (10, 64) and head.shape == (3, 10)
        assert torch.equal(weight, old_weight[rows]) and torch.equal(bias, old_bias[rows])
        assert torch.equal(head, old_head[:, rows])
    if steps_before is not None:
        assert torch.equal(optimizer.state[layer.weight]["step"], steps_before)
    step(model, optimizer, x, target)  # no shape errors

    # After a prune the surviving rows keep their state.
    before = {key: optimizer.state[layer.weight][key].clone() for key in keys}
    with torch.no_grad():
        layer.activity[[1, 4]] = 0.0
    controller.prune(0.01)
    kept = [r for r in range(10) if r not in (1, 4)]
    for key in keys:
        assert torch.equal(optimizer.state[layer.weight][key], before[key][kept])
    step(model, optimizer, x, target)


# --- the controller -----------------------------------------------------------------------------
def test_controller_grows_prunes_and_rewires_on_schedule():
    torch.manual_seed(0)
    # The target reads inputs far from every neuron's starting (local) regions, so the
    # gradient asks the neurons for more of their input space.
    layer = sparse_layer(growth_threshold=0.6, max_neurons=16)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    controller = st.GrowthController(
        model, optimizer, grow_every=20, prune_every=30, rewire_every=5, prune_threshold=0.001,
        grow_when="saturated",  # the losses given to record_loss are for the history only
    )  # fmt: skip
    with torch.no_grad():
        layer.bias[5] = -1e3  # a dead neuron: its relu output is always zero
        layer.activity[5] = 0.0
    x = torch.rand(256, 64)
    target = x[:, 56:].sum(1, keepdim=True)
    start = layer.saturation().clone()
    asked_for = layer.region_mask()[:, -1].float().mean()
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), target)
        controller.record_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    kinds = {(e.kind, e.step) for e in controller.events}
    assert {("rewire", s) for s in (5, 10, 15)} <= kinds
    assert {k for k, s in kinds if s % 20 and k == "grow"} == set()
    assert {(k, s) for k, s in kinds if k == "prune"} == {("prune", 30)}
    assert any(k == "grow" for k, _ in kinds) and layer.out_features > 8
    # Memory growth: neurons took regions the gradient asked for (the last region, 56..63).
    assert layer.saturation().mean() > start.mean()
    assert layer.region_mask()[:, -1].float().mean() >= asked_for + 0.25
    assert losses[-1] < 0.2 * losses[0]
    stats = st.network_stats(model)
    assert stats.layer_stats[0].neuron_count == layer.out_features == model[2].in_features
    assert stats.total_neurons == layer.out_features
    assert [r.step for r in controller.history.records] == [10, 20, 30, 40, 50, 60]
    assert controller.history.records[-1].widths == (layer.out_features,)
    controller.remove()
    events = len(controller.events)
    for _ in range(25):
        step(model, optimizer, x, target)
    assert len(controller.events) == events and layer.track_activity


def test_runaway_growth_is_bounded_per_event_and_stops_at_max_neurons():
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.05)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    st.GrowthController(
        model, optimizer, grow_every=1, rewire_every=1, max_neurons=40, max_split_fraction=0.25
    )
    x, target = torch.rand(32, 64), torch.rand(32, 1)
    widths = [8]
    for _ in range(12):
        step(model, optimizer, x, target)
        widths.append(layer.out_features)
    assert all(b - a <= max(1, a // 4) for a, b in zip(widths, widths[1:], strict=False))
    assert widths[-1] == 40 and max(widths) == 40


def test_norms_and_activation_maps_follow_the_layer():
    torch.manual_seed(0)
    layer = st.SpatialLayer(
        64,
        8,
        region_bits=3,
        density=0.375,
        activation="map",
        map_init="random",
        map_learnable=True,
        growth_threshold=0.8,
    )
    saturate(layer, [3])
    norm = nn.BatchNorm1d(8)
    layer_norm = nn.LayerNorm(8)
    model = nn.Sequential(layer, norm, layer_norm, nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.rand(32, 64)
    step(model, optimizer, x, torch.rand(32, 2))
    hits = layer.activation_map.hits.clone()
    neuron_logits = layer.activation_map.neuron_logits.detach().clone()
    cell_logits = layer.activation_map.cell_logits.detach().clone()
    table = layer.activation_map.function_table().clone()
    running = norm.running_mean.clone()
    controller = st.GrowthController(model, optimizer)
    (event,) = controller.grow()
    rows = event.change.rows
    assert norm.num_features == 9 and norm.weight.shape == (9,)
    assert torch.equal(norm.running_mean, running[rows])
    assert layer_norm.normalized_shape == (9,) and layer_norm.bias.shape == (9,)
    assert torch.equal(layer.activation_map.hits, hits[rows])
    # the neurons' logits and initial functions follow their rows, the cells' logits stay
    assert torch.equal(layer.activation_map.neuron_logits, neuron_logits[rows])
    assert torch.equal(layer.activation_map.cell_logits, cell_logits)
    assert torch.equal(layer.activation_map.function_table(), table[rows])
    for parameter in layer.activation_map.learnable_parameters().values():
        assert parameter in optimizer.state
    model.eval()
    assert model(x).shape == (32, 2)


@pytest.mark.parametrize("between", [nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Softmax(dim=-1)])
def test_controller_refuses_what_it_cannot_resize(between):
    model = nn.Sequential(sparse_layer(), between, nn.Linear(8, 2))
    with pytest.raises(ValueError, match=type(between).__name__):
        st.GrowthController(model, torch.optim.SGD(model.parameters(), lr=0.1))


def spatial_like(linear):
    return st.SpatialLayer(linear.in_features, linear.out_features, bias=linear.bias is not None)


def encoder(layers, swap):
    """An nn.TransformerEncoder whose named Linear modules of each layer are SpatialLayers."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), layers
    )
    for layer in model.layers:
        for name in swap:
            owner, _, attribute = f"x.{name}".rpartition(".")
            parent = layer if owner == "x" else layer.get_submodule(owner[2:])
            setattr(parent, attribute, spatial_like(getattr(parent, attribute)))
    return model


@pytest.mark.parametrize(
    ("layers", "swap", "match"),
    [
        (1, ["self_attn.out_proj"], "inside a MultiheadAttention"),
        (2, ["linear1", "linear2"], "residual stream"),
        (1, ["linear2"], None),  # the model's last layer: never resized, nothing to refuse
    ],
)
def test_transformer_layers_are_refused_or_left_alone(layers, swap, match):
    model = encoder(layers, swap)
    x = torch.rand(2, 5, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if match is None:
        controller = st.GrowthController(model, optimizer, grow_every=1, example_input=x)
        assert controller.grow() == [] and model(x).shape == x.shape
        return
    with pytest.raises(ValueError, match=match):
        st.GrowthController(model, optimizer, grow_every=1, example_input=x)


def test_a_transformer_feed_forward_layer_grows():
    model = encoder(1, ["linear1", "linear2"])
    for layer in model.layers:
        layer.linear1.growth_threshold = 0.0
    x = torch.rand(2, 5, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    controller = st.GrowthController(model, optimizer, grow_every=1, example_input=x)
    with pytest.warns(UserWarning, match="grow_when='auto' had no loss"):
        for _ in range(2):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert model.layers[0].linear1.out_features == 100  # 64 + 16, + 20
    assert model.layers[0].linear2.in_features == 100
    assert [event.layer for event in controller.events] == ["layers.0.linear1"] * 2
    assert model(x).shape == x.shape


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = sparse_layer(16, growth_threshold=0.0)
        self.act = nn.ReLU()
        self.outer = st.SpatialLayer(16, 64, region_bits=3, growth_threshold=0.0)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(x + self.outer(self.act(self.inner(x))))


def test_a_residual_is_found_before_any_event_changes_the_model():
    x = torch.rand(4, 64)
    model = ResidualMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'outer' changes width .*residual add"):
        st.GrowthController(model, optimizer, grow_every=50, example_input=x)
    # Without an example: at the first optimizer step, on the input of that step.
    controller = st.GrowthController(model, optimizer, grow_every=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.zero_grad()
    with pytest.raises(ValueError, match="'outer' changes width"):
        optimizer.step()  # no gradients: the step leaves the weights as they are
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert controller.events == [] and model(x).shape == (4, 2)
    with pytest.raises(ValueError, match="example input"):
        st.GrowthController(ResidualMLP(), optimizer).check_resizes()


def tiny_llama(swap):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:
        for name in swap:
            owner, _, attribute = name.rpartition(".")
            parent = layer.get_submodule(owner)
            setattr(parent, attribute, spatial_like(getattr(parent, attribute)))
    return model


@pytest.mark.parametrize(
    ("swap", "match"),
    [
        (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "takes 32 inputs"),
        (["mlp.up_proj"], "'model.layers.0.mlp.up_proj' changes width"),
        (["mlp.down_proj"], "cannot resize 'model.layers.0.mlp.act_fn'"),
        (["self_attn.v_proj", "self_attn.o_proj"], "o_proj' takes 32 inputs"),
    ],
)
def test_a_tiny_llama_is_refused_with_a_clear_error(swap, match):
    model = tiny_llama(swap)
    ids = torch.randint(0, 64, (2, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        st.GrowthController(model, optimizer, grow_every=1, example_input=ids)
    assert model(ids).logits.shape == (2, 8, 64)


def test_growth_settings_that_cannot_do_what_they_say_warn():
    dense = nn.Sequential(st.SpatialLayer(64, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="one block per neuron"):
        st.GrowthController(
            dense, torch.optim.SGD(dense.parameters(), lr=0.1), grow_every=10, mode="partition"
        )
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="every neuron of SpatialLayer '0' is saturated"):
        st.GrowthController(dense, optimizer, grow_every=10, grow_when="saturated")
    # The default decides from the loss when it has one, so it warns only at a check without.
    x, target = torch.randn(16, 64), torch.randn(16, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded = st.GrowthController(dense, optimizer, grow_every=1)
        for _ in range(3):
            loss = F.mse_loss(dense(x), target)
            optimizer.zero_grad()
            loss.backward()
            recorded.record_loss(loss)  # before the step, whose hook runs the check
            optimizer.step()
    recorded.remove()
    st.GrowthController(dense, optimizer, grow_every=1)
    with pytest.warns(UserWarning, match="grow_when='auto' had no loss to decide from"):
        step(dense, optimizer, x, target)
    sparse = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.GrowthController(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), grow_every=10)


def test_growth_warns_once_when_a_layer_becomes_saturated():
    # A sparse layer starts unsaturated (no warning); once every neuron is saturated, growth
    # on saturation no longer depends on anything: the controller says so, once.
    torch.manual_seed(0)
    model = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.GrowthController(model, optimizer, grow_every=1, max_neurons=64)
        step(model, optimizer, x, target)
    model[0].growth_threshold = 0.3  # under every neuron's saturation, 3 of 8 regions
    with pytest.warns(UserWarning, match="SpatialLayer '0' has become, at step 2, saturated"):
        step(model, optimizer, x, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, optimizer, x, target)
    assert model[0].out_features > 8


def test_controller_bad_settings():
    model = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grow_every"):
        st.GrowthController(model, optimizer, grow_every=0)
    with pytest.raises(ValueError, match="mode"):
        st.GrowthController(model, optimizer, mode="clone")
    with pytest.raises(ValueError, match="drop_ratio"):
        st.GrowthController(model, optimizer, drop_ratio=-1)
    with pytest.raises(ValueError, match="takes 7 inputs"):
        st.GrowthController(nn.Sequential(sparse_layer(), nn.Linear(7, 2)), optimizer)
    with pytest.raises(ValueError, match="no SpatialLayer"):
        st.GrowthController(nn.Sequential(nn.Linear(3, 2)), optimizer)
    with pytest.raises(TypeError, match="optimizer"):
        st.GrowthController(model, model)
    with pytest.raises(ValueError, match="frozen"):
        st.freeze(model[0]).grow()


def test_a_failed_resize_leaves_model_and_optimizer_as_they_were(monkeypatch):
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [0, 1])
    model = nn.Sequential(layer, nn.ReLU(), st.SpatialLayer(8, 3))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.rand(16, 64)
    step(model, optimizer, x, torch.rand(16, 3))
    controller = st.GrowthController(model, optimizer)
    with torch.no_grad():
        outputs = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("spatium_torch.growth._stage_optimizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        controller.grow()
    assert layer.out_features == 8 and model[2].in_features == 8
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [p for g in optimizer.param_groups for p in g["params"]] == params
    for p, saved in zip(params, moments, strict=True):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    with torch.no_grad():
        assert torch.equal(model(x), outputs)


def grown_model():
    """A 64-16-3 model (a LayerNorm between its layers) after one Adam step, whose first layer
    splits 4 neurons at the next growth event, with its controller; the same every call."""
    torch.manual_seed(0)
    layer = sparse_layer(16, growth_threshold=0.8)
    saturate(layer, [1, 5, 9, 12])
    model = nn.Sequential(layer, nn.LayerNorm(16), nn.ReLU(), st.SpatialLayer(16, 3, region_bits=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.rand(16, 64), torch.rand(16, 3)
    step(model, optimizer, x, target)
    return model, optimizer, st.GrowthController(model, optimizer), x, target


def fail_after(stage):
    """The stage, whose commit raises once it has run."""

    def commit():
        stage.commit()
        raise RuntimeError("injected")

    return Stage(commit, stage.replaced)


def fail_in_consumer_commit(model, monkeypatch):
    # Half way through: the consumer's store and latent weight are in, its input order is not.
    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(model[3], "_set_input_order", broken)


def fail_after_stage(builder):
    def inject(model, monkeypatch):
        build = getattr(growth, builder)
        monkeypatch.setattr(growth, builder, lambda *args: fail_after(build(*args)))

    return inject


def fail_after_producer_commit(model, monkeypatch):
    plan = st.SpatialLayer.plan_growth

    def planned(self, *args):
        change, stage = plan(self, *args)
        return change, fail_after(stage)

    monkeypatch.setattr(st.SpatialLayer, "plan_growth", planned)


COMMIT_FAILURES = {
    "producer": fail_after_producer_commit,
    "layer norm": fail_after_stage("_stage_tail_module"),
    "consumer, half way": fail_in_consumer_commit,
    "consumer": fail_after_stage("_stage_consumer"),
    "optimizer (everything committed)": fail_after_stage("_stage_optimizer"),
}


@pytest.mark.parametrize("inject", COMMIT_FAILURES.values(), ids=COMMIT_FAILURES.keys())
def test_a_failed_commit_puts_model_and_optimizer_back(inject, monkeypatch):
    model, optimizer, controller, x, target = grown_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    arrays = [list(m.store.arrays()) for m in (model[0], model[3])]
    groups = [list(g["params"]) for g in optimizer.param_groups]
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in parameters]
    inject(model, monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        controller.grow()
    monkeypatch.undo()
    assert (model[0].out_features, model[1].normalized_shape, model[3].in_features) == (
        16,
        (16,),
        16,
    )
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p is q for p, q in zip(model.parameters(), parameters, strict=True))
    for layer, held in zip((model[0], model[3]), arrays, strict=True):
        assert all(t is u for t, u in zip(layer.store.arrays(), held, strict=True))
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert list(optimizer.state) == parameters
    for p, saved in zip(parameters, moments, strict=True):
        assert optimizer.state[p].keys() == saved.keys()
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    assert controller.events == []
    # The next step is the step of a model that never tried to grow.
    twin, twin_optimizer, _, _, _ = grown_model()
    assert step(model, optimizer, x, target) == step(twin, twin_optimizer, x, target)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    (event,) = controller.grow()
    assert event.split == 4 and model[3].in_features == 20


@pytest.mark.parametrize("perturbation", [float("inf"), float("nan"), -0.1])
def test_a_non_finite_or_negative_perturbation_is_refused(perturbation):
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.0)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="perturbation must be a finite non-negative number"):
        layer.grow(perturbation=perturbation)
    assert layer.out_features == 8 and torch.equal(layer.weight, weight)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="perturbation"):
        st.GrowthController(model, optimizer, perturbation=perturbation)
    controller = st.GrowthController(model, optimizer)
    controller.perturbation = perturbation
    with pytest.raises(ValueError, match="perturbation"):
        controller.grow()
    assert layer.out_features == 8 and torch.equal(layer.weight, weight)


def test_spatial_network_grows_prunes_and_reports():
    torch.manual_seed(0)
    net = st.SpatialNetwork([4, 16, 4], growth_threshold=0.5)
    x = torch.randn(64, 4)
    for _ in range(30):
        net.train_batch(x, x)
    stats = net.stats()
    assert (stats.layer_count, stats.total_neurons) == (2, 20)
    assert stats.layer_stats[0].growth_candidates == 16
    (event,) = net.grow()
    assert event.split == 4 and net[0].out_features == 20 and net[2].in_features == 20
    assert event.loss_before is not None
    with torch.no_grad():
        net[0].activity[:3] = 0.0
    (event,) = net.prune()
    assert event.pruned >= 3 and net[2].in_features == net[0].out_features
    assert net.train_batch(x, x) < 1.0


def test_a_grown_model_saves_and_loads_into_a_model_of_its_widths():
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8, activation="map", map_init="random")
    saturate(layer, [1, 2, 5])
    model = nn.Sequential(layer, nn.ReLU(), st.SpatialLayer(8, 4, region_bits=2))
    controller = st.GrowthController(model, torch.optim.SGD(model.parameters(), lr=0.1))
    controller.grow()
    controller.grow()
    x = torch.rand(8, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = nn.Sequential(
        st.SpatialLayer(64, 11, region_bits=3, activation="map", map_init="random"),
        nn.ReLU(),
        st.SpatialLayer(11, 4, region_bits=2),
    ).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert torch.equal(fresh[0].neuron_positions, layer.neuron_positions)
    assert torch.equal(fresh[2].input_positions, model[2].input_positions)
    # A state of other widths is refused before anything changes.
    small = nn.Sequential(sparse_layer(), nn.ReLU(), st.SpatialLayer(8, 4, region_bits=2))
    before = {k: v.clone() for k, v in small.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="shape"):
        small.load_state_dict(model.state_dict())
    after = small.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def build_for_checkpoints():
    """A 40-8-6-3 model with every kind of module growth resizes: a layer-owned learnable
    activation map, BatchNorm1d and LayerNorm, a SpatialLayer and an nn.Linear consumer."""
    torch.manual_seed(0)
    return nn.Sequential(
        st.SpatialLayer(40, 8, region_bits=3, activation="map", map_learnable=True),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        st.SpatialLayer(8, 6, region_bits=2, density=0.5),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


def grown_checkpoint(events=3):
    """A model of build_for_checkpoints() grown and trained, and an input."""
    model = build_for_checkpoints()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    controller = st.GrowthController(model, optimizer, growth_threshold=0.0, max_split_fraction=0.5)
    x, target = torch.rand(32, 40), torch.rand(32, 3)
    for _ in range(events):
        controller.grow()
        step(model, optimizer, x, target)
    return model.eval(), x


@pytest.mark.parametrize("frozen", [False, True])
def test_a_grown_checkpoint_loads_into_a_freshly_built_model(frozen):
    model, x = grown_checkpoint()
    assert (model[0].out_features, model[3].out_features) == (16, 12)
    if frozen:
        st.freeze(model)
    state = model.state_dict()
    fresh = build_for_checkpoints()
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(state)
    assert st.load_grown(fresh, state) == ([], [])
    assert fresh[0].frozen == frozen and fresh[1].num_features == 16
    assert fresh[4].normalized_shape == (12,) and fresh[6].in_features == 12
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_match_widths_then_training_goes_on_and_pruned_checkpoints_load():
    model, x = grown_checkpoint(events=1)
    state = model.state_dict()
    fresh = build_for_checkpoints()
    assert st.match_widths(fresh, state) == {"0": (8, 12), "3": (6, 9)}
    assert st.match_widths(fresh, state) == {}  # widths match now: nothing to do
    st.load_state_dict(fresh, state)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh.train()
    losses = [step(fresh, optimizer, x, torch.zeros(32, 3)) for _ in range(20)]
    assert losses[-1] < losses[0]
    # Narrower than the built model: a pruned checkpoint.
    narrow = build_for_checkpoints()
    controller = st.GrowthController(narrow, torch.optim.SGD(narrow.parameters(), lr=0.1))
    narrow[0].activity[[2, 5]] = 0.0  # idle: pruned at the next event
    controller.prune(threshold=0.5)
    assert narrow[0].out_features == 6
    again = build_for_checkpoints()
    st.load_grown(again, narrow.state_dict())
    assert again[0].out_features == 6 and again[3].in_features == 6


def test_a_checkpoint_that_cannot_load_leaves_the_fresh_model_as_it_was():
    model, _ = grown_checkpoint(events=1)
    fresh = build_for_checkpoints()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def unchanged():
        after = fresh.state_dict()
        return after.keys() == before.keys() and all(
            torch.equal(after[k], before[k]) for k in before
        )

    damaged = model.state_dict()
    damaged["6.weight"] = torch.zeros(3, 5)  # the head's weight of another width
    with pytest.raises(RuntimeError, match="size mismatch"):
        st.load_grown(fresh, damaged)
    assert unchanged() and fresh[0].out_features == 8 and fresh[3].in_features == 8
    # The last layer's width is the model's: another model's state.
    head = nn.Sequential(st.SpatialLayer(40, 8, region_bits=3), nn.ReLU(), st.SpatialLayer(8, 5))
    torch.manual_seed(0)
    mine = nn.Sequential(st.SpatialLayer(40, 8, region_bits=3), nn.ReLU(), st.SpatialLayer(8, 6))
    kept = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(ValueError, match="last layer"):
        st.match_widths(mine, head.state_dict())
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in kept.items())
    assert unchanged()


def test_a_consumer_learnable_map_stays_in_the_optimizer():
    torch.manual_seed(0)
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [1, 2])
    head = st.SpatialLayer(8, 3, activation="map", map_learnable=True)
    model = nn.Sequential(layer, nn.ReLU(), head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.rand(16, 64), torch.rand(16, 3)
    step(model, optimizer, x, target)
    st.GrowthController(model, optimizer).grow()
    for name, logits in head.activation_map.learnable_parameters().items():
        assert any(p is logits for g in optimizer.param_groups for p in g["params"]), name
        assert logits in optimizer.state
    before = head.activation_map.neuron_logits.detach().clone()
    step(model, optimizer, x, target)
    assert not torch.equal(head.activation_map.neuron_logits, before)


def test_pruning_a_float64_model_through_batchnorm_folds_exactly():
    layer = layer_with_empty_neuron(6)
    model = nn.Sequential(layer, nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = st.GrowthController(model, optimizer)
    model(torch.rand(32, 64, dtype=torch.float64))  # BatchNorm's running statistics move
    model.eval()
    x = torch.rand(8, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    (event,) = controller.prune(0.01)
    assert event.pruned == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-9)


def test_copies_and_pickles_of_a_controlled_model_measure_themselves(tmp_path):
    import copy

    model = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    st.GrowthController(model, optimizer)
    twin = copy.deepcopy(model)
    activity = model[0].activity.clone()
    with torch.no_grad():
        twin[0].bias.fill_(-1e3)  # the twin's neurons go silent
    twin(torch.rand(16, 64))
    assert torch.equal(model[0].activity, activity)
    assert (twin[0].activity < 1).all()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded(torch.rand(4, 64))
    net = st.SpatialNetwork([4, 8, 2], growth_threshold=0.5)
    net.controller.grow_every = 1
    copied = copy.deepcopy(net)
    for _ in range(2):  # the default, Progress on the recorded losses, grows at check 2
        copied.train_batch(torch.randn(8, 4), torch.randn(8, 2))
    assert copied[0].out_features == 10 and net[0].out_features == 8


def test_what_the_controller_refuses_or_resets():
    relu = nn.ReLU()
    shared = nn.Sequential(sparse_layer(), relu, st.SpatialLayer(8, 8), relu, nn.Linear(8, 2))
    with pytest.raises(ValueError, match="same ReLU"):
        st.GrowthController(shared, torch.optim.SGD(shared.parameters(), lr=0.1))
    # Adafactor's factored state has other shapes than its parameters: a resize is refused and
    # nothing changes.
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [0])
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adafactor(model.parameters())
    step(model, optimizer, torch.rand(4, 64), torch.rand(4, 2))
    controller = st.GrowthController(model, optimizer)
    with pytest.raises(ValueError, match="Adafactor"):
        controller.grow()
    assert layer.out_features == 8 and layer.weight in optimizer.state
    # Statistics measured before the activation are dropped when the controller takes over.
    fresh = sparse_layer().train()
    fresh(torch.rand(8, 64))
    st.GrowthController(nn.Sequential(fresh, nn.ReLU(), nn.Linear(8, 2)), optimizer)
    assert (fresh.activity == 1).all() and (fresh.output_mean == 0).all()


def test_resizes_keep_frozen_parameters_frozen_and_slices_work():
    layer = sparse_layer(growth_threshold=0.8)
    saturate(layer, [0])
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2))
    layer.bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    st.GrowthController(model, torch.optim.SGD(model.parameters(), lr=0.1)).grow()
    assert not layer.bias.requires_grad and not model[2].weight.requires_grad
    assert layer.weight.requires_grad
    net = st.SpatialNetwork([4, 8, 2])
    assert isinstance(net[:1], nn.Sequential) and net[:1][0] is net[0]


# --- growth pays --------------------------------------------------------------------------------
def test_growth_pays_on_digits():
    """The issue's experiment: a 64-8-10 spatial MLP with memory growth, with and without
    neuron growth, same steps, 4 seeds (the prototype: 95.9% without, 96.5% duplicate, 95.7%
    partition)."""
    runs = {
        mode: [train_growing_digits(mode, seed) for seed in range(4)]
        for mode in (None, "duplicate", "partition")
    }
    accuracy = {mode: statistics.mean(r[0] for r in rs) for mode, rs in runs.items()}
    for mode in ("duplicate", "partition"):
        assert all(model[0].out_features > 8 for _, model, _ in runs[mode])
        assert accuracy[mode] > accuracy[None]
    changes = [
        e.loss_after / e.loss_before
        for _, _, controller in runs["duplicate"]
        for e in controller.events
        if e.kind == "grow"
    ]
    assert statistics.median(changes) < 1.1


def test_a_seeded_controller_draws_the_same_perturbations_whatever_the_global_generator():
    def grown(global_seed):
        torch.manual_seed(0)
        layer = sparse_layer(growth_threshold=0.8)
        saturate(layer, [1, 2, 5])
        model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2))
        controller = st.GrowthController(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=7)
        torch.manual_seed(global_seed)
        controller.grow()
        return layer.weight.detach().clone()

    assert torch.equal(grown(1), grown(2))
    assert grown(1).shape == (10, 64)  # 2 of the 3 saturated split: a quarter of 8


# --- growth when learning stalls ---------------------------------------------------------------
def test_plateau_grows_when_learning_stalls_and_stops_when_growth_stops_paying():
    plateau = st.Plateau(patience=2, tolerance=0.01, min_gain=0.05)
    decisions = [
        plateau.should_grow(loss)
        # learning, stalled twice: grow; learning again, stalled twice: the growth paid (1.0 ->
        # 0.8), grow; stalled at 0.78: under 5% below 0.8, so growing stopped paying
        for loss in (2.0, 1.5, 1.0, 1.0, 1.2, 0.9, 0.8, 0.8, 0.85, 0.78, 0.79, 0.79, 0.5, 0.5)
    ]
    grew = [i for i, d in enumerate(decisions) if d]
    assert grew == [4, 8] and plateau.stopped and plateau.best_at_growth == 0.8
    for bad in (dict(patience=0), dict(patience=1.5), dict(tolerance=-0.1), dict(min_gain=1.0)):
        with pytest.raises(ValueError):
            st.Plateau(**bad)
    with pytest.raises(ValueError, match="finite"):
        st.Plateau().should_grow(float("nan"))


def test_progress_grows_while_the_loss_improves_and_stops_when_it_does_not():
    progress = st.Progress(window=2, min_gain=0.05)
    decisions = [
        progress.should_grow(loss)
        # check 2 grows (the first window); from check 4 on, the best of the last two checks
        # against the best of the two before: 0.8 -> 0.6, 0.7 -> 0.55, 0.6 -> 0.54 grow;
        # 0.55 -> 0.53 (under min_gain) does not, and growth stops for good
        for loss in (0.9, 0.8, 0.7, 0.6, 0.55, 0.54, 0.53, 0.1)
    ]
    grew = [i + 1 for i, d in enumerate(decisions) if d]
    assert grew == [2, 4, 5, 6] and progress.stopped
    for bad in (
        dict(window=0), dict(window=1.5), dict(window=True),
        dict(min_gain=-0.1), dict(min_gain=float("nan")), dict(min_gain=True),
    ):  # fmt: skip
        with pytest.raises(ValueError):
            st.Progress(**bad)
    with pytest.raises(ValueError, match="finite"):
        st.Progress().should_grow(float("inf"))


def test_a_progress_controller_grows_while_its_closure_improves():
    torch.manual_seed(0)
    model = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run = {}
    # A held-out error that falls by 0.1 a check to 0.2, then stays (the closure is also read
    # around each event, for the log).
    controller = run["controller"] = st.GrowthController(
        model, optimizer, grow_every=1, grow_when="progress", max_split_fraction=0.5,
        cooldown=0, closure=lambda: max(0.2, 0.6 - 0.1 * run["controller"].steps),
        max_neurons=64,
    )  # fmt: skip
    x = torch.rand(4, 64)
    widths = []
    for _ in range(8):
        model(x).sum().backward()
        optimizer.step()
        widths.append(model[0].out_features)
    # check 2 grows, check 4 (best 0.4 -> 0.2) and 5 (0.3 -> 0.2) grow, each by half the
    # layer; check 6 (0.2 -> 0.2) stops growth for good
    assert [event.step for event in controller.events] == [2, 4, 5]
    assert widths == [8, 12, 12, 18, 27, 27, 27, 27] and controller.grow_when.stopped


def test_the_default_decides_from_the_loss_when_it_has_one():
    # Every neuron of a dense layer is saturated: growth on saturation would split at every
    # check. The default asks a Progress when the check has a loss.
    torch.manual_seed(0)
    x = torch.rand(4, 16)

    def run(closure_of=None):
        model = nn.Sequential(st.SpatialLayer(16, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        closure = None if closure_of is None else closure_of(model)
        controller = st.GrowthController(
            model, optimizer, grow_every=1, max_split_fraction=0.5, max_neurons=40,
            closure=closure,
        )  # fmt: skip
        for _ in range(8):
            model(x).sum().backward()
            controller.record_loss(torch.tensor(1.0))
            optimizer.step()
        assert controller.grow_when == "auto" and isinstance(controller.criterion, st.Progress)
        return [e.step for e in controller.events], model[0].out_features, controller

    # On the flat recorded loss: one growth at check 2 (its window), stopped for good at 4.
    steps, width, controller = run()
    assert (steps, width, controller.criterion.stopped) == ([2], 12, True)
    # A closure is asked before the recorded losses: an error that falls as the layer widens
    # keeps it growing (check 3 compares too few checks; at check 5 every neuron is in its
    # split cooldown).
    steps, width, controller = run(lambda model: lambda: 1.0 / model[0].out_features)
    assert (steps, width, controller.criterion.stopped) == ([2, 4, 6, 7], 32, False)


def test_a_plateau_controller_grows_once_then_stops_on_a_flat_loss():
    torch.manual_seed(0)
    model = nn.Sequential(sparse_layer(), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    controller = st.GrowthController(
        model, optimizer, grow_every=1, grow_when=st.Plateau(patience=1), max_split_fraction=0.5
    )
    x = torch.rand(4, 64)
    for _ in range(6):
        model(x).sum().backward()
        controller.record_loss(1.0)
        optimizer.step()
    # check 1 sets the best, check 2 finds a plateau and grows (every neuron with blocks may
    # split: none is saturated), check 3 finds the growth did not lower the loss and stops
    assert [event.kind for event in controller.events] == ["grow"]
    assert model[0].out_features == 12 and controller.grow_when.stopped
    silent = st.GrowthController(model, optimizer, grow_every=1, grow_when="plateau")
    model(x).sum().backward()
    with pytest.raises(ValueError, match="record_loss"):
        optimizer.step()
    silent.remove()
    with pytest.raises(ValueError, match="grow_when"):
        st.GrowthController(model, optimizer, grow_when="sometimes")


LOSS_CRITERIA = {
    "auto": lambda: "auto",
    "saturated": lambda: "saturated",
    "plateau": lambda: st.Plateau(patience=1, tolerance=0.0, min_gain=0.0),
    "progress": lambda: st.Progress(window=1, min_gain=0.0),
}


def controller_run(steps, resume_at=None, when="saturated"):
    """Trains a small growing model `steps` steps (growth, pruning and rewiring on schedule);
    with `resume_at`, saves model, optimizer and controller there, loads them into freshly
    built ones (through torch.save / torch.load(weights_only=True)) and goes on."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            st.SpatialLayer(20, 6, region_bits=2, density=0.5), nn.ReLU(),
            st.SpatialLayer(6, 5, region_bits=1), nn.Tanh(), nn.Linear(5, 3),
        )  # fmt: skip
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def control(model, optimizer):
        return st.GrowthController(
            model, optimizer, grow_every=4, prune_every=7, rewire_every=3, seed=5,
            growth_threshold=0.0, prune_threshold=0.3, max_neurons=12,
            grow_when=LOSS_CRITERIA[when](),
        )  # fmt: skip

    model, optimizer = build()
    controller = control(model, optimizer)
    data = torch.Generator().manual_seed(1)
    x, target = torch.rand(16, 20, generator=data), torch.rand(16, 3, generator=data)
    for index in range(steps):
        if index == resume_at:
            saved = io.BytesIO()
            states = (model.state_dict(), optimizer.state_dict(), controller.state_dict())
            torch.save(states, saved)
            saved.seek(0)
            model_state, optimizer_state, controller_state = torch.load(saved, weights_only=True)
            model, optimizer = build()
            st.load_grown(model, model_state)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            optimizer.load_state_dict(optimizer_state)
            controller = control(model, optimizer)
            controller.load_state_dict(controller_state)
        controller.record_loss(step(model, optimizer, x, target))
    return model, controller


@pytest.mark.parametrize("when", sorted(LOSS_CRITERIA))
def test_a_resumed_controller_makes_the_same_events_as_an_uninterrupted_one(when):
    straight, straight_controller = controller_run(30, when=when)
    resumed, resumed_controller = controller_run(30, resume_at=11, when=when)

    def log(controller):
        return [
            (e.step, e.layer, e.kind, e.split, e.pruned, e.rewired, e.widths)
            for e in controller.events
        ]

    assert {e.kind for e in straight_controller.events} == {"grow", "prune", "rewire"}
    assert any(e.step > 11 and e.kind == "grow" for e in straight_controller.events)
    assert log(resumed_controller) == log(straight_controller)
    assert resumed_controller.history.records == straight_controller.history.records
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_controller_state_that_does_not_fit_is_refused_whole():
    model = nn.Sequential(st.SpatialLayer(8, 4), nn.ReLU(), nn.Linear(4, 2))
    controller = st.GrowthController(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = controller.state_dict()
    plateau = st.GrowthController(
        model, torch.optim.SGD(model.parameters(), lr=0.1), grow_when="plateau"
    )
    with pytest.raises(ValueError, match="grow_when"):
        plateau.load_state_dict(state)
    progress = st.GrowthController(
        model, torch.optim.SGD(model.parameters(), lr=0.1), grow_when="progress"
    )
    with pytest.raises(ValueError, match="grow_when='plateau'"):
        progress.load_state_dict(plateau.state_dict())
    with pytest.raises(ValueError, match="grow_when='progress', this one has grow_when='auto'"):
        controller.load_state_dict(progress.state_dict())
    with pytest.raises(ValueError, match=r"lacks \['steps'\]"):
        controller.load_state_dict({k: v for k, v in state.items() if k != "steps"})
    wider = {**state, "activity": {"0": torch.zeros(5)}}
    with pytest.raises(ValueError, match="load the model's state first"):
        controller.load_state_dict(wider)
    assert plateau.steps == 0 and controller.steps == 0
    assert torch.equal(model[0].activity, torch.ones(4))
