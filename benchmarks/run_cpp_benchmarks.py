"""Runs the C++ Google Benchmarks of csrc/core on one thread and writes benchmarks/RESULTS.md,
each figure beside the seed's. Usage (or `make bench`):

    python benchmarks/run_cpp_benchmarks.py --binary build/cmake/core_benchmarks \
        --out benchmarks/RESULTS.md
"""

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path

from results_file import write_section

# The seed's single-thread figures (ns per operation) and the goal: at least 2x better. Keys are
# benchmark families, or (family, code width) for the neuron forward.
SEEDS_NS = {
    "morton_encode": 8.2,
    "morton_decode": 7.1,
    "bloom_lookup": 12.0,
    "bloom_insert": 18.0,
    ("neuron_forward_128", "1"): 800.0,
    ("neuron_forward_128", "4"): 4200.0,
}


def seed_of(run_name: str) -> float | None:
    """The seed figure for a benchmark, if the seed has one."""
    parts = run_name.split("/")
    return SEEDS_NS.get(parts[0], SEEDS_NS.get((parts[0], parts[1] if len(parts) > 1 else "")))


def ns_per_op(row: dict) -> float:
    """Nanoseconds per operation: per call where the benchmark reports it, else per item."""
    if "ns_per_call" in row:
        return row["ns_per_call"] * 1e9  # an inverted rate: seconds per call
    return 1e9 / row["items_per_second"]


GOAL_SPEEDUP = 2.0

NOTES = """\
### How to read this

- One thread, median of {repetitions} repetitions of at least 0.2 s each; `ns/op` is
  nanoseconds per position or key (batch figures: the time of a batch divided by its size).
  Seed figures are the single-thread numbers of the project seed; the goal is at least
  {goal:.0f}x better than each.
- `scalar`: one call per position/key. `batch`: whole arrays (4096 positions; 4096 keys). The
  op `st.morton_encode`/`st.morton_decode` uses the batch path the CPU selects, in parallel.
- Morton paths: `portable` (magic bits), `bmi2` (pdep/pext), `avx2`/`avx512` (magic bits,
  vectorized). `dispatched` is what the library calls for one position: pdep/pext where they are
  fast (not on AMD Zen 1/2, where they are microcoded), magic bits elsewhere. For batches the
  library picks avx512 > avx2 > bmi2 (if fast) > portable, by these measurements.
- Memory kernels (`csrc/core/packed_view.cpp`), single thread, batch 1, region_bits 6, every
  block active: `neuron_forward_128/b` is one neuron over 128 inputs at b bits (the seed's
  unit), `layer_forward_1024x1024_batch1/b` a whole 1024 x 1024 layer, `dequantize_1024x1024/b`
  its dense fp32 weights (the float path's panels), `requantize_1024x1024/b`
  re-quantizing it from Gaussian fp32 latent weights (once per optimizer step; /20 is
  4-bit nf4, the format that stands where the width does); ns per call.
- Integer inference (`csrc/core/inference_pack.cpp`), activations quantized to int8 inside the
  loop: `integer_forward_*` on the best kernels this CPU runs (AVX-512 VNNI; AMX-INT8 from 8
  rows where allowed), `integer_forward_avx2_*` on the AVX2 kernels that CPUs without VNNI run
  (same outputs); ns per call, the float kernels' batch-1 figure is `layer_forward_1024x1024`.
  Their last argument is the share of regions each neuron holds, in percent: 100 is dense,
  `integer_forward_4bit/4/n/n/batch/25` an n x n 4-bit layer (n 1024 or 4096) at density 0.25
  in a local layout (each neuron holds the quarter of the regions nearest a point, neurons in
  Morton order, as a sparse SpatialLayer starts), beside its dense twin at batch 1, 32 and 256.
  `vnni_peak`: independent chains of nothing but `vpdpbusd`, the VNNI unit's rate on this host:
  ns per call of 786,432 of them (50.3 M multiply-adds; `integer_forward_*` calls do batch x
  1024 x 1024), so the kernels' multiply-adds a second over its are their efficiency.
- Activation maps (`csrc/core/activation_kernels.cpp`): `switch_backward_64x256/*` is a
  learnable map's backward over a batch of 64 samples x 256 neurons (every function's value per
  element, the switch gains; `mixed`: any of the 12 functions per element, `relu`: relu
  everywhere, `with_cell_sums`: also a factored map's per-cell sums);
  `map_argmax_256_neurons/*` is the function table of a 256-neuron map from full or factored
  logits (random initial functions); ns per call.
- Bloom: `4096` = a filter sized for 4 Ki keys (5 KiB, in L1/L2); `67108864` = sized for 64 Mi
  keys (84 MiB, far out of cache, on 2 MiB pages where the kernel grants them). Kernel `avx2` is
  what the library uses where the CPU has AVX2; `portable` is the fallback.
- The Debian build of Google Benchmark warns that it was itself built as DEBUG; that affects the
  harness's bookkeeping, not the measured code, which is built with -O3.
"""


def run(binary: str, repetitions: int) -> tuple[list[dict], dict]:
    """Runs the benchmark binary; returns the median rows of its JSON report and its context."""
    out = subprocess.run(
        [
            binary,
            "--benchmark_format=json",
            f"--benchmark_repetitions={repetitions}",
            "--benchmark_report_aggregates_only=true",
            "--benchmark_min_time=0.2",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(out)
    medians = [r for r in report["benchmarks"] if r.get("aggregate_name") == "median"]
    return medians, report["context"]


def display_name(row: dict) -> str:
    name = row["run_name"]
    label = row.get("label", "")
    return f"{name} ({label})" if label else name


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(rows: list[dict], context: dict, repetitions: int) -> str:
    lines = [
        "## C++ core (Google Benchmark)",
        "",
        f"Generated by `benchmarks/run_cpp_benchmarks.py` on {datetime.date.today()}: "
        f"{cpu_model()}, {context.get('num_cpus')} CPUs at {context.get('mhz_per_cpu')} MHz, "
        "one thread.",
        "",
        "| benchmark | ns/op | seed ns/op | speedup vs seed | goal (>= 2x) |",
        "|---|---:|---:|---:|:---:|",
    ]
    misses = []
    for row in rows:
        if row.get("error_occurred"):
            lines.append(f"| {display_name(row)} | n/a: {row.get('error_message')} | | | |")
            continue
        ns = ns_per_op(row)
        seed = seed_of(row["run_name"])
        if seed is None:
            lines.append(f"| {display_name(row)} | {ns:,.2f} | | | |")
            continue
        speedup = seed / ns
        met = speedup >= GOAL_SPEEDUP
        lines.append(
            f"| {display_name(row)} | {ns:,.2f} | {seed:,.1f} | {speedup:.2f}x | "
            f"{'yes' if met else '**no**'} |"
        )
        if not met:
            misses.append((display_name(row), speedup))
    lines += ["", "### Where we are not at 2x", ""]
    if misses:
        lines += [f"- {name}: {speedup:.2f}x" for name, speedup in misses]
        lines += [
            "",
            "The portable fallbacks are kept for CPUs without AVX2/BMI2 and are not what runs",
            "here. A single out-of-cache lookup or insert is bound by one DRAM access, which only",
            "the batch calls (hash a chunk, prefetch its blocks, then probe) overlap.",
        ]
    else:
        lines.append("Every figure meets the goal.")
    lines += ["", NOTES.format(repetitions=repetitions, goal=GOAL_SPEEDUP)]
    return "\n".join(lines)


def main() -> None:
    """Runs the benchmarks and writes the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="build/cmake/core_benchmarks")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    rows, context = run(args.binary, args.repetitions)
    write_section(args.out, "cpp", render(rows, context, args.repetitions))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
