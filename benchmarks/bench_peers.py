"""Frozen CPU inference against the peers a user would pick instead: nn.Linear, torch's int8
``quantize_dynamic``, torch's int4pack matmul with bf16 activations, and bitsandbytes / torchao
when they are installed (``pip install -e .[bench]`` installs them without their own torch).
Every candidate is built from the same weight and timed in the same run, in interleaved rounds;
ratios are against nn.Linear from the same round. Writes the "peers" section of
benchmarks/RESULTS.md.

    python benchmarks/bench_peers.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_file import write_section
from torch import nn
from torch.utils.benchmark import Timer

import spatium_torch as st

SIZES = (4096, 1024)
THREADS = (1, 2)
BATCHES = (1, 32, 256)
ROUNDS = 3
INT4_GROUP = 64  # torch int4pack: weights per scale and zero, as our 64-input blocks
# SpatialLayer settings: each code width dense, nf4, and a quarter of the blocks with the default
# local connectivity (neighbouring neurons hold neighbouring regions) and with random.
SPATIAL = [
    *(dict(bits=bits) for bits in (4, 2, 1, 8)),
    dict(bits=4, codebook="nf4"),
    dict(bits=4, density=0.25),
    dict(bits=4, density=0.25, connectivity="random"),
    dict(bits=1, density=0.25),
]


@dataclass
class Candidate:
    """A way to compute ``x W^T + b``: ``run(x)`` on the float32 input it was given, made
    ready (``prepare``) outside the timed region; ``weight_bytes`` is what it reads of the
    weight (codes, scales, zero points, layout arrays)."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    times: dict[int, list[float]] = field(default_factory=dict)


def spatial(weight: torch.Tensor, bias: torch.Tensor, settings: dict[str, Any]) -> Candidate:
    out_features, in_features = weight.shape
    layer = st.SpatialLayer(in_features, out_features, **settings)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    st.freeze(layer).eval()
    with torch.no_grad():
        layer(torch.zeros(1, in_features))  # builds the int8 kernels' copy of the store
    # What the forward reads: the int8 kernels' copy, or the store without its bloom filter.
    used = layer.inference_bytes() or layer.store.nbytes() - layer.store.bloom.numel()
    name = f"SpatialLayer {settings['bits']}-bit" + "".join(
        f", {value}" if key == "codebook" else f", {key} {value}"
        for key, value in settings.items()
        if key != "bits"
    )
    return Candidate(name, torch.no_grad()(layer), used)


def dense(weight: torch.Tensor, bias: torch.Tensor) -> Candidate:
    return Candidate("nn.Linear fp32", lambda x: F.linear(x, weight, bias), weight.nbytes)


def torch_int8_dynamic(weight: torch.Tensor, bias: torch.Tensor) -> Candidate:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, torch.qint8)
    # int8 weights and one fp32 scale and int zero point a row
    return Candidate("torch quantize_dynamic int8", model, weight.numel() + 8 * weight.shape[0])


def torch_int4pack(weight: torch.Tensor, bias: torch.Tensor) -> Candidate:
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-12) / 15
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.view(out_features, in_features), 1)
    scales_and_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    bias16 = bias.bfloat16()

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)
        return y + bias16

    return Candidate(
        "torch int4pack (bf16 activations)",
        run,
        packed.nbytes + scales_and_zeros.nbytes,
        prepare=lambda x: x.bfloat16(),
    )


def bitsandbytes_nf4(weight: torch.Tensor, bias: torch.Tensor) -> Candidate | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(
        weight.shape[1], weight.shape[0], compute_dtype=torch.bfloat16, quant_type="nf4"
    )
    layer.load_state_dict({"weight": weight, "bias": bias})
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state
    used = layer.weight.nbytes + state.absmax.nbytes
    return Candidate(
        f"bitsandbytes {bnb.__version__} nf4 (bf16)",
        torch.no_grad()(layer),
        used,
        prepare=lambda x: x.bfloat16(),
    )


def torchao_int8(weight: torch.Tensor, bias: torch.Tensor) -> list[Candidate]:
    try:
        import torchao
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        return []
    found = []
    for label, config in (
        ("int8 dynamic activations", Int8DynamicActivationInt8WeightConfig()),
        ("int8 weight-only", Int8WeightOnlyConfig()),
    ):
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        quantize_(linear, config)
        used = weight.numel() + 4 * weight.shape[0]
        found.append(
            Candidate(f"torchao {torchao.__version__} {label}", torch.no_grad()(linear), used)
        )
    return found


def candidates(size: int) -> list[Candidate]:
    torch.manual_seed(0)
    reference = nn.Linear(size, size)
    weight, bias = reference.weight.detach().clone(), reference.bias.detach().clone()
    found = [dense(weight, bias)]
    found += [spatial(weight, bias, settings) for settings in SPATIAL]
    found += [torch_int8_dynamic(weight, bias), torch_int4pack(weight, bias)]
    nf4 = bitsandbytes_nf4(weight, bias)
    found += [] if nf4 is None else [nf4]
    found += torchao_int8(weight, bias)
    return found


def seconds(run: Callable, x: torch.Tensor, min_time: float) -> float:
    """Median seconds per call of run(x)."""
    return (
        Timer("run(x)", globals={"run": run, "x": x})
        .blocked_autorange(min_run_time=min_time)
        .median
    )


def read_bandwidth(megabytes: int) -> float:
    """Bytes per second of a sum over a float32 buffer of this size (read-bound)."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    return buffer.nbytes / seconds(torch.sum, buffer, 0.3)


def measure(found: list[Candidate], size: int, rounds: int, min_time: float) -> None:
    for batch in BATCHES:
        x = torch.randn(batch, size)
        inputs = [c.prepare(x) for c in found]
        for c, xi in zip(found, inputs, strict=True):
            c.run(xi)  # warm-up: first-call allocations, lazy packing
            c.times[batch] = []
        for _ in range(rounds):
            for c, xi in zip(found, inputs, strict=True):
                c.times[batch].append(seconds(c.run, xi, min_time))


def ratio_cell(c: Candidate, base: Candidate, batch: int) -> str:
    ratios = [t / b for t, b in zip(c.times[batch], base.times[batch], strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def table(found: list[Candidate], size: int, bandwidth: float) -> list[str]:
    base = found[0]
    lines = [
        "| candidate | bits/weight | "
        + " | ".join(f"batch {b}: ms, x nn.Linear (range)" for b in BATCHES)
        + " | batch 1 / DRAM bound |",
        "|---|---:|" + "---:|" * len(BATCHES) + "---:|",
    ]
    for c in found:
        cells = [
            f"{statistics.median(c.times[b]) * 1e3:.3f}, {ratio_cell(c, base, b)}" for b in BATCHES
        ]
        bound = c.weight_bytes / bandwidth
        lines.append(
            f"| {c.name} | {8 * c.weight_bytes / size**2:.2f} | "
            + " | ".join(cells)
            + f" | {statistics.median(c.times[1]) / bound:.1f} |"
        )
    return lines


def main() -> None:
    """Measures and writes the results section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--quick", action="store_true", help="1024 only, one round (a smoke run)")
    args = parser.parse_args()
    sizes, rounds, min_time = ((1024,), 1, 0.02) if args.quick else (SIZES, ROUNDS, 0.2)
    lines = [
        "## Frozen inference vs CPU peers (`benchmarks/bench_peers.py`)",
        "",
        f"Generated on {datetime.date.today()} on {platform.processor() or platform.machine()} "
        f"({_cpu_name()}), torch {torch.__version__}. Each candidate holds the same "
        "nn.Linear weight, float32 input; bf16 peers get their input converted before timing. "
        f"Each cell: median ms over {rounds} interleaved rounds, then the median ratio to "
        "nn.Linear in the same round and its range. bits/weight counts everything the forward "
        "reads of the weight (codes, scales, zero points, layout arrays). The last column is "
        "the batch-1 time over the time to read those bytes at the measured DRAM bandwidth "
        "(weights that fit in the last-level cache can beat it).",
        "",
    ]
    for threads in THREADS:
        torch.set_num_threads(threads)
        dram = read_bandwidth(1024)
        lines += [f"**{threads} thread(s)**: DRAM read bandwidth {dram / 1e9:.1f} GB/s.", ""]
        for size in sizes:
            found = candidates(size)
            measure(found, size, rounds, min_time)
            lines += [f"{size} x {size}:", "", *table(found, size, dram), ""]
            print("\n".join(lines[-len(found) - 4 :]), flush=True)
    write_section(args.out, "peers", "\n".join(lines))


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
