"""SpatialLayer against nn.Linear, measured in the same run: forward (inference), forward +
backward, and a full Adam training step (zero_grad, forward, backward, step; the spatial layer's
re-quantize happens inside the next forward, so it is counted); then the training-step goal's
layers in alternating rounds, under default and fused Adam. Writes its section of
benchmarks/RESULTS.md.

    python benchmarks/bench_layer.py            # the full grid (a few minutes)
    python benchmarks/bench_layer.py --quick    # a smaller grid, no step-goal table
"""

import argparse
import datetime
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from results_file import write_section
from torch import nn
from torch.utils.benchmark import Timer

import spatium_torch as st


def seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call of fn."""
    return (
        Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median
    )


def measure(layer: nn.Module, batch: int, size: int, min_run_time: float) -> tuple[float, ...]:
    """(forward, forward + backward, training step) seconds."""
    x = torch.randn(batch, size)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer(x).sum().backward()

    def step() -> None:
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()

    return tuple(seconds(fn, min_run_time) for fn in (forward, forward_backward, step))


# The training-step goal: 4096 x 4096 layers at these batches, nn.Linear and the 4-bit layer
# (density 1 and 0.25) measured in alternating rounds, under default and fused Adam.
GOAL_SIZE, GOAL_BATCHES, GOAL_ROUNDS = 4096, (32, 256), 5


def adam_step(layer: nn.Module, x: torch.Tensor, fused: bool) -> Callable[[], None]:
    """One training step of ``layer`` on ``x`` under Adam, warmed up once (its state exists)."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()

    step()
    return step


def step_goal(min_run_time: float) -> list[str]:
    """Rows of the step-goal table: per Adam kind and batch, each layer's median step and its
    ratio to nn.Linear's in the same round (median and range over the rounds)."""
    rows = []
    for fused, batch in itertools.product((False, True), GOAL_BATCHES):
        x = torch.randn(batch, GOAL_SIZE)
        layers = {
            "nn.Linear": nn.Linear(GOAL_SIZE, GOAL_SIZE),
            "4-bit": st.SpatialLayer(GOAL_SIZE, GOAL_SIZE, bits=4),
            "4-bit, density 0.25": st.SpatialLayer(GOAL_SIZE, GOAL_SIZE, bits=4, density=0.25),
        }
        steps = {name: adam_step(layer, x, fused) for name, layer in layers.items()}
        times: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(GOAL_ROUNDS):
            for name, step in steps.items():
                times[name].append(seconds(step, min_run_time))
        adam = "fused" if fused else "default"
        for name, measured in times.items():
            median = sorted(measured)[GOAL_ROUNDS // 2]
            if name == "nn.Linear":
                rows.append(f"| {adam} | {batch} | {name} | {median * 1e3:.1f} | | |")
                continue
            ratios = sorted(t / b for t, b in zip(measured, times["nn.Linear"], strict=True))
            rows.append(
                f"| {adam} | {batch} | {name} | {median * 1e3:.1f} | "
                f"{ratios[GOAL_ROUNDS // 2]:.2f}x | {ratios[0]:.2f}x - {ratios[-1]:.2f}x |"
            )
            print(rows[-1], flush=True)
        del layers, steps
    return rows


def main() -> None:
    """Runs the grid and writes the results section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    sizes = [128, 1024] if args.quick else [128, 1024, 4096]
    batches = [1, 32, 256]
    bits_list = [4] if args.quick else [1, 2, 4, 8]
    densities = [1.0, 0.25]

    torch.manual_seed(0)
    rows = []
    for size, batch in itertools.product(sizes, batches):
        base = measure(nn.Linear(size, size), batch, size, args.min_run_time)
        rows.append((size, batch, "nn.Linear", "", base, None))
        print(f"{size}^2 batch {batch}: nn.Linear {[f'{t * 1e3:.3f}' for t in base]} ms")
        for bits, density in itertools.product(bits_list, densities):
            layer = st.SpatialLayer(size, size, bits=bits, density=density)
            times = measure(layer, batch, size, args.min_run_time)
            rows.append((size, batch, f"{bits}-bit", f"{density:g}", times, base))
            ratios = [f"{t / b:.2f}x" for t, b in zip(times, base, strict=True)]
            print(f"  {bits}-bit density {density:g}: {ratios}")

    lines = [
        "## SpatialLayer vs nn.Linear (Python, `benchmarks/bench_layer.py`)",
        "",
        f"Generated on {datetime.date.today()} with torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, square layers (in = out = size). "
        "Times in ms (median); the ratio is SpatialLayer / nn.Linear from the same run "
        "(below 1 is faster). `step` = zero_grad + forward + backward + Adam step.",
        "",
        "| size | batch | layer | density | forward | fwd+bwd | step |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for size, batch, name, density, times, base in rows:
        cells = [
            f"{t * 1e3:.3f}" if base is None else f"{t * 1e3:.3f} ({t / b:.2f}x)"
            for t, b in zip(times, base or times, strict=True)
        ]
        lines.append(f"| {size} | {batch} | {name} | {density} | " + " | ".join(cells) + " |")
    if not args.quick:
        lines += step_goal_section(args.min_run_time)
    write_section(args.out, "layer", "\n".join(lines))
    print(f"wrote {args.out}")


def step_goal_section(min_run_time: float) -> list[str]:
    """The lines of the training-step goal's table, after a blank line."""
    return [
        "",
        f"Training step of {GOAL_SIZE} x {GOAL_SIZE} layers (the goal: at most 1.1x nn.Linear), "
        f"{GOAL_ROUNDS} alternating rounds of all three layers: the median step, and the "
        "median and range of the per-round ratio to nn.Linear. Under default Adam, "
        "`torch.sqrt` over the zero moments of weights outside active blocks is slow on this "
        "CPU, which costs the sparse layer; fused Adam has no such pass.",
        "",
        "| Adam | batch | layer | step (ms) | ratio | range |",
        "|---|---:|---|---:|---:|---:|",
        *step_goal(max(min_run_time, 0.5)),
    ]


if __name__ == "__main__":
    main()
