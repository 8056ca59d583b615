"""Shared test helpers: the digits data set and small training loops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatium_torch as st
from spatium_torch import GrowthController


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits scaled to [0, 1], a fixed stratified 75/25 split. (Imported here:
    the GPU check runs the device tests on machines without scikit-learn, skipping these.)"""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, x_test, y_train, y_test


def train_digits(model: nn.Module, epochs: int = 30, seed: int = 0) -> float:
    """Trains `model` on digits with Adam (lr 3e-3, batch 64); returns the test accuracy."""
    x_train, x_test, y_train, y_test = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def train_digits_mlp(make_layer, epochs: int = 30, seed: int = 0) -> float:
    """Trains Sequential(make_layer(64, 128), ReLU, make_layer(128, 10)); returns the test
    accuracy."""
    torch.manual_seed(seed)
    model = nn.Sequential(make_layer(64, 128), nn.ReLU(), make_layer(128, 10))
    return train_digits(model, epochs, seed)


def train_growing_digits(
    mode: str | None, seed: int, steps: int = 1800, lr: float = 3e-3, **controller_kwargs
) -> tuple[float, nn.Module, GrowthController | None]:
    """Trains the 64-8-10 spatial MLP of the growth issue (4-bit, region_bits 3, density
    0.375, memory growth every 25 steps) for `steps` Adam steps (batch 64, rate `lr`), with
    neuron growth every 250 steps in `mode` ("duplicate"/"partition") or none; returns (test
    accuracy, model, controller). The controller's closure is the training loss, so every
    event logs its loss change."""
    x_train, x_test, y_train, y_test = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(
        st.SpatialLayer(64, 8, bits=4, region_bits=3, density=0.375),
        nn.ReLU(),
        st.SpatialLayer(8, 10, bits=4, region_bits=3),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    settings = dict(rewire_every=25, closure=lambda: F.cross_entropy(model(x_train), y_train))
    if mode is not None:
        settings.update(grow_every=250, mode=mode)
    settings.update(controller_kwargs)
    controller = st.GrowthController(model, optimizer, **settings)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train) - 63, 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, model, controller


def second_format(layer: st.SpatialLayer, state: dict, prefix: str = "") -> dict:
    """``state`` (``layer``'s own, saved with the packed store) as the second state format saved
    it: every store array its own entry, the header an int64 tensor, positions always kept, an
    activation map's table one byte a cell."""
    state = dict(state)
    packed = state.pop(prefix + "store.packed")
    header = packed[: 8 * len(st.store.HEADER)].clone().view(torch.int64)
    header[0] = 2
    state[prefix + "store.header"] = header
    for name, value in layer.store.host().parts().items():
        state[prefix + "store." + name] = value
    for name in ("input_positions", "neuron_positions"):
        state[prefix + name] = layer.get_buffer(name).clone()
    table = prefix + "activation_map.table"
    if table in state:
        state[table] = st.activation.unpack_nibbles(state[table])
    return state
