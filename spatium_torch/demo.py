"""A short end-to-end look at what exists so far: Morton codes of an image layout, an exact round
trip over a million positions with its speed, and the build's parallel and CUDA status.

Run with ``python -m spatium_torch.demo`` (``make demo``)."""

import time
from collections.abc import Callable

import torch

import spatium_torch as st


def z_order_of_grid(height: int, width: int) -> torch.Tensor:
    """The visiting order of each pixel of a height x width image when sorted by Morton code."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    xyz = torch.stack(
        [xs.flatten(), ys.flatten(), torch.zeros(height * width, dtype=torch.long)], 1
    )
    order = torch.argsort(st.morton_encode(xyz))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank.view(height, width)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` wall-clock timings of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Prints the demonstration."""
    print(f"spatium_torch {st.__version__} on torch {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}, CUDA kernels built: {st.built_with_cuda()}\n")

    print("Z-order (Morton) rank of each pixel of an 8x8 image (x = column, y = row):")
    for row in z_order_of_grid(8, 8).tolist():
        print("  " + " ".join(f"{r:2d}" for r in row))
    print("  Each 2x2, 4x4 block is one contiguous run of ranks: what lets a region of the")
    print("  spatial memory be one contiguous run of a layer's inputs.\n")

    n = 1_000_000
    xyz = torch.randint(0, 1 << 16, (n, 3), generator=torch.Generator().manual_seed(0))
    encode_s = best_of(5, lambda: st.morton_encode(xyz))
    codes = st.morton_encode(xyz)
    decode_s = best_of(5, lambda: st.morton_decode(codes))
    back = st.morton_decode(codes)
    assert torch.equal(back, xyz), "round trip failed"
    print(
        f"{n:,} random positions: encode {encode_s * 1e9 / n:.2f} ns, decode "
        f"{decode_s * 1e9 / n:.2f} ns per position (best of 5, {torch.get_num_threads()} threads,"
        " output allocation included); round trip exact."
    )

    try:
        st.morton_encode(torch.tensor([[1, 2, 70_000]]))
    except ValueError as error:
        print(f"out-of-range input is an error, not a wrap: {error}")


if __name__ == "__main__":
    main()
