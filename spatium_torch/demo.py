"""The main job for now: digits (scikit-learn) with an nn.Linear MLP against SpatialLayer MLPs at
1/2/4/8 bits and one sparse variant; prints test accuracy, weight bytes, train time and batch-1
latency. Run with ``python -m spatium_torch.demo`` (``make demo``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import spatium_torch as st

EPOCHS = 30
BATCH = 64
LR = 3e-3
HIDDEN = 128


@dataclass
class Result:
    name: str
    accuracy: float
    weight_bytes: int
    train_seconds: float
    latency_us: float


def load_digits_split() -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits scaled to [0, 1]; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=0, stratify=y))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as deployed: fp32 for nn.Linear (weight and bias), the frozen store
    plus the fp32 bias for SpatialLayer."""
    total = 0
    for module in model.modules():
        if isinstance(module, st.SpatialLayer):
            total += module.memory.bytes + (
                4 * module.out_features if module.bias is not None else 0
            )
        elif isinstance(module, nn.Linear):
            total += 4 * sum(p.numel() for p in module.parameters())
    return total


def latency_us(model: nn.Module, sample: torch.Tensor, repeats: int = 300) -> float:
    """Median batch-1 inference latency in microseconds."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(sample)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def run(name: str, make_layer: Callable[[int, int], nn.Module], data: tuple) -> Result:
    """Trains the 64-128-10 MLP made of `make_layer` and measures it."""
    x_train, x_test, y_train, y_test = data
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(64, HIDDEN), nn.ReLU(), make_layer(HIDDEN, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), BATCH):
            batch = order[i : i + BATCH]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    st.freeze(model)  # deployed form: the stores are the only copy of the weights
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return Result(name, accuracy, weight_bytes(model), train_seconds, latency_us(model, x_test[:1]))


def main() -> None:
    """Runs the comparison and prints the table."""
    data = load_digits_split()
    configs: list[tuple[str, Callable[[int, int], nn.Module]]] = [("nn.Linear", nn.Linear)]
    for bits in (8, 4, 2, 1):
        configs.append(
            (f"SpatialLayer {bits}-bit", lambda i, o, b=bits: st.SpatialLayer(i, o, bits=b))
        )
    configs.append(
        (
            "SpatialLayer 4-bit, density 0.25",
            lambda i, o: st.SpatialLayer(i, o, bits=4, density=0.25, region_bits=3),
        )
    )
    print(
        f"digits, MLP 64-{HIDDEN}-10, Adam lr {LR}, {EPOCHS} epochs, batch {BATCH}, "
        f"{torch.get_num_threads()} threads\n"
    )
    header = (
        f"{'model':<34}{'test acc':>9}{'weight bytes':>14}{'vs fp32':>9}{'train s':>9}"
        f"{'batch-1 us':>12}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for name, make in configs:
        r = run(name, make, data)
        results.append(r)
        base = results[0]
        print(
            f"{r.name:<34}{100 * r.accuracy:>8.1f}%{r.weight_bytes:>14,}"
            f"{base.weight_bytes / r.weight_bytes:>8.1f}x{r.train_seconds:>9.2f}"
            f"{r.latency_us:>12.1f}",
            flush=True,
        )
    print(
        "\nweight bytes: nn.Linear fp32 weights and biases; SpatialLayer frozen stores (codes, "
        "scales, directory, bloom filter, tables) plus fp32 biases."
    )


if __name__ == "__main__":
    main()
