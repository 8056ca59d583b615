"""Does growth pay? Two experiments, each writing its section of benchmarks/RESULTS.md.

- ``digits``: the first growth issue's experiment: a 64-8-10 spatial MLP (4-bit, region_bits 3,
  density 0.375, memory growth every 25 steps), 1800 Adam steps, 4 seeds, without neuron growth
  (with and without memory growth) and with each split mode (growth every 250 steps). Test
  accuracy, final width and the training-loss change at every growth event.
- ``widths``: on MNIST-1D and digits, a 32-32 MLP grows in each mode and criterion, then the
  fixed model of the widths it ended at trains the same steps from scratch: accuracy, bytes and
  training FLOPs of both.
- ``capacity``: how far width pays on each dataset (fixed models of 64 to 512 neurons a layer)
  and where the default controller stops under larger caps.

    python benchmarks/bench_growth.py [--experiments digits widths capacity] [--datasets ...]
        [--seeds 8]
"""

import argparse
import contextlib
import dataclasses
import datetime
import multiprocessing
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from results_file import write_section
from torch import nn

import spatium_torch as st
from spatium_torch.compare import Data, load_data, shuffled_batches, weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import train_growing_digits  # noqa: E402  (the experiment the tests assert on)

SEEDS = range(4)
# (label, split mode, memory growth)
RUNS = (
    ("none, no memory growth", None, False),
    ("none (memory growth only)", None, True),
    ("duplicate", "duplicate", True),
    ("partition", "partition", True),
)


START, CAP, EPOCHS, BATCH, LR = 32, 256, 40, 64, 3e-3
SETUP = (
    "An MLP of SpatialLayers (4-bit, region_bits 3, first layer density 0.375) starts at "
    f"{START}-{START} hidden neurons and grows for {EPOCHS} epochs (Adam {LR}, batch {BATCH}): "
    f"growth checks every 100 steps, pruning every 200, memory growth every 25, max_neurons "
    f"{CAP}. Then the fixed model of the widths it ended at trains the same steps from scratch "
    "(memory growth every 25 too) with the same seed. A tenth of the training set is held out "
    "(the loss criteria's closures measure its loss or error); every model trains on the rest. "
    'Every step\'s loss goes to `record_loss`, so the default criterion (`grow_when="auto"`, '
    "no closure) grows while the mean training loss since the last check improves. "
    "Bytes: the frozen model's store and biases. FLOPs: 6 per weight and sample over the run."
)
SCHEDULE = dict(grow_every=100, prune_every=200, rewire_every=25, max_neurons=CAP)
# (label, controller settings beyond SCHEDULE; "held_out" gives a closure on the held-out
# data: "loss" its cross-entropy, "error" its error rate)
MODES = (
    ("duplicate", dict(mode="duplicate")),
    ("partition", dict(mode="partition")),
    ("fresh (default)", dict(mode="fresh")),
    ("fresh, on saturation", dict(mode="fresh", grow_when="saturated")),
    ("fresh, plateau of held-out loss", dict(mode="fresh", grow_when="plateau", held_out="loss")),
    (
        "fresh, while held-out error improves",
        dict(mode="fresh", grow_when="progress", held_out="error"),
    ),
)


# Growth while a loss improves (the held-out error, or the training losses given to
# record_loss), with the schedule's pruning and without it: the pruning experiment.
PRUNING_MODES = tuple(
    (
        f"fresh, while {loss} improves, {pruning}",
        dict(mode="fresh", grow_when="progress", max_neurons=2048, **held_out, **prune),
    )
    for loss, held_out in (("held-out error", dict(held_out="error")), ("training loss", {}))
    for pruning, prune in (("pruning every 200", {}), ("no pruning", dict(prune_every=None)))
)
PRUNING_SEEDS = range(3)


def mlp(data: Data, widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    inputs = data.features
    for i, width in enumerate(widths):
        density = 0.375 if i == 0 else 1.0
        layers += [st.SpatialLayer(inputs, width, bits=4, region_bits=3, density=density)]
        layers.append(nn.ReLU())
        inputs = width
    layers.append(st.SpatialLayer(inputs, data.classes, bits=4, region_bits=3))
    return nn.Sequential(*layers)


def step_flops(model: nn.Module, batch: int) -> float:
    """Forward and backward multiply-adds of one step, as FLOPs: 6 per weight and sample."""
    weights = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, st.SpatialLayer)
    )
    return 6.0 * weights * batch


def train(
    data: Data,
    held_out: tuple[torch.Tensor, torch.Tensor],
    widths: list[int],
    seed: int,
    settings: dict,
) -> tuple[float, list[int], int, float]:
    """Trains an MLP of ``widths`` under a controller with ``settings``; returns test
    accuracy, final hidden widths, frozen bytes and training FLOPs."""
    torch.manual_seed(seed)
    model = mlp(data, widths)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    settings = dict(settings)
    x_held, y_held = held_out
    measure = settings.pop("held_out", None)
    if measure == "loss":
        settings["closure"] = lambda: F.cross_entropy(model(x_held), y_held)
    elif measure == "error":
        settings["closure"] = lambda: (model(x_held).argmax(1) != y_held).float().mean()
    controller = st.GrowthController(model, optimizer, **settings)
    generator = torch.Generator().manual_seed(seed)
    flops = 0.0
    for _ in range(EPOCHS):
        for batch in shuffled_batches(len(data.x_train), BATCH, generator):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            controller.record_loss(loss.detach())
            flops += step_flops(model, len(batch))
            optimizer.step()
    controller.remove()
    model.eval()
    st.freeze(model)
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    hidden = [m.out_features for m in model if isinstance(m, st.SpatialLayer)][:-1]
    return accuracy, hidden, weight_bytes(model), flops


def split_held_out(data: Data) -> tuple[Data, tuple[torch.Tensor, torch.Tensor]]:
    n = len(data.x_train) // 10
    rest = dataclasses.replace(data, x_train=data.x_train[n:], y_train=data.y_train[n:])
    return rest, (data.x_train[:n], data.y_train[:n])


def report(text: str) -> None:
    print(text, flush=True)


def mean(values: list[float]) -> float:
    return statistics.mean(values)


Run = tuple[float, list[int], int, float]
# Runs train(*args) for each argument tuple: serially, or over a pool of processes.
Runner = Callable[[list[tuple]], list[Run]]


def serial(runs: list[tuple]) -> list[Run]:
    return [train(*args) for args in runs]


def grown_and_fixed(
    name: str, runs: list[tuple[int, dict]], run_all: Runner
) -> tuple[list[Run], list[Run]]:
    """For each (seed, controller settings beyond SCHEDULE): the model grown from
    START-START, and the fixed model of the widths it ended at."""
    data, held_out = split_held_out(load_data(name))
    grown = run_all(
        [(data, held_out, [START, START], seed, {**SCHEDULE, **extra}) for seed, extra in runs]
    )
    fixed = run_all(
        [
            (data, held_out, g[1], seed, {"rewire_every": 25})
            for g, (seed, _) in zip(grown, runs, strict=True)
        ]
    )
    return grown, fixed


def widths_experiment(
    name: str,
    seeds: range,
    report: Callable[[str], None],
    run_all: Runner,
    modes: tuple = MODES,
) -> list[str]:
    """Table rows: each of ``modes`` grown from START-START, against the fixed model of the
    widths it ended at."""
    runs = [(seed, extra) for _, extra in modes for seed in seeds]
    all_grown, all_fixed = grown_and_fixed(name, runs, run_all)
    rows = []
    for index, (label, _) in enumerate(modes):
        part = slice(index * len(seeds), (index + 1) * len(seeds))
        grown, fixed = all_grown[part], all_fixed[part]
        for seed, g, f in zip(seeds, grown, fixed, strict=True):
            report(f"{name} {label} seed {seed}: grown {g}, fixed {f}")
        gap = [100 * (g[0] - f[0]) for g, f in zip(grown, fixed, strict=True)]
        rows.append(
            f"| {name} | {label} | "
            f"{', '.join('-'.join(map(str, g[1])) for g in grown)} | "
            f"{100 * mean([g[0] for g in grown]):.1f}% | "
            f"{100 * mean([f[0] for f in fixed]):.1f}% | "
            f"{mean(gap):+.1f} ({min(gap):+.1f} .. {max(gap):+.1f}) | "
            f"{mean([g[2] for g in grown]) / 1e3:.1f} / {mean([f[2] for f in fixed]) / 1e3:.1f} | "
            f"{mean([g[3] / f[3] for g, f in zip(grown, fixed, strict=True)]):.2f}x |"
        )
        report(rows[-1])
    return rows


CAPACITY_WIDTHS = (64, 128, 256, 512)
# (label, controller settings beyond SCHEDULE)
CAPACITY_RUNS = (
    ("default, max_neurons 256", dict(max_neurons=256)),
    ("default, max_neurons 512", dict(max_neurons=512)),
    ("default, max_neurons 2048", dict(max_neurons=2048)),
    ("on saturation, max_neurons 512", dict(max_neurons=512, grow_when="saturated")),
    (
        "while held-out error improves, max_neurons 2048",
        dict(max_neurons=2048, grow_when="progress", held_out="error"),
    ),
)
CAPACITY_SEEDS = range(3)


def capacity_experiment(name: str, report: Callable[[str], None], run_all: Runner) -> str:
    """One row: fixed models of CAPACITY_WIDTHS and the controllers of CAPACITY_RUNS."""
    data, held_out = split_held_out(load_data(name))
    seeds = len(CAPACITY_SEEDS)
    fixed_widths = run_all(
        [
            (data, held_out, [width, width], seed, {"rewire_every": 25})
            for width in CAPACITY_WIDTHS
            for seed in CAPACITY_SEEDS
        ]
    )
    cells = []
    for index, width in enumerate(CAPACITY_WIDTHS):
        runs = fixed_widths[index * seeds : (index + 1) * seeds]
        cells.append(f"{100 * mean([r[0] for r in runs]):.1f}%")
        report(f"{name} fixed {width}-{width}: {cells[-1]}")
    runs = [(seed, extra) for _, extra in CAPACITY_RUNS for seed in CAPACITY_SEEDS]
    all_grown, all_fixed = grown_and_fixed(name, runs, run_all)
    for index, (label, _) in enumerate(CAPACITY_RUNS):
        part = slice(index * seeds, (index + 1) * seeds)
        grown, fixed = all_grown[part], all_fixed[part]
        widths = ", ".join("-".join(map(str, g[1])) for g in grown)
        cells.append(
            f"{widths}: {100 * mean([g[0] for g in grown]):.1f}% "
            f"({100 * mean([f[0] for f in fixed]):.1f}%)"
        )
        report(f"{name} grown, {label}: {cells[-1]}")
    return f"| {name} | " + " | ".join(cells) + " |"


def digits_experiment(out: str) -> None:
    """The 64-8-10 digits experiment, into the results section "growth"."""
    lines = [
        "## Growth on digits (`benchmarks/bench_growth.py`)",
        "",
        f"Generated on {datetime.date.today()}, {torch.get_num_threads()} thread(s). A 64-8-10 "
        "spatial MLP (both layers SpatialLayer, 4-bit, region_bits 3, first layer density "
        "0.375), memory growth every 25 steps, 1800 Adam steps (lr 3e-3, batch 64), seeds 0-3; "
        "neuron growth every 250 steps (threshold 0.9, at most 25% of the layer per event, "
        "cooldown 2). Loss change: full training-set loss right after a growth event over right "
        "before. A pure-PyTorch prototype of the design measured 95.9% without growth, 96.5% "
        "with duplicate growth to 33 neurons (loss change median x1.02, worst x1.12) and 95.7% "
        "with partition (median x1.17, worst x2.4).",
        "",
        "| neuron growth | test accuracy per seed | mean | hidden width per seed | "
        "loss change at growth events: median / worst |",
        "|---|---|---:|---|---|",
    ]
    for label, mode, rewire in RUNS:
        settings = {} if rewire else {"rewire_every": None}
        runs = [train_growing_digits(mode, seed, **settings) for seed in SEEDS]
        accuracy = [r[0] for r in runs]
        widths = [r[1][0].out_features for r in runs]
        changes = [
            e.loss_after / e.loss_before for r in runs for e in r[2].events if e.kind == "grow"
        ]
        change = (
            f"x{statistics.median(changes):.3f} / x{max(changes):.3f} ({len(changes)} events)"
            if changes
            else "-"
        )
        lines.append(
            f"| {label} | "
            f"{', '.join(f'{100 * a:.1f}%' for a in accuracy)} | "
            f"{100 * statistics.mean(accuracy):.1f}% | {', '.join(map(str, widths))} | "
            f"{change} |"
        )
        print(lines[-1], flush=True)
    write_section(out, "growth", "\n".join(lines))


def main() -> None:
    """Runs the experiments and writes their results sections."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments", nargs="+", default=["digits", "widths", "capacity", "pruning"]
    )
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    # The grown - fixed gap moves by 1-2 points from seed to seed: 8 seeds put its mean's
    # standard error near 0.5 points.
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument(
        "--jobs", type=int, default=1, help="trainings at a time, one thread each when > 1"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        run_all: Runner = serial
        if args.jobs > 1:
            # spawn, not fork: a forked child of a process that ran torch's thread pool can hang.
            pool = stack.enter_context(
                multiprocessing.get_context("spawn").Pool(
                    args.jobs, initializer=torch.set_num_threads, initargs=(1,)
                )
            )

            def run_all(runs: list[tuple]) -> list[Run]:
                return pool.starmap(train, runs, chunksize=1)

        run_experiments(args, run_all)
    print(f"wrote {args.out}")


def run_experiments(args: argparse.Namespace, run_all: Runner) -> None:
    """Runs the chosen experiments and writes their results sections."""
    threads = (
        f"{torch.get_num_threads()} thread(s)"
        if args.jobs == 1
        else f"1 thread a training, {args.jobs} at a time"
    )
    if "digits" in args.experiments:
        digits_experiment(args.out)
    header = [
        "| data | growth | final hidden widths per seed | grown accuracy | fixed accuracy | "
        "grown - fixed, pt (range) | KB grown / fixed | training FLOPs grown / fixed |",
        "|---|---|---|---:|---:|---|---|---:|",
    ]
    if "widths" in args.experiments:
        lines = [
            "## Growth against the width it ends at (`benchmarks/bench_growth.py`)",
            "",
            f"Generated on {datetime.date.today()}, {threads}. Seeds 0-{args.seeds - 1}. " + SETUP,
            "",
            *header,
        ]
        for name in args.datasets:
            lines += widths_experiment(name, range(args.seeds), report, run_all)
        write_section(args.out, "growth-widths", "\n".join(lines))
    if "capacity" in args.experiments:
        seeds = f"{CAPACITY_SEEDS.start}-{CAPACITY_SEEDS.stop - 1}"
        lines = [
            "## How far width pays, and where growth stops (`benchmarks/bench_growth.py`)",
            "",
            f"Generated on {datetime.date.today()}, {threads}. Seeds "
            f"{seeds}, the setup of the widths experiment above. Fixed models of each width "
            "(both hidden layers), mean test accuracy; then the default controller (fresh "
            "children, growing while the mean training loss improves) under each max_neurons, "
            'growth on saturation (`grow_when="saturated"`), and growth while the held-out '
            'error improves (`grow_when="progress"` with that closure): final hidden widths per '
            "seed, mean test accuracy, and in parentheses the fixed models of those widths "
            "trained the same steps.",
            "",
            "| data | "
            + " | ".join(f"fixed {w}-{w}" for w in CAPACITY_WIDTHS)
            + " | "
            + " | ".join(f"grown, {label}" for label, _ in CAPACITY_RUNS)
            + " |",
            "|---|" + "---:|" * len(CAPACITY_WIDTHS) + "---|" * len(CAPACITY_RUNS),
        ]
        for name in args.datasets:
            lines.append(capacity_experiment(name, report, run_all))
        write_section(args.out, "growth-capacity", "\n".join(lines))
    if "pruning" in args.experiments:
        seeds = f"{PRUNING_SEEDS.start}-{PRUNING_SEEDS.stop - 1}"
        lines = [
            "## Growth while a loss improves, with and without pruning "
            "(`benchmarks/bench_growth.py`)",
            "",
            f"Generated on {datetime.date.today()}, {threads}. Seeds "
            f"{seeds}, the setup of the widths experiment above with max_neurons 2048: "
            '`grow_when="progress"` on the held-out error (the closure) or on the mean training '
            "loss since the last check (the losses every step gives `record_loss`), with the "
            "schedule's pruning every 200 steps and with none.",
            "",
            *header,
        ]
        for name in args.datasets:
            lines += widths_experiment(name, PRUNING_SEEDS, report, run_all, PRUNING_MODES)
        write_section(args.out, "growth-pruning", "\n".join(lines))


if __name__ == "__main__":
    main()
