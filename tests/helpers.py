"""Shared test helpers: the digits data set and small training loops."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits scaled to [0, 1], a fixed stratified 75/25 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(
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
