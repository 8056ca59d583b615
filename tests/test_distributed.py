"""DistributedDataParallel on two CPU processes (gloo on 127.0.0.1): every rank's store stays
identical, even when each rank drew its own random layout, and growth, pruning and rewiring make
the same change on every rank and training goes on after it."""

import math
import os
from collections.abc import Callable

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


def on_rank(rank: int, rendezvous: str, body: Callable[[int], None]) -> None:
    # A file rendezvous: no port to race for; gloo itself talks over loopback.
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    body(rank)  # an exception fails the test (the spawn context reports it)
    dist.barrier()  # neither rank leaves while the other still communicates
    # Leave without tearing gloo down: now and then its teardown aborted a rank ("terminate
    # called without an active exception", SIGABRT) after the test had passed.
    os._exit(0)


def run_on_every_rank(body: Callable[[int], None], tmp_path) -> None:
    mp.start_processes(
        on_rank,
        args=(f"file://{tmp_path / 'rendezvous'}", body),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )


def train_on_rank(rank: int) -> None:
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


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_keeps_every_rank_store_identical(tmp_path):
    run_on_every_rank(train_on_rank, tmp_path)


def grow_on_rank(rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(64, 16, bits=4, region_bits=3, density=0.25, connectivity="random"),
        nn.ReLU(),
        st.SpatialLayer(16, 4, bits=4, region_bits=2),
    )
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # idle neurons: pruned at the first prune event
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    torch.manual_seed(rank)  # the global generators differ: decisions must not use them
    controller = st.GrowthController(
        model, optimizer, grow_every=3, prune_every=4, rewire_every=2,
        growth_threshold=0.3, prune_threshold=0.1,
    )  # fmt: skip
    with torch.no_grad():
        model[0].activity[:3] = 0.0  # the idle neurons, on both ranks
        model[0].activity[5] = 0.0 if rank == 0 else 1.0  # idle on one rank only: kept
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    losses = []
    for _ in range(12):
        x = torch.randn(16, 64, generator=generator)
        x[:, : 8 * rank] = 0.0  # the ranks see different activity and gradients
        target = torch.randint(0, 4, (16,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(x), target)
        loss.backward()
        optimizer.step()
        ddp = controller.rewrap(ddp)
        losses.append(loss.item())
    kinds = {event.kind for event in controller.events}
    assert kinds == {"grow", "prune", "rewire"}, kinds
    assert model[0].out_features != 16
    events = [(e.step, e.layer, e.kind, e.split, e.pruned, e.rewired) for e in controller.events]
    assert same_on_every_rank(events), "the ranks made different changes"
    assert same_on_every_rank(fingerprint(model)), "stores differ after growth"
    assert all(map(math.isfinite, losses))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_growth_makes_the_same_change_on_every_rank(tmp_path):
    run_on_every_rank(grow_on_rank, tmp_path)
