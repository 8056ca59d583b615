"""st.viz: every picture renders under Agg; heatmap pixels, activation-grid colours, topology
and history contents."""

import io

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.patches import Polygon, Rectangle
from torch import nn

import spatium_torch as st
from spatium_torch import viz
from spatium_torch.ops import ACTIVATIONS


def render(fig):
    """The figure drawn by Agg: RGB floats in [0, 1], row 0 at the top."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def pixel(fig, image, ax, x, y):
    """The rendered colour at data coordinates (x, y) of `ax`."""
    px, py = ax.transData.transform((x, y))
    return image[int(round(fig.bbox.height - py)), int(round(px))]


def png_size(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def image_layer(bits=8, density=1.0, region_bits=3, out=4, **kw):
    torch.manual_seed(0)
    return st.SpatialLayer(
        64,
        out,
        bits=bits,
        density=density,
        region_bits=region_bits,
        input_positions=st.layouts.grid(8, 8),
        **kw,
    )


def small_model(bits, density):
    torch.manual_seed(0)
    return nn.Sequential(
        image_layer(bits, density, out=16, activation="map", map_init="random"),
        nn.ReLU(),
        st.SpatialLayer(16, 10, bits=bits, density=density, region_bits=2),
    )


def grown(model):
    """Trains `model` a few steps under a GrowthController that splits its first layer; returns
    the controller (its history holds records and the grow events)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    controller = st.GrowthController(
        model, optimizer, grow_every=2, growth_threshold=0.2, max_neurons=24, history_every=1
    )
    for _ in range(6):
        loss = model(torch.rand(32, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        controller.record_loss(loss.detach())
        optimizer.step()
    controller.remove()
    return controller


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("growth", [False, True])
def test_every_picture_renders(bits, density, growth):
    model = small_model(bits, density)
    if growth:
        log = grown(model)
        assert model[0].out_features > 16 and model[2].in_features == model[0].out_features
        assert [e.kind for e in log.events][:1] == ["grow"]
    else:
        model(torch.rand(32, 64))
        log = st.TrainingHistory()
        log.record(0, model, 2.3)
    width = model[0].out_features

    heatmap = viz.memory_heatmap(model[0], [0, width - 1])
    assert [im.get_array().shape for ax in heatmap.axes[:2] for im in ax.images] == [(8, 8)] * 2
    regions = viz.memory_heatmap(model[0], width - 1, by="region")
    grid = viz.activation_grid(model[0], width - 1)
    topology = viz.topology(model)
    assert topology.axes[0].get_title() == f"topology: 64 → {width} → 10"
    drawn = viz.history(log)
    widths = drawn.axes[1].lines[0].get_ydata()
    assert (widths[0], widths[-1]) == (16, width)
    for fig in (heatmap, regions, grid, topology, drawn):
        render(fig)
        w, h = png_size(fig)
        assert w > 200 and h > 200


def test_heatmap_is_bright_exactly_where_weights_were_written():
    layer = image_layer(bits=8, density=0.25)
    with torch.no_grad():
        layer.weight.zero_()
    written = {(2, 5): 0.9, (6, 1): -0.8}
    for (x, y), value in written.items():
        layer.memory.write(1, (x, y, 0), value)
    stored = layer.block_mask()[1].reshape(8, 8)  # [h, w]: input order of grid() is row-major
    fig = viz.memory_heatmap(layer, 1, borders=False)
    image = render(fig)
    ax = fig.axes[0]
    empty, zero = np.array(to_rgb(viz.EMPTY_COLOUR)), np.array(colormaps["inferno"](0.0)[:3])
    for y in range(8):
        for x in range(8):
            colour = pixel(fig, image, ax, x, y)
            if (x, y) in written:
                expected = colormaps["inferno"](abs(written[(x, y)]) / 0.9)[:3]
                np.testing.assert_allclose(colour, expected, atol=0.02)
                assert colour.mean() > 0.5
            else:
                np.testing.assert_allclose(colour, zero if stored[y, x] else empty, atol=0.02)
                assert colour.max() < 0.15


def test_heatmap_by_region_shows_the_share_of_non_zero_codes():
    layer = image_layer(bits=8, density=0.25)
    with torch.no_grad():
        layer.weight.zero_()
    layer.memory.write(0, (4, 4, 0), 0.5)  # one of the 2x2 block at x, y in 4..5
    data = viz.memory_heatmap(layer, 0, by="region").axes[0].images[0].get_array()
    np.testing.assert_allclose(data[4:6, 4:6], 0.25)
    stored = layer.block_mask()[0].reshape(8, 8).numpy()
    assert np.all(data.mask == ~stored)
    assert np.all((data.compressed() >= 0) & (data.compressed() <= 1))


@pytest.mark.parametrize(("region_bits", "segments"), [(6, 16), (3, 48), (0, 112)])
def test_heatmap_region_borders(region_bits, segments):
    # grid(8, 8) at z=0: a region of 2**region_bits codes is a 4x4 patch (6), 2x2 (3), one
    # pixel (0: all 112 inner edges of the 8x8 grid).
    fig = viz.memory_heatmap(image_layer(region_bits=region_bits), 0)
    lines = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert len(lines[0].get_segments()) == segments
    assert not [
        c
        for c in viz.memory_heatmap(image_layer(), 0, borders=False).axes[0].collections
        if isinstance(c, LineCollection)
    ]


def test_heatmap_of_a_3d_layout_slices_by_z():
    layer = st.SpatialLayer(64, 2, region_bits=3)  # default layout: a 4x4x4 cube
    for z in range(4):
        assert viz.memory_heatmap(layer, 0, z=z).axes[0].images[0].get_array().count() == 16


def test_heatmap_errors():
    layer = image_layer()
    with pytest.raises(ValueError, match="no input lies at z=1"):
        viz.memory_heatmap(layer, 0, z=1)
    with pytest.raises(IndexError, match="neuron 4 out of range"):
        viz.memory_heatmap(layer, 4)
    with pytest.raises(ValueError, match="by must be one of"):
        viz.memory_heatmap(layer, 0, by="colour")
    with pytest.raises(TypeError, match="expected a SpatialLayer"):
        viz.memory_heatmap(nn.Linear(3, 3), 0)
    with pytest.raises(ValueError, match="unknown matplotlib colormap"):
        viz.memory_heatmap(layer, 0, cmap="nope")
    spread = st.SpatialLayer(2, 1, input_positions=torch.tensor([[0, 0, 0], [60000, 60000, 0]]))
    with pytest.raises(ValueError, match="more than"):
        viz.memory_heatmap(spread, 0)


def test_activation_grid_colours_brightness_and_dead_cells():
    layer = image_layer(out=3, activation="map", map_init="random")
    hits = torch.zeros(64, dtype=torch.int64)
    hits[:20] = 100  # full brightness
    hits[20] = 1  # the dimmest hit cell
    layer.activation_map.hits[2] = hits  # cells 21..63: dead
    table = layer.activation_map.function_table()[2]
    fig = viz.activation_grid(layer, 2)
    image = render(fig)
    ax = fig.axes[0]
    for cell in range(64):
        row, col = divmod(cell, 8)
        colour = pixel(fig, image, ax, col, row)
        function = np.array(to_rgb(viz.FUNCTION_COLOURS[ACTIVATIONS[table[cell]]]))
        if cell < 20:
            expected = function
        elif cell == 20:
            expected = viz.MIN_BRIGHTNESS * function
        else:
            expected = np.array(to_rgb(viz.DEAD_COLOUR))
        np.testing.assert_allclose(colour, expected, atol=0.02, err_msg=f"cell {cell}")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels == {ACTIVATIONS[i] for i in table.tolist()} | {"dead (no hits)"}
    assert ax.get_title() == "neuron 2: 2001 hits, 43 dead cells"


def test_activation_grid_needs_a_map():
    with pytest.raises(ValueError, match="no activation map"):
        viz.activation_grid(image_layer(), 0)


def test_twelve_distinct_function_colours():
    assert list(viz.FUNCTION_COLOURS) == list(ACTIVATIONS)
    colours = {to_rgb(c) for c in viz.FUNCTION_COLOURS.values()} | {to_rgb(viz.DEAD_COLOUR)}
    assert len(colours) == 13


def test_topology_draws_counts_density_and_saturation():
    torch.manual_seed(0)
    model = nn.Sequential(
        st.SpatialLayer(64, 32, bits=2, density=0.5, region_bits=3),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    fig = viz.topology(model)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    bands = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(bars) == 3 and len(bands) == 2
    heights = [b.get_height() for b in bars]
    assert heights == pytest.approx([1.0, 0.5, 10 / 64])
    saturation = float(model[0].saturation().mean())
    assert saturation == pytest.approx(0.5)
    np.testing.assert_allclose(bars[1].get_facecolor(), colormaps["viridis"](saturation))
    density = model[0].memory.stats().nonzero / (64 * 32)
    assert bands[0].get_alpha() == pytest.approx(0.1 + 0.6 * density)
    assert bands[1].get_alpha() == pytest.approx(0.7)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "32 neurons" in texts and "2-bit, sat 0.50" in texts and "fp32" in texts
    with pytest.raises(ValueError, match="no SpatialLayer or nn.Linear"):
        viz.topology(nn.ReLU())


def test_history_from_records_events_and_a_controller():
    history = st.TrainingHistory(layer_names=("0", "2"))
    for step, widths, loss in ((0, (8, 10), 2.0), (10, (8, 10), 1.0), (20, (12, 10), 0.5)):
        history.records.append(st.HistoryRecord(step, loss, widths, (0.5, 1.0)))
    history.events += [
        st.GrowthEvent(15, "0", "grow", 4, 0, 0, (12, 10), loss_before=0.8),
        st.GrowthEvent(18, "0", "prune", 0, 1, 0, (11, 10), loss_before=0.7),
        st.GrowthEvent(19, "0", "rewire", 0, 0, 3, (11, 10)),
    ]
    fig = viz.history(history)
    loss_ax, width_ax, sat_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == [2.0, 1.0, 0.5]
    assert list(width_ax.lines[0].get_xdata()) == [0, 10, 15, 18, 19, 20]
    assert list(width_ax.lines[0].get_ydata()) == [8, 8, 12, 11, 11, 12]
    assert [t.get_text() for t in width_ax.get_legend().get_texts()] == ["0", "2"]
    markers = [ln for ln in sat_ax.lines if list(ln.get_xdata()) in ([15, 15], [18, 18], [19, 19])]
    assert [to_rgb(ln.get_color()) for ln in markers] == [
        to_rgb(viz.EVENT_COLOURS[k]) for k in ("grow", "prune", "rewire")
    ]
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"grow", "prune", "rewire"}

    # Events alone: widths from the events, loss from loss_before.
    fig = viz.history(history.events)
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.8, 0.7]
    assert list(fig.axes[1].lines[0].get_ydata()) == [12, 11, 11]

    class Controller:
        pass

    controller = Controller()
    controller.history = history
    assert list(viz.history(controller).axes[0].lines[0].get_ydata()) == [2.0, 1.0, 0.5]


def test_history_errors():
    with pytest.raises(TypeError, match="expected a TrainingHistory"):
        viz.history({"loss": [1.0]})
    with pytest.raises(ValueError, match="nothing recorded"):
        viz.history(st.TrainingHistory())


def test_core_import_does_not_load_matplotlib():
    import subprocess
    import sys

    code = "import sys, spatium_torch; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == (
        "False\n"
    )
