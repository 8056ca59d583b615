"""SpatialLayer on a GPU against nn.Linear in bf16 and fp32, measured in the same run: a frozen
4-bit layer's forward (inference, no grad) and a training step of a 4-bit layer with latent
weights (zero_grad, forward, backward, Adam step), at 4096x4096 and 8192x8192, batch 1/16/256.
bitsandbytes Linear4bit (nf4) and torchao int4 weight-only rows are added where those packages
import and build on the machine (skipped otherwise). Writes the `gpu` section of a results file.

    python benchmarks/bench_gpu.py --out RESULTS-gpu.md    # on a machine with a GPU
    python benchmarks/bench_gpu.py --device cpu --quick    # a smoke run anywhere
"""

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

import torch
from results_file import write_section
from torch import nn
from torch.utils.benchmark import Timer

import spatium_torch as st


def milliseconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds per call (the Timer synchronizes CUDA around its measurements)."""
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def inference(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


def training_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)

    def run() -> None:
        optimizer.zero_grad()
        layer(x).float().sum().backward()
        optimizer.step()

    return run


def peer_layers(size: int, device: str) -> dict[str, nn.Module]:
    """The quantized peers this machine has, each in bf16 compute; a peer that is missing or
    fails to build is left out (with the reason printed for the log)."""
    peers: dict[str, nn.Module] = {}
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(size, size, compute_dtype=torch.bfloat16, quant_type="nf4")
        peers["bitsandbytes nf4"] = layer.to(device)
    except Exception as error:  # optional peer: any failure means no row
        print(f"bitsandbytes skipped: {type(error).__name__}: {error}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        layer = nn.Linear(size, size, dtype=torch.bfloat16, device=device)
        quantize_(layer, Int4WeightOnlyConfig(group_size=64))
        peers["torchao int4 (group 64)"] = layer
    except Exception as error:
        print(f"torchao skipped: {type(error).__name__}: {error}")
    return peers


def measure_size(size: int, batches: list[int], device: str, min_run_time: float) -> list[str]:
    """Table rows for one layer size: times in ms, ratio to nn.Linear bf16 then fp32."""
    torch.manual_seed(0)
    dense = nn.Linear(size, size, device=device)
    dense_bf16 = nn.Linear(size, size, device=device, dtype=torch.bfloat16)
    spatial = st.SpatialLayer(size, size, bits=4).to(device)
    frozen = st.freeze(st.SpatialLayer(size, size, bits=4).to(device)).eval()
    peers = peer_layers(size, device)
    rows = []
    for batch in batches:
        x = torch.randn(batch, size, device=device)
        x_bf16 = x.bfloat16()
        forward = {
            "nn.Linear fp32": inference(dense, x),
            "nn.Linear bf16": inference(dense_bf16, x_bf16),
            "SpatialLayer 4-bit, fp32 input": inference(frozen, x),
            "SpatialLayer 4-bit, bf16 input": inference(frozen, x_bf16),
            **{name: inference(layer, x_bf16) for name, layer in peers.items()},
        }
        step = {
            "nn.Linear fp32": training_step(dense, x),
            "nn.Linear bf16": training_step(dense_bf16, x_bf16),
            "SpatialLayer 4-bit, fp32 input": training_step(spatial, x),
        }
        for kind, runs in (("forward", forward), ("training step", step)):
            times = {name: milliseconds(run, min_run_time) for name, run in runs.items()}
            bf16, fp32 = times["nn.Linear bf16"], times["nn.Linear fp32"]
            for name, ms in times.items():
                rows.append(
                    f"| {size} | {batch} | {kind} | {name} | {ms:.3f} | {ms / bf16:.2f}x | "
                    f"{ms / fp32:.2f}x |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    """Runs the grid and writes the `gpu` section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="one small size, two batches")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS-gpu.md"))
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no GPU here (use --device cpu for a smoke run)")
    sizes, batches = ([256], [1, 16]) if args.quick else ([4096, 8192], [1, 16, 256])
    rows = []
    for size in sizes:
        rows += measure_size(size, batches, args.device, args.min_run_time)
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{args.device}, {torch.get_num_threads()} threads"
    )
    text = "\n".join(
        [
            "## SpatialLayer on a GPU (`benchmarks/bench_gpu.py`)",
            "",
            f"Generated on {datetime.date.today()} with torch {torch.__version__} on {where}; "
            f"spatium_torch CUDA kernels built: {st.built_with_cuda()}. Times in ms (median); "
            "ratios against nn.Linear in bf16 and in fp32 from the same run (below 1 is faster). "
            "Forward: a frozen 4-bit layer (density 1) in eval, no grad. Training step: a 4-bit "
            "layer with latent weights, zero_grad + forward + backward + Adam.",
            "",
            "| size | batch | measure | layer | ms | vs bf16 | vs fp32 |",
            "|---:|---:|---|---|---:|---:|---:|",
            *rows,
        ]
    )
    write_section(args.out, "gpu", text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
