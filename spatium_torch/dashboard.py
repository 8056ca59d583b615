"""A live terminal dashboard for training loops, built on rich.

``with st.Dashboard(model, optimizer, total_steps=n):`` around an ordinary training loop shows,
per SpatialLayer, its neurons, active neurons, average saturation, sparsity and growth/prune
candidates, with the last loss, steps per second and a progress bar. In a terminal it redraws
in place at most ``refresh_per_second`` times a second; anywhere else (CI, a log file) it prints
one plain line every ``every`` steps.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import torch
from torch import nn

try:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("spatium_torch.dashboard needs rich (pip install rich)") from error

from spatium_torch.stats import NetworkStats, network_stats


class Dashboard:
    """Shows a training run's SpatialLayers live in the terminal.

    Args:
        model: the model being trained (its SpatialLayers are shown, in module order).
        optimizer: when given, every ``optimizer.step()`` counts a step (a step post-hook,
            removed on exit); without it, call :meth:`step` once per step.
        total_steps: the steps the run will take, for the progress bar (``None``: no bar).
        refresh_per_second: most redraws a second in a terminal (statistics are computed only
            for a redraw, so their cost does not grow with the step rate).
        every: in a non-interactive console, print a plain line every this many steps.
        console: the rich Console to draw on (default: a new one on stdout).
        interactive: redraw in place (True) or print plain lines (False); default: whether the
            console is a terminal.
        title: shown in the header.

    Use it as a context manager; :meth:`record_loss` gives it the last loss.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int | None = None,
        refresh_per_second: float = 4.0,
        every: int = 100,
        console: Console | None = None,
        interactive: bool | None = None,
        title: str = "training",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Dashboard: model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Dashboard: optimizer must be a torch optimizer, got {type(optimizer).__name__}"
            )
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"Dashboard: total_steps must be a positive int, got {total_steps!r}")
        if not (isinstance(refresh_per_second, (int, float)) and refresh_per_second > 0):
            raise ValueError(
                f"Dashboard: refresh_per_second must be positive, got {refresh_per_second!r}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Dashboard: every must be a positive int, got {every!r}")
        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.refresh_interval = 1.0 / refresh_per_second
        self.every = every
        self.console = console if console is not None else Console()
        if interactive is None:
            interactive = self.console.is_terminal and not self.console.is_dumb_terminal
        self.interactive = interactive
        self.title = title
        self.steps = 0
        self.refreshes = 0  # redraws or plain lines so far
        self._loss: torch.Tensor | float | None = None
        self._live: Live | None = None
        self._hook: Any = None
        self._last_time = self._start_time = time.perf_counter()
        self._last_steps = 0
        self._last_refresh = float("-inf")

    # --- use ------------------------------------------------------------------------------------
    def __enter__(self) -> Dashboard:
        self._last_time = self._start_time = time.perf_counter()
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_post_hook(self._after_optimizer_step)
        if self.interactive:
            self._live = Live(console=self.console, auto_refresh=False)
            self._live.start()
            self._refresh()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._live is not None:
            self._refresh()  # the final state stays on screen
            self._live.stop()
            self._live = None
        elif self.steps % self.every:
            self._refresh()  # the log ends with the final state

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Counts one training step (not needed when an optimizer was given), optionally with
        its loss, and redraws if it is time to."""
        if loss is not None:
            self.record_loss(loss)
        self.steps += 1
        if self.interactive:
            if time.perf_counter() - self._last_refresh >= self.refresh_interval:
                self._refresh()
        elif self.steps % self.every == 0:
            self._refresh()

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """The last loss. A tensor is read only when shown, so this costs no synchronisation."""
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self.step()

    # --- drawing --------------------------------------------------------------------------------
    def _refresh(self) -> None:
        now = time.perf_counter()
        elapsed = now - self._last_time
        rate = (self.steps - self._last_steps) / elapsed if elapsed > 0 else 0.0
        self._last_time, self._last_steps, self._last_refresh = now, self.steps, now
        stats = network_stats(self.model)
        self.refreshes += 1
        if self._live is not None:
            self._live.update(self._renderable(stats, rate), refresh=True)
        else:
            self.console.out(self.plain_line(stats, rate), highlight=False)

    def _loss_text(self) -> str:
        return "-" if self._loss is None else f"{float(self._loss):.4f}"

    def _progress_text(self) -> str:
        if self.total_steps is None:
            return f"step {self.steps}"
        share = min(self.steps / self.total_steps, 1.0)
        return f"step {self.steps}/{self.total_steps} ({100 * share:.0f}%)"

    def plain_line(self, stats: NetworkStats, rate: float) -> str:
        """The one-line form used in non-interactive consoles."""
        parts = [self._progress_text(), f"loss {self._loss_text()}", f"{rate:.1f} steps/s"]
        for s in stats.layer_stats:
            parts.append(
                f"{s.name or 'layer'}: {s.neuron_count} neurons, {s.active_neurons} active, "
                f"sat {s.average_saturation:.2f}, sparsity {s.sparsity:.2f}, "
                f"grow {s.growth_candidates}, prune {s.prune_candidates}"
            )
        return " | ".join(parts)

    def _renderable(self, stats: NetworkStats, rate: float) -> Group:
        header = Text.assemble(
            (self.title, "bold"),
            f"  {self._progress_text()}  loss {self._loss_text()}  {rate:.1f} steps/s  "
            f"{time.perf_counter() - self._start_time:.1f} s",
        )
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("layer", "neurons", "active", "saturation", "sparsity", "grow", "prune"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for s in stats.layer_stats:
            table.add_row(
                s.name or "layer",
                str(s.neuron_count),
                str(s.active_neurons),
                f"{s.average_saturation:.2f}",
                f"{s.sparsity:.2f}",
                str(s.growth_candidates),
                str(s.prune_candidates),
            )
        parts: list[Any] = [header, table]
        if self.total_steps is not None:
            parts.append(ProgressBar(total=self.total_steps, completed=self.steps, width=50))
        return Group(*parts)
