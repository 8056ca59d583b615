"""st.Dashboard: live view in a (recorded) terminal, plain lines elsewhere, hooks and limits."""

import io

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import spatium_torch as st


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(16, 8, density=0.5, region_bits=2), nn.ReLU(), st.SpatialLayer(8, 4)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model, optimizer, dashboard, steps):
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
        optimizer.zero_grad()
        loss.backward()
        dashboard.record_loss(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_live_view_in_a_recorded_terminal():
    model, optimizer = model_and_optimizer()
    console = Console(record=True, force_terminal=True, width=120, file=io.StringIO())
    with st.Dashboard(
        model, optimizer, total_steps=5, console=console, refresh_per_second=1e6
    ) as dashboard:
        assert dashboard.interactive
        losses = train(model, optimizer, dashboard, 5)
    assert dashboard.steps == 5
    assert not optimizer._optimizer_step_post_hooks  # the hook left with the dashboard
    text = console.export_text()
    for expected in (
        "layer",
        "neurons",
        "active",
        "saturation",
        "sparsity",
        "grow",
        "prune",
        "step 5/5 (100%)",
        f"loss {losses[-1]:.4f}",
        "steps/s",
    ):
        assert expected in text
    stats = st.network_stats(model).layer_stats
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["2"])]
    assert len(rows) >= 2
    for row, s in zip(rows[-2:], stats, strict=True):
        name, neurons, active, saturation, sparsity, grow, prune = row
        assert (name, int(neurons), int(active)) == (s.name, s.neuron_count, s.active_neurons)
        assert float(saturation) == pytest.approx(s.average_saturation, abs=0.005)
        assert float(sparsity) == pytest.approx(s.sparsity, abs=0.005)
        assert (int(grow), int(prune)) == (s.growth_candidates, s.prune_candidates)
    assert "━" in text  # the progress bar


def test_redraws_at_most_refresh_per_second():
    model, _ = model_and_optimizer()
    console = Console(force_terminal=True, file=io.StringIO())
    with st.Dashboard(model, console=console, refresh_per_second=0.5) as dashboard:
        for _ in range(1000):
            dashboard.step(0.5)
    # One draw on entry, one on exit: 1000 quick steps asked for none in between.
    assert dashboard.steps == 1000 and dashboard.refreshes == 2


def test_plain_lines_in_a_non_interactive_console():
    model, optimizer = model_and_optimizer()
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    with st.Dashboard(model, optimizer, total_steps=7, every=3, console=console) as dashboard:
        assert not dashboard.interactive
        losses = train(model, optimizer, dashboard, 7)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "step 3/7 (43%)",
        "step 6/7 (86%)",
        "step 7/7 (100%)",  # the final state, though 7 is no multiple of 3
    ]
    assert f"loss {losses[-1]:.4f}" in lines[-1]
    assert "0: 8 neurons" in lines[-1] and "2: 4 neurons" in lines[-1]
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log


def test_without_optimizer_step_counts_and_takes_a_loss():
    model, _ = model_and_optimizer()
    out = io.StringIO()
    with st.Dashboard(model, every=2, console=Console(file=out), interactive=False) as dashboard:
        dashboard.step(torch.tensor(0.25))
        dashboard.step(0.125)
    assert out.getvalue().splitlines()[0].startswith("step 2 | loss 0.1250 | ")


def test_bad_arguments():
    model, optimizer = model_and_optimizer()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        st.Dashboard(optimizer)
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
        st.Dashboard(model, model)
    for kwargs, message in (
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"every": 0}, "every must be a positive int"),
        ({"refresh_per_second": 0}, "refresh_per_second must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            st.Dashboard(model, **kwargs)
