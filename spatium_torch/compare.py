"""``spatium-torch compare``: nn.Linear against SpatialLayer MLPs on a data set that ships with
scikit-learn (digits by default) or on MNIST-1D (generated offline by the ``mnist1d`` package).

Trains one MLP per model (nn.Linear; SpatialLayer at each requested code width; one sparse;
one that grows), prints a table (test accuracy, weight bytes, compression, train time, batch-1
and batch-256 latency, each also against nn.Linear) and writes ``report.md`` and PNG plots to
``--out``. Run ``spatium-torch compare --help`` or ``python -m spatium_torch.compare``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

import spatium_torch as st
from spatium_torch import viz

DATASETS = ("digits", "iris", "wine", "breast_cancer", "mnist1d")
BITS = (1, 2, 4, 8)
BATCH = 64
LR = 3e-3
LATENCY_REPEATS = {1: 300, 256: 40}
# The sparse model: a quarter of each neuron's regions, 8-position regions (2x2x2).
SPARSE_DENSITY, SPARSE_REGION_BITS = 0.25, 3
# The growing model starts this narrow, with this density, and may grow back to --hidden.
GROWTH_START, GROWTH_DENSITY = 16, 0.375
FILES = ("learning_curves.png", "accuracy_vs_bytes.png", "latency.png", "memory_heatmap.png")


@dataclass(frozen=True)
class Data:
    """A stratified 75/25 split (fixed for a data set), features scaled to about [0, 1]
    (digits) or standardised on the training set (the others); MNIST-1D keeps its own
    4000/1000 split and values."""

    name: str
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor
    classes: int
    image: tuple[int, int] | None  # (height, width) when the features are an image's pixels

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


@dataclass
class Result:
    """One trained model and its measurements."""

    spec: Spec
    accuracy: float
    weight_bytes: int
    train_seconds: float
    latency_us: dict[int, float]  # batch size -> median microseconds
    curve: list[float]  # test accuracy after each epoch
    losses: list[float]  # mean training loss of each epoch
    model: nn.Module
    history: st.TrainingHistory | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Spec:
    """A model to train: its name, how to build it, whether a growth controller runs."""

    name: str
    build: Callable[[Data, int], nn.Module]
    growth: bool = False
    heatmap: bool = False  # its first layer is drawn in memory_heatmap.png


def load_data(name: str) -> Data:
    """One of :data:`DATASETS`: scikit-learn's (they ship with it) or MNIST-1D (generated
    here by the ``mnist1d`` package with its default arguments; never downloaded)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    if name == "mnist1d":
        return _mnist1d()
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    raw = getattr(datasets, f"load_{name}")()
    x = torch.tensor(raw.data, dtype=torch.float32)
    y = torch.tensor(raw.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    if name == "digits":
        x_train, x_test, image = x_train / 16.0, x_test / 16.0, (8, 8)
    else:
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
        x_train, x_test, image = (x_train - mean) / std, (x_test - mean) / std, None
    return Data(name, x_train, x_test, y_train, y_test, int(y.max()) + 1, image)


def _mnist1d() -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())  # seeded by its arguments: the same set every time
    x_train, x_test = (torch.tensor(raw[k], dtype=torch.float32) for k in ("x", "x_test"))
    y_train, y_test = (torch.tensor(raw[k], dtype=torch.int64) for k in ("y", "y_test"))
    return Data("mnist1d", x_train, x_test, y_train, y_test, int(y_train.max()) + 1, None)


def model_specs(bits: Sequence[int], growth: bool = True) -> list[Spec]:
    """nn.Linear, SpatialLayer at each width in ``bits``, a sparse one and a growing one (both
    at 4 bits, or the widest requested when 4 is not)."""
    specs = [Spec("nn.Linear", _linear_mlp)]
    for b in sorted(bits, reverse=True):
        specs.append(Spec(f"SpatialLayer {b}-bit", _spatial_mlp(bits=b)))
    b = 4 if 4 in bits else max(bits)
    specs.append(
        Spec(
            f"SpatialLayer {b}-bit, density {SPARSE_DENSITY}",
            _spatial_mlp(
                bits=b, density=SPARSE_DENSITY, region_bits=SPARSE_REGION_BITS, image_layout=True
            ),
            heatmap=True,
        )
    )
    if growth:
        specs.append(
            Spec(
                f"SpatialLayer {b}-bit, growth from {GROWTH_START}",
                _spatial_mlp(
                    bits=b,
                    density=GROWTH_DENSITY,
                    region_bits=SPARSE_REGION_BITS,
                    output_density=1.0,  # every output sees every hidden neuron and its children
                    hidden=GROWTH_START,
                ),
                growth=True,
            )
        )
    return specs


def _linear_mlp(data: Data, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(data.features, hidden), nn.ReLU(), nn.Linear(hidden, data.classes)
    )


def _spatial_mlp(
    *,
    bits: int,
    density: float = 1.0,
    region_bits: int = 6,
    output_density: float | None = None,
    hidden: int | None = None,
    image_layout: bool = False,
) -> Callable[[Data, int], nn.Module]:
    """Builds SpatialLayer MLPs. With ``image_layout`` and an image data set the pixels sit at
    their (x, y): regions are image patches, so a sparse neuron starts on a patch near it and
    its memory is its receptive field. Dense models keep the default layout (the drop-in
    case; a layout of its own stores the inputs' codes, and a flat image fills a 3D region
    only partly, so it costs bytes). ``output_density`` (default: ``density``) is the output
    layer's."""

    def build(data: Data, default_hidden: int) -> nn.Module:
        width = hidden or default_hidden
        layout = st.layouts.grid(*data.image) if image_layout and data.image else None
        second = density if output_density is None else output_density
        return nn.Sequential(
            st.SpatialLayer(
                data.features,
                width,
                bits=bits,
                density=density,
                region_bits=region_bits,
                input_positions=layout,
            ),
            nn.ReLU(),
            st.SpatialLayer(
                width, data.classes, bits=bits, density=second, region_bits=region_bits
            ),
        )

    return build


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as deployed: fp32 for nn.Linear (weight and bias); for SpatialLayer
    the store (exact once frozen) plus the fp32 bias."""
    total = 0
    for module in model.modules():
        if isinstance(module, st.SpatialLayer):
            bias = 0 if module.bias is None else 4 * module.out_features
            total += module.memory.bytes + bias
        elif isinstance(module, nn.Linear):
            total += 4 * sum(p.numel() for p in module.parameters())
    return total


def latency_us(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median inference time of ``model(batch)`` in microseconds (after a few warm-up calls)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(batch)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of ``model`` in eval mode (restores its mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return result


def train(
    spec: Spec,
    data: Data,
    *,
    epochs: int,
    seed: int,
    hidden: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Result:
    """Trains the spec's MLP with Adam (lr 3e-3, batch 64) for ``epochs``, then freezes it and
    measures accuracy, bytes and latency. Same seed, same numbers (timings aside)."""
    torch.manual_seed(seed)
    model = spec.build(data, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    controller = _growth_controller(model, optimizer, hidden) if spec.growth else None
    generator = torch.Generator().manual_seed(seed)
    curve, losses = [], []
    train_seconds = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        total = 0.0
        for batch in shuffled_batches(len(data.x_train), BATCH, generator):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            if controller is not None:
                controller.record_loss(loss.detach())
            optimizer.step()
            total += loss.item() * len(batch)
        train_seconds += time.perf_counter() - start
        losses.append(total / len(data.x_train))
        curve.append(accuracy(model, data.x_test, data.y_test))
        if on_epoch is not None:
            on_epoch(epoch, curve[-1])
    if controller is not None:
        controller.remove()
    model.eval()
    st.freeze(model)  # the deployed form: the stores are the only copy of the weights
    return Result(
        spec=spec,
        accuracy=accuracy(model, data.x_test, data.y_test),
        weight_bytes=weight_bytes(model),
        train_seconds=train_seconds,
        latency_us={
            size: latency_us(model, _batch(data.x_test, size), repeats)
            for size, repeats in LATENCY_REPEATS.items()
        },
        curve=curve,
        losses=losses,
        model=model,
        history=None if controller is None else controller.history,
        notes=[] if controller is None else [_widths(model)],
    )


def shuffled_batches(count: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of minibatch indices: a permutation of ``range(count)`` in batches of ``size``
    (the last one shorter)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, size):
        yield order[start : start + size]


def _growth_controller(
    model: nn.Module, optimizer: torch.optim.Optimizer, hidden: int
) -> st.GrowthController:
    return st.GrowthController(
        model,
        optimizer,
        grow_every=100,
        prune_every=200,
        rewire_every=25,
        max_neurons=hidden // 2,
    )


def _widths(model: nn.Module) -> str:
    layers = [m for m in model.modules() if isinstance(m, st.SpatialLayer)]
    return "-".join([str(layers[0].in_features)] + [str(m.out_features) for m in layers])


def _batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows of ``x`` (repeated when it has fewer)."""
    return x[torch.arange(size) % len(x)]


# --- table and report -------------------------------------------------------------------------
COLUMNS = (
    "model",
    "test acc",
    "weight bytes",
    "compression",
    "train s",
    "batch-1 latency",
    "batch-256 latency",
)


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    """The table's cells; ratios in parentheses are against the first result (nn.Linear);
    compression is nn.Linear's bytes over the model's."""
    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r.spec.name + (f" ({'; '.join(r.notes)})" if r.notes else ""),
                f"{100 * r.accuracy:.1f}% ({r.accuracy / base.accuracy:.3f}x)",
                f"{r.weight_bytes:,}",
                f"{base.weight_bytes / r.weight_bytes:.1f}x",
                f"{r.train_seconds:.2f} ({r.train_seconds / base.train_seconds:.1f}x)",
                *(
                    f"{_duration(r.latency_us[size])} "
                    f"({r.latency_us[size] / base.latency_us[size]:.1f}x)"
                    for size in LATENCY_REPEATS
                ),
            ]
        )
    return rows


def _duration(us: float) -> str:
    return f"{us:.1f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def settings_line(data: Data, args: argparse.Namespace) -> str:
    """What was run, on what."""
    return (
        f"{data.name} ({len(data.x_train):,} train / {len(data.x_test):,} test, "
        f"{data.features} features, {data.classes} classes), MLP {data.features}-{args.hidden}-"
        f"{data.classes}, Adam lr {LR}, batch {BATCH}, {args.epochs} epochs, seed {args.seed}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({platform.machine()})"
    )


def write_report(
    out: Path, results: Sequence[Result], data: Data, args: argparse.Namespace, pictures: list[str]
) -> Path:
    """Writes ``report.md`` (settings, the table, the pictures) to ``out``."""
    lines = [
        "# spatium_torch: nn.Linear against SpatialLayer",
        "",
        settings_line(data, args) + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += [
        "",
        "Ratios in parentheses are against nn.Linear. Weight bytes: nn.Linear's fp32 weights and "
        "biases; for SpatialLayer the frozen stores (codes, scales, directory, bloom filter, "
        "tables) plus fp32 biases. Compression: nn.Linear's bytes over the model's. Train s: "
        "the training steps only (growth events included), not the per-epoch evaluation. "
        "Latency: median of a frozen model's forward pass in eval mode.",
        "",
    ]
    lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})\n" for p in pictures]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --- pictures ---------------------------------------------------------------------------------
def draw_pictures(out: Path, results: Sequence[Result]) -> list[str]:
    """Writes the PNGs to ``out``; returns their file names."""
    figures = {
        "learning_curves.png": _learning_curves(results),
        "accuracy_vs_bytes.png": _accuracy_vs_bytes(results),
        "latency.png": _latency(results),
    }
    shown = next(r for r in results if r.spec.heatmap)
    first = shown.model[0]
    spread = torch.linspace(0, first.out_features - 1, min(6, first.out_features))
    figures["memory_heatmap.png"] = viz.memory_heatmap(first, spread.long().tolist())
    figures["memory_heatmap.png"].suptitle(f"{shown.spec.name}: first-layer neurons' memory")
    for r in results:
        if r.history is not None and (r.history.records or r.history.events):
            figures["growth_history.png"] = viz.history(r.history)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110)
    return list(figures)


def _learning_curves(results: Sequence[Result]) -> Figure:
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for r in results:
        epochs = range(1, len(r.curve) + 1)
        acc_ax.plot(epochs, [100 * a for a in r.curve], marker=".", label=r.spec.name)
        loss_ax.plot(epochs, r.losses, marker=".", label=r.spec.name)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss", yscale="log")
    loss_ax.legend(fontsize=7)
    return fig


def _accuracy_vs_bytes(results: Sequence[Result]) -> Figure:
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in results:
        ax.scatter(r.weight_bytes, 100 * r.accuracy)
        ax.annotate(
            r.spec.name.removeprefix("SpatialLayer "),  # short labels: the points sit close
            (r.weight_bytes, 100 * r.accuracy),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
            rotation=20,
        )
    ax.margins(x=0.12, y=0.08)
    ax.set(xscale="log", xlabel="weight bytes (log)", ylabel="test accuracy (%)")
    ax.set_title("accuracy against weight bytes")
    return fig


def _latency(results: Sequence[Result]) -> Figure:
    fig = Figure(figsize=(10.0, 0.45 * len(results) + 1.5), layout="constrained")
    axes = fig.subplots(1, len(LATENCY_REPEATS), sharey=True)
    names = [r.spec.name for r in results]
    for ax, size in zip(axes, LATENCY_REPEATS, strict=True):
        ax.barh(names, [r.latency_us[size] for r in results], color="#4c72b0")
        ax.set(xlabel="microseconds (median)", title=f"batch {size}")
    axes[0].invert_yaxis()  # the first model on top (the axes share y)
    return fig


# --- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``compare`` (shared by ``spatium-torch compare`` and ``python -m``)."""
    parser.add_argument(
        "--dataset", choices=DATASETS, default="digits", help="scikit-learn set or mnist1d"
    )
    parser.add_argument(
        "--bits", type=int, nargs="+", choices=BITS, default=[8, 4, 2, 1], help="code widths"
    )
    parser.add_argument("--epochs", type=_positive_int, default=30, help="training epochs")
    parser.add_argument("--hidden", type=_positive_int, default=128, help="hidden neurons")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of init and batch order")
    parser.add_argument(
        "--out", type=_out_dir, default=Path("spatium_report"), help="report folder"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads (small layers gain nothing from more)",
    )
    parser.add_argument("--no-growth", action="store_true", help="leave out the growing model")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


def run(args: argparse.Namespace) -> int:
    """Runs the comparison the parsed options ask for; returns the exit status."""
    # These layers are small: a second thread barely helps, and where other work shares the
    # cores, threads that wait on each other at every op made training 10-70x slower.
    torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: room for the table on one line a row
    started = time.perf_counter()
    data = load_data(args.dataset)
    console.print(settings_line(data, args), highlight=False)
    specs = model_specs(sorted(set(args.bits)), growth=not args.no_growth)
    results = []
    columns = (
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        for spec in specs:
            task = progress.add_task(spec.name, total=args.epochs, status="")

            def advance(epoch: int, acc: float, task: int = task) -> None:
                progress.update(task, advance=1, status=f"test acc {100 * acc:.1f}%")

            results.append(
                train(
                    spec,
                    data,
                    epochs=args.epochs,
                    seed=args.seed,
                    hidden=args.hidden,
                    on_epoch=advance,
                )
            )
    table = Table(title=f"{data.name}: nn.Linear against SpatialLayer")
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = draw_pictures(args.out, results)
    report = write_report(args.out, results, data, args, pictures)
    console.print(
        f"wrote {report} and {len(pictures)} pictures in {time.perf_counter() - started:.0f} s",
        highlight=False,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spatium_torch.compare [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m spatium_torch.compare", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
