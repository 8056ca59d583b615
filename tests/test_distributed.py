"""DistributedDataParallel on two CPU processes (gloo on 127.0.0.1): every rank's store stays
identical, even when each rank drew its own random layout."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spatium_torch as st

WORLD = 2


def fingerprint(model: nn.Module) -> list:
    """The parameters, positions and stores in the state_dict, and the stats the host-side
    store reports. (The activity statistics are left out: each rank measures its own batches,
    as BatchNorm's running statistics.)"""
    statistics = ("activity", "output_mean")
    state = [(k, v.tolist()) for k, v in model.state_dict().items() if k[2:] not in statistics]
    stats = [m.memory.stats() for m in model.modules() if isinstance(m, st.SpatialLayer)]
    return [state, stats]


def same_on_every_rank(value: object) -> bool:
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)


def train_on_rank(rank: int, rendezvous: str) -> None:
    # A file rendezvous: no port to race for; gloo itself talks over loopback.
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(rank)  # each rank draws its own random active blocks and weights
        model = nn.Sequential(
            st.SpatialLayer(64, 32, bits=4, region_bits=3, density=0.25, connectivity="random"),
            nn.ReLU(),
            st.SpatialLayer(32, 4, bits=2, region_bits=3, density=0.5, connectivity="random"),
        )
        assert not same_on_every_rank(fingerprint(model))
        # The store's arrays are buffers: DDP broadcasts rank 0's at construction (and, with
        # broadcast_buffers, the default, before every forward).
        ddp = DistributedDataParallel(model)
        assert same_on_every_rank(fingerprint(model)), "stores differ after DDP construction"
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + rank))
        target = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(rank))
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), target).backward()
            optimizer.step()
        with torch.no_grad():
            assert same_on_every_rank(model(x[:1] * 0 + 1).tolist())
        assert same_on_every_rank(fingerprint(model)), "stores differ after training"
        dist.barrier()  # neither rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_keeps_every_rank_store_identical(tmp_path):
    mp.start_processes(
        train_on_rank,
        args=(f"file://{tmp_path / 'rendezvous'}",),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
