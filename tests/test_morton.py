"""Morton ops: exact round trips, agreement with the bit-by-bit definition, clear errors."""

import pytest
import torch
from conftest import requires_cuda

import spatium_torch as st

EDGES = sorted({0, 1, 0xFFFF, 0xFFFE, 0x7FFF, 0x5555, 0xAAAA} | {1 << i for i in range(16)})


def reference_encode(xyz: torch.Tensor) -> torch.Tensor:
    """The definition: bit i of x, y, z goes to bit 3i, 3i+1, 3i+2."""
    xyz = xyz.to(torch.int64)
    code = torch.zeros(xyz.shape[0], dtype=torch.int64)
    for i in range(16):
        for axis in range(3):
            code |= ((xyz[:, axis] >> i) & 1) << (3 * i + axis)
    return code


def edge_positions() -> torch.Tensor:
    v = torch.tensor(EDGES)
    return torch.cartesian_prod(v, v, v)


def random_positions(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1 << 16, (n, 3), generator=torch.Generator().manual_seed(seed))


def test_edge_values_match_definition_and_round_trip():
    xyz = edge_positions()
    codes = st.morton_encode(xyz)
    assert codes.dtype == torch.int64 and codes.shape == (xyz.shape[0],)
    assert torch.equal(codes, reference_encode(xyz))
    assert torch.equal(st.morton_decode(codes), xyz)


def test_extremes():
    xyz = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [65535, 65535, 65535]])
    assert st.morton_encode(xyz).tolist() == [0, 1, 2, 4, 2**48 - 1]


def test_one_million_random_positions_round_trip():
    xyz = random_positions(1_000_000)
    codes = st.morton_encode(xyz)
    assert torch.equal(codes, reference_encode(xyz))
    assert torch.equal(st.morton_decode(codes), xyz)


def test_decode_then_encode_is_identity_on_random_codes():
    codes = torch.randint(0, 2**48, (100_000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(st.morton_encode(st.morton_decode(codes)), codes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.uint16])
def test_integer_dtypes_agree(dtype):
    high = min(65536, torch.iinfo(dtype).max + 1)
    xyz = torch.randint(0, high, (1000, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(st.morton_encode(xyz.to(dtype)), st.morton_encode(xyz))
    codes = st.morton_encode(xyz)
    assert torch.equal(st.morton_decode(codes.to(torch.int64)), xyz)


def test_non_contiguous_and_empty_inputs():
    wide = random_positions(1000).repeat(1, 2)  # [N, 6]
    view = wide[:, 1:4]
    assert not view.is_contiguous()
    assert torch.equal(st.morton_encode(view), reference_encode(view))
    codes = st.morton_encode(random_positions(64))
    assert torch.equal(st.morton_decode(codes[::2]), st.morton_decode(codes)[::2])
    assert st.morton_encode(torch.empty(0, 3, dtype=torch.int64)).shape == (0,)
    assert st.morton_decode(torch.empty(0, dtype=torch.int64)).shape == (0, 3)


def test_morton_order_of_a_default_layout_is_index_order():
    # The default layout: input j sits at morton_decode(j), so index order is Morton order.
    j = torch.arange(4096)
    assert torch.equal(st.morton_encode(st.morton_decode(j)), j)


@pytest.mark.parametrize("bad", [-1, 65536, 2**40, -(2**63)])
@pytest.mark.parametrize("column", [0, 1, 2])
def test_out_of_range_coordinates_are_errors(bad, column):
    xyz = random_positions(10)
    xyz[7, column] = bad
    with pytest.raises(ValueError, match=r"\[0, 65535\].*at row 7"):
        st.morton_encode(xyz)


def test_first_bad_row_is_reported_from_parallel_tasks():
    xyz = random_positions(300_000)
    xyz[123_456, 1] = 70_000
    xyz[250_000, 0] = -3
    with pytest.raises(ValueError, match="at row 123456"):
        st.morton_encode(xyz)


@pytest.mark.parametrize("bad", [-1, 2**48, 2**62, -(2**63)])
def test_out_of_range_codes_are_errors(bad):
    codes = torch.arange(10)
    codes[4] = bad
    with pytest.raises(ValueError, match=r"\[0, 2\^48\).*at index 4"):
        st.morton_decode(codes)


@pytest.mark.parametrize("shape", [(3,), (5, 2), (5, 4), (5, 3, 1), ()])
def test_encode_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        st.morton_encode(torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(), (5, 1), (2, 3)])
def test_decode_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        st.morton_decode(torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_non_integer_dtypes_are_errors(dtype):
    with pytest.raises(TypeError, match="integer tensor"):
        st.morton_encode(torch.zeros(4, 3, dtype=dtype))
    with pytest.raises(TypeError, match="integer tensor"):
        st.morton_decode(torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_opcheck(n):
    xyz = random_positions(n)
    torch.library.opcheck(torch.ops.spatium.morton_encode.default, (xyz,))
    torch.library.opcheck(torch.ops.spatium.morton_encode.default, (xyz.to(torch.int32),))
    torch.library.opcheck(torch.ops.spatium.morton_decode.default, (st.morton_encode(xyz),))


def test_compiles_with_dynamic_shapes():
    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def round_trip(xyz):
        return st.morton_decode(st.morton_encode(xyz))

    for n in (5, 17):
        xyz = random_positions(n)
        assert torch.equal(round_trip(xyz), xyz)


def test_parallel_for_really_runs_in_parallel():
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs with one thread here")
    # 1 would mean the extension was built without OpenMP and at::parallel_for ran serially.
    assert torch.ops.spatium._threads_used_by_parallel_for(64 * threads) == threads


def test_one_and_many_threads_agree():
    xyz = random_positions(200_000, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = st.morton_encode(xyz)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, st.morton_encode(xyz))


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch may build CUDA kernels")
def test_cpu_only_build_has_no_cuda_kernels():
    assert not st.built_with_cuda()


@requires_cuda
def test_cuda_matches_cpu():
    xyz = torch.cat([edge_positions(), random_positions(100_000)])
    codes = st.morton_encode(xyz.cuda())
    assert codes.is_cuda
    assert torch.equal(codes.cpu(), st.morton_encode(xyz))
    assert torch.equal(st.morton_decode(codes).cpu(), xyz)
    assert torch.equal(st.morton_encode(xyz.to(torch.int32).cuda()).cpu(), codes.cpu())
    torch.library.opcheck(torch.ops.spatium.morton_encode.default, (xyz[:1000].cuda(),))
    torch.library.opcheck(torch.ops.spatium.morton_decode.default, (codes[:1000],))


@requires_cuda
def test_cuda_errors():
    xyz = random_positions(100_000).cuda()
    xyz[54_321, 2] = 65_536
    xyz[99_000, 0] = -1
    with pytest.raises(ValueError, match="at row 54321"):
        st.morton_encode(xyz)
    codes = torch.arange(100, device="cuda")
    codes[42] = 2**48
    with pytest.raises(ValueError, match="at index 42"):
        st.morton_decode(codes)
