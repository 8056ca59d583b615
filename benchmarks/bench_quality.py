"""Learning quality on MNIST-1D: nn.Linear against SpatialLayer at every code width, a sparse
one and one with a learnable activation map, all trained the same way.

The recipe of the quantization issue: MNIST-1D as the ``mnist1d`` package generates it offline
(4,000 training and 1,000 test signals of 40 samples), an MLP 40-256-256-10, Adam (lr 3e-3,
batch 64), 40 epochs, seeds 0-2; the models are frozen before the test. Reports the mean test
accuracy and its spread, the gap to nn.Linear, the weight bytes and the training time against
nn.Linear's, and how far the int8 inference path moves the test accuracy from the float path's
(the same frozen models evaluated with ``inference_precision="fp32"``). Writes its section of
benchmarks/RESULTS.md.

    python benchmarks/bench_quality.py [--epochs 40] [--seeds 3]
"""

import argparse
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from results_file import write_section
from torch import nn

import spatium_torch as st
from spatium_torch import compare

HIDDEN = 256
# Small regions: 8 positions, so that a 40-input layer has several (with the default 64, one
# region holds every input: density cannot drop below 1, and the block has a single scale).
SMALL_REGION_BITS = 3
DEFAULT_REGION_BITS = 6


def mlp(layer: Callable[[int, int, bool], nn.Module], relu: bool = True) -> compare.Spec:
    """A 40-256-256-10 MLP from ``layer(in, out, hidden)``; ReLU between layers unless the
    layers bring their own activation."""

    def build(data: compare.Data, hidden: int) -> nn.Module:
        sizes = (data.features, hidden, hidden, data.classes)
        modules: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            is_hidden = i < len(sizes) - 2
            modules.append(layer(n_in, n_out, is_hidden))
            if is_hidden and relu:
                modules.append(nn.ReLU())
        return nn.Sequential(*modules)

    return build


def specs() -> list[compare.Spec]:
    """nn.Linear, SpatialLayer at 8/4/2/1 bits, 2-bit odd codes (with default and small
    regions in the 40-input layer), 1-bit with small regions there, 4-bit nf4, 4-bit at
    density 0.25 with local (the default) and random connectivity, 4-bit with a learnable
    activation map on its hidden layers."""

    def spatial(**options) -> Callable[[int, int, bool], nn.Module]:
        return lambda n_in, n_out, hidden: st.SpatialLayer(n_in, n_out, **options)

    def small_first_regions(**options) -> Callable[[int, int, bool], nn.Module]:
        # Low-bit blocks cannot zero or weigh down part of an input (1 bit) or do so coarsely
        # (2 bits): with one region, the first layer's neurons weigh every sample alike (see
        # the README's quality notes). Layers with fewer inputs than a default region get
        # small ones.
        def build(n_in: int, n_out: int, hidden: int) -> nn.Module:
            small = n_in < 1 << DEFAULT_REGION_BITS
            region_bits = SMALL_REGION_BITS if small else DEFAULT_REGION_BITS
            return st.SpatialLayer(n_in, n_out, region_bits=region_bits, **options)

        return build

    def mapped(n_in: int, n_out: int, hidden: int) -> nn.Module:
        if not hidden:
            return st.SpatialLayer(n_in, n_out, bits=4)
        return st.SpatialLayer(n_in, n_out, bits=4, activation="map", map_learnable=True)

    return [
        compare.Spec("nn.Linear", mlp(lambda n_in, n_out, hidden: nn.Linear(n_in, n_out))),
        *(compare.Spec(f"{b}-bit", mlp(spatial(bits=b))) for b in (8, 4, 2, 1)),
        compare.Spec("2-bit odd codes", mlp(spatial(bits=2, codebook="odd"))),
        compare.Spec(
            "2-bit odd codes, 8-input regions in the first layer",
            mlp(small_first_regions(bits=2, codebook="odd")),
        ),
        compare.Spec("1-bit, 8-input regions in the first layer", mlp(small_first_regions(bits=1))),
        compare.Spec("4-bit nf4", mlp(spatial(bits=4, codebook="nf4"))),
        *(
            compare.Spec(
                f"4-bit, density 0.25, {connectivity} connectivity",
                mlp(
                    spatial(
                        bits=4,
                        density=0.25,
                        region_bits=SMALL_REGION_BITS,
                        connectivity=connectivity,
                    )
                ),
            )
            for connectivity in ("local", "random")
        ),
        compare.Spec("4-bit, learnable map", mlp(mapped, relu=False)),
    ]


def float_accuracy(model: nn.Module, data: compare.Data) -> float:
    """The test accuracy of ``model`` with every SpatialLayer on the float path."""
    layers = [m for m in model.modules() if isinstance(m, st.SpatialLayer)]
    for layer in layers:
        layer.inference_precision = "fp32"
    try:
        return compare.accuracy(model, data.x_test, data.y_test)
    finally:
        for layer in layers:
            layer.inference_precision = "int8"


def main() -> None:
    """Trains every model on every seed and writes the results section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small layers: threads that wait on each other only cost
    data = compare.load_data("mnist1d")
    rows = []
    for spec in specs():
        runs = [
            compare.train(spec, data, epochs=args.epochs, seed=seed, hidden=HIDDEN)
            for seed in range(args.seeds)
        ]
        accuracies = [100 * r.accuracy for r in runs]
        shifts = [100 * (r.accuracy - float_accuracy(r.model, data)) for r in runs]
        rows.append(
            (
                spec.name,
                statistics.mean(accuracies),
                min(accuracies),
                max(accuracies),
                runs[0].weight_bytes,
                statistics.mean(r.train_seconds for r in runs),
                max(shifts, key=abs),
            )
        )
        print(f"{spec.name}: {', '.join(f'{a:.1f}' for a in accuracies)}", flush=True)
    _, dense_accuracy, _, _, dense_bytes, dense_seconds, _ = rows[0]
    lines = [
        "## Learning quality on MNIST-1D (`benchmarks/bench_quality.py`)",
        "",
        f"Generated on {datetime.date.today()}, 1 thread. MNIST-1D made offline by the mnist1d "
        f"package (4,000 / 1,000 signals), MLP 40-{HIDDEN}-{HIDDEN}-10, Adam lr 3e-3, batch 64, "
        f"{args.epochs} epochs, seeds 0-{args.seeds - 1}; test accuracy of the frozen model. "
        "Training time is the mean over seeds, against nn.Linear's from the same run. The "
        "accuracies are the int8 inference path's (the default on this CPU); the last column is "
        "its largest change against the float path over the seeds (the same frozen models with "
        '`inference_precision="fp32"`).',
        "",
        "| model | test accuracy (mean, min-max) | gap to nn.Linear | weight bytes | train time "
        "| int8 vs fp32 inference |",
        "|---|---|---|---|---|---|",
    ]
    for name, mean, low, high, size, seconds, shift in rows:
        lines.append(
            f"| {name} | {mean:.1f}% ({low:.1f}-{high:.1f}) | {mean - dense_accuracy:+.1f} pt "
            f"| {size:,} ({dense_bytes / size:.1f}x smaller) | {seconds:.1f} s "
            f"({seconds / dense_seconds:.1f}x) | {shift:+.1f} pt |"
        )
    text = "\n".join(lines)
    print(text)
    write_section(args.out, "quality", text)


if __name__ == "__main__":
    main()
