"""Pictures of layers and training runs, drawn with matplotlib.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot: nothing is
shown or saved until you call ``fig.savefig("name.png")`` (or a notebook displays it). Works
with no display (the Agg renderer). matplotlib is needed only here: ``import spatium_torch``
never imports this module; ``st.viz`` does, on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize, to_rgb
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Polygon, Rectangle
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("spatium_torch.viz needs matplotlib (pip install matplotlib)") from error

from spatium_torch.activation import GRID
from spatium_torch.history import GrowthEvent, TrainingHistory
from spatium_torch.layer import SpatialLayer
from spatium_torch.ops import ACTIVATIONS, morton_encode

#: Colour of each activation-map function in :func:`activation_grid` (cells at full brightness).
FUNCTION_COLOURS: dict[str, str] = {
    "relu": "#1f77b4",
    "leaky_relu": "#aec7e8",
    "elu": "#17becf",
    "gelu": "#2ca02c",
    "silu": "#98df8a",
    "sigmoid": "#ff7f0e",
    "tanh": "#d62728",
    "softplus": "#9467bd",
    "identity": "#bcbd22",
    "sin": "#e377c2",
    "gaussian": "#8c564b",
    "abs": "#ffbb78",
}
#: Colour of a dead cell (no hits) in :func:`activation_grid`.
DEAD_COLOUR = "#808080"
#: Colour of an empty position (not an input, or outside the neuron's active blocks) in
#: :func:`memory_heatmap`.
EMPTY_COLOUR = "#202020"
#: Colours of growth events in :func:`history`.
EVENT_COLOURS = {"grow": "#2ca02c", "prune": "#d62728", "rewire": "#9ecae1"}
# A cell with one hit is drawn at this brightness, the most hit cell at 1 (log scale between):
# dim enough to tell apart, bright enough to keep its hue.
MIN_BRIGHTNESS = 0.45
# A heatmap larger than this is refused: a layout spread over a huge range is not an image.
MAX_PIXELS = 1 << 22
HEATMAP_MODES = ("weight", "region")


# --- memory heatmap ---------------------------------------------------------------------------
def memory_heatmap(
    layer: SpatialLayer,
    neuron: int | Sequence[int],
    z: int = 0,
    *,
    by: str = "weight",
    borders: bool = True,
    cmap: str = "inferno",
) -> Figure:
    """The z-slice of one neuron's memory (or several side by side) over the layer's input
    space: one pixel per input position ``(x, y)`` at depth ``z``, ``x`` to the right and ``y``
    down, so with an image layout (:func:`spatium_torch.layouts.grid`) a first-layer neuron's
    heatmap is its receptive field.

    Args:
        layer: the layer.
        neuron: a neuron index, or a sequence of them (one panel each, one colour scale).
        z: the slice; some input must lie at this depth.
        by: ``"weight"``: colour = |stored weight|; ``"region"``: colour = density of the
            position's block (its share of non-zero codes).
        borders: draw the borders between regions (blocks).
        cmap: a matplotlib colormap name.

    Positions that are not inputs of the layer, or lie outside the neuron's active blocks,
    are drawn dark (:data:`EMPTY_COLOUR`).
    """
    if not isinstance(layer, SpatialLayer):
        raise TypeError(f"memory_heatmap: expected a SpatialLayer, got {type(layer).__name__}")
    if by not in HEATMAP_MODES:
        raise ValueError(f"memory_heatmap: by must be one of {HEATMAP_MODES}, got {by!r}")
    neurons = _neuron_list(layer, neuron)
    positions = layer.input_positions
    in_slice = positions[:, 2] == z
    if not bool(in_slice.any()):
        low, high = int(positions[:, 2].min()), int(positions[:, 2].max())
        raise ValueError(f"memory_heatmap: no input lies at z={z} (inputs span z {low}..{high})")
    width, height = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"memory_heatmap: the input layout spans {width} x {height} positions, more than "
            f"{MAX_PIXELS} pixels"
        )
    values = _heatmap_values(layer, neurons, by)[:, in_slice].numpy()
    xs, ys = positions[in_slice, 0].numpy(), positions[in_slice, 1].numpy()
    vmax = float(np.nanmax(values)) if not np.all(np.isnan(values)) else 0.0
    colours = _colormap(cmap).with_extremes(bad=EMPTY_COLOUR)

    fig = Figure(figsize=(min(3.2 * len(neurons), 16) + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, len(neurons), squeeze=False)[0]
    regions = _region_image(layer, in_slice, width, height) if borders else None
    for ax, n, row in zip(axes, neurons, values, strict=True):
        image = np.full((height, width), np.nan)
        image[ys, xs] = row
        shown = ax.imshow(image, cmap=colours, vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
        if regions is not None:
            ax.add_collection(_border_lines(regions))
        ax.set_title(f"neuron {n}, z={z}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    label = "|weight|" if by == "weight" else "block density (non-zero share)"
    fig.colorbar(shown, ax=list(axes), label=label, shrink=0.9)
    return fig


def _neuron_list(layer: SpatialLayer, neuron: int | Sequence[int]) -> list[int]:
    neurons = [neuron] if isinstance(neuron, (int, np.integer)) else list(neuron)
    if not neurons:
        raise ValueError("memory_heatmap: no neuron given")
    for n in neurons:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"neuron must be an int, got {n!r}")
        if not 0 <= n < layer.out_features:
            raise IndexError(f"neuron {n} out of range [0, {layer.out_features})")
    return [int(n) for n in neurons]


def _input_regions(layer: SpatialLayer) -> torch.Tensor:
    """Region index (0..regions-1) of every input, in input order."""
    keys = morton_encode(layer.input_positions) >> layer.region_bits
    return torch.unique(keys, return_inverse=True)[1]


def _heatmap_values(layer: SpatialLayer, neurons: list[int], by: str) -> torch.Tensor:
    """``[len(neurons), in]`` float64, NaN where the input is not stored."""
    with torch.no_grad():
        weight = layer.dequantized_weight()[neurons].double()
    stored = layer.block_mask()[neurons]
    if by == "weight":
        values = weight.abs()
    else:
        region = _input_regions(layer)
        count = torch.bincount(region).double()
        nonzero = torch.zeros(len(neurons), len(count), dtype=torch.float64)
        nonzero.index_add_(1, region, (weight != 0).double())
        values = (nonzero / count)[:, region]
    return values.masked_fill(~stored, float("nan"))


def _region_image(
    layer: SpatialLayer, in_slice: torch.Tensor, width: int, height: int
) -> np.ndarray:
    """``[height, width]`` region index of each input of the slice, -1 elsewhere."""
    image = np.full((height, width), -1, dtype=np.int64)
    positions = layer.input_positions[in_slice].numpy()
    image[positions[:, 1], positions[:, 0]] = _input_regions(layer)[in_slice].numpy()
    return image


def _border_lines(regions: np.ndarray) -> LineCollection:
    """Segments along pixel edges where the region changes (pixel centres at integers)."""
    segments = []
    ys, xs = np.nonzero(_changes(regions[:, :-1], regions[:, 1:]))
    segments += [((x + 0.5, y - 0.5), (x + 0.5, y + 0.5)) for y, x in zip(ys, xs, strict=True)]
    ys, xs = np.nonzero(_changes(regions[:-1, :], regions[1:, :]))
    segments += [((x - 0.5, y + 0.5), (x + 0.5, y + 0.5)) for y, x in zip(ys, xs, strict=True)]
    return LineCollection(segments, colors="white", linewidths=1.0, alpha=0.7)


def _changes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Only between inputs: the edge of the layout is no region border.
    return (a != b) & (a >= 0) & (b >= 0)


# --- activation grid --------------------------------------------------------------------------
def activation_grid(layer: SpatialLayer, neuron: int) -> Figure:
    """One neuron's 8x8 activation map: cell colour = its function (:data:`FUNCTION_COLOURS`,
    legend at the side), brightness = its hit count (log scale, the most hit cell at full
    colour), dead cells (no hits) grey. Row ``r``, column ``c`` is cell ``8 * r + c``."""
    if not isinstance(layer, SpatialLayer):
        raise TypeError(f"activation_grid: expected a SpatialLayer, got {type(layer).__name__}")
    if layer.activation_map is None:
        raise ValueError("activation_grid: the layer has no activation map (activation='map')")
    (neuron,) = _neuron_list(layer, neuron)
    table = layer.activation_map.function_table()[neuron].reshape(GRID, GRID).numpy()
    hits = layer.activation_map.hits[neuron].reshape(GRID, GRID).numpy()
    palette = np.array([to_rgb(FUNCTION_COLOURS[name]) for name in ACTIVATIONS])
    brightness = np.ones(hits.shape)
    if hits.max() > 1:
        brightness += (1.0 - MIN_BRIGHTNESS) * (
            np.log(np.maximum(hits, 1)) / np.log(hits.max()) - 1.0
        )
    rgb = palette[table] * brightness[..., None]
    rgb[hits == 0] = to_rgb(DEAD_COLOUR)

    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks(range(GRID))
    ax.set_yticks(range(GRID))
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    dead = int((hits == 0).sum())
    ax.set_title(f"neuron {neuron}: {int(hits.sum())} hits, {dead} dead cells")
    used = sorted(set(table.flatten().tolist()))
    handles = [Patch(color=FUNCTION_COLOURS[ACTIVATIONS[i]], label=ACTIVATIONS[i]) for i in used]
    handles.append(Patch(color=DEAD_COLOUR, label="dead (no hits)"))
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    return fig


# --- topology ---------------------------------------------------------------------------------
def topology(model: nn.Module) -> Figure:
    """The model's SpatialLayers and nn.Linear layers left to right (module order), after a
    column for the input: each layer a bar whose height follows its neuron count, coloured by
    average saturation (nn.Linear grey), labelled with neurons, bits and saturation; between
    two columns a band whose opacity is the connection density (non-zero weights over
    ``in x out``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"topology: expected an nn.Module, got {type(model).__name__}")
    layers = [
        (name or type(m).__name__, m)
        for name, m in model.named_modules()
        if isinstance(m, (SpatialLayer, nn.Linear))
    ]
    if not layers:
        raise ValueError("topology: the model has no SpatialLayer or nn.Linear")
    columns = [("input", layers[0][1].in_features, None, None)]
    densities = []
    for name, layer in layers:
        if isinstance(layer, SpatialLayer):
            stats = layer.memory.stats()
            saturation = float(layer.saturation().mean())
            columns.append((name, layer.out_features, layer.bits, saturation))
            densities.append(stats.nonzero / (layer.in_features * layer.out_features))
        else:
            columns.append((name, layer.out_features, None, None))
            densities.append(float((layer.weight != 0).float().mean()))

    fig = Figure(figsize=(max(5.0, 2.2 * len(columns)), 4.5), layout="constrained")
    ax = fig.subplots()
    colours = _colormap("viridis")
    tallest = max(count for _, count, _, _ in columns)
    heights = [max(0.04, count / tallest) for _, count, _, _ in columns]
    half = 0.18  # half a bar's width
    for i, density in enumerate(densities):
        left, right = i + half, i + 1 - half
        band = [
            (left, -heights[i] / 2),
            (left, heights[i] / 2),
            (right, heights[i + 1] / 2),
            (right, -heights[i + 1] / 2),
        ]
        ax.add_patch(Polygon(band, color="#4c72b0", alpha=0.1 + 0.6 * density, lw=0))
        ax.text(i + 0.5, 0.0, f"density\n{density:.2f}", ha="center", va="center", fontsize=8)
    for i, ((name, count, bits, saturation), h) in enumerate(zip(columns, heights, strict=True)):
        if saturation is None:
            colour, detail = "#b0b0b0", "fp32" if i else f"{count} features"
        else:
            colour, detail = colours(saturation), f"{bits}-bit, sat {saturation:.2f}"
        ax.add_patch(Rectangle((i - half, -h / 2), 2 * half, h, color=colour, ec="black"))
        label = name if i == 0 else f"{name}\n{count} neurons"
        ax.text(i, -0.56, f"{label}\n{detail}", ha="center", va="top", fontsize=8)
    widths = " → ".join(str(count) for _, count, _, _ in columns)
    ax.set_title(f"topology: {widths}")
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(-0.95, 0.58)
    ax.axis("off")
    sm = _scalar_mappable(colours)
    fig.colorbar(sm, ax=ax, label="average saturation (SpatialLayer)", shrink=0.7)
    return fig


# --- training history -------------------------------------------------------------------------
def history(log: TrainingHistory | Sequence[GrowthEvent] | Any) -> Figure:
    """Loss, neurons per layer and average saturation per layer over optimizer steps, with
    growth (green), pruning (red) and rewiring (light blue, dotted) events marked.

    Args:
        log: a :class:`~spatium_torch.TrainingHistory`, a list of
            :class:`~spatium_torch.GrowthEvent`, or an object whose ``history`` attribute is a
            TrainingHistory (a growth controller). From events alone the widths come from the
            events and the loss from their ``loss_before``.
    """
    run = _as_history(log)
    if not run.records and not run.events:
        raise ValueError("history: nothing recorded (no records, no events)")
    fig = Figure(figsize=(8.0, 7.5), layout="constrained")
    loss_ax, width_ax, sat_ax = fig.subplots(3, 1, sharex=True)
    names = _layer_names(run)

    losses = [(r.step, r.loss) for r in run.records if r.loss is not None]
    if not losses:
        losses = [(e.step, e.loss_before) for e in run.events if e.loss_before is not None]
    _plot_or_note(loss_ax, losses, "loss", "no loss recorded")

    widths = sorted(
        [(r.step, r.widths) for r in run.records] + [(e.step, e.widths) for e in run.events],
        key=lambda item: item[0],
    )
    for i, name in enumerate(names):
        series = [(step, w[i]) for step, w in widths if i < len(w)]
        width_ax.step(*zip(*series, strict=True), where="post", label=name)
    width_ax.set_ylabel("neurons")
    width_ax.legend(fontsize=8, loc="upper left")

    if run.records:
        for i, name in enumerate(names):
            series = [(r.step, r.saturation[i]) for r in run.records if i < len(r.saturation)]
            sat_ax.plot(*zip(*series, strict=True), label=name)
        sat_ax.set_ylim(0.0, 1.05)
    else:
        _note(sat_ax, "no per-step records")
    sat_ax.set_ylabel("average saturation")
    sat_ax.set_xlabel("optimizer step")

    for ax in (loss_ax, width_ax, sat_ax):
        for event in run.events:
            ax.axvline(event.step, zorder=0, **_event_style(event.kind))
    kinds = sorted({e.kind for e in run.events})
    if kinds:
        handles = [Line2D([], [], label=k, **_event_style(k)) for k in kinds]
        fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)
    fig.suptitle("training history")
    return fig


def _as_history(log: Any) -> TrainingHistory:
    if isinstance(log, TrainingHistory):
        return log
    if isinstance(getattr(log, "history", None), TrainingHistory):
        return log.history
    if isinstance(log, Sequence) and all(isinstance(e, GrowthEvent) for e in log):
        return TrainingHistory(events=list(log))
    raise TypeError(
        "history: expected a TrainingHistory, a list of GrowthEvent or an object with a "
        f"TrainingHistory in .history, got {type(log).__name__}"
    )


def _event_style(kind: str) -> dict[str, Any]:
    # Rewiring runs often: thin dotted lines that leave grow and prune events readable.
    rewire = kind == "rewire"
    return {
        "color": EVENT_COLOURS[kind],
        "lw": 0.6 if rewire else 1.0,
        "ls": ":" if rewire else "--",
    }


def _layer_names(run: TrainingHistory) -> list[str]:
    count = max(len(w) for w in [r.widths for r in run.records] + [e.widths for e in run.events])
    names = list(run.layer_names)
    return names + [f"layer {i}" for i in range(len(names), count)]


def _plot_or_note(ax: Any, points: list[tuple[int, float]], label: str, note: str) -> None:
    if points:
        ax.plot(*zip(*points, strict=True), color="black", lw=1.0)
    else:
        _note(ax, note)
    ax.set_ylabel(label)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


# --- shared -----------------------------------------------------------------------------------
def _colormap(name: str) -> Any:
    if name not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {name!r}")
    return colormaps[name]


def _scalar_mappable(cmap: Any) -> ScalarMappable:
    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
