"""Summary figure of :class:`~lightning_adamw.monitor.WeightDecayMonitor`: decay vs gradient update per group.

Uses matplotlib's object-oriented API (``matplotlib.figure.Figure`` with the Agg canvas), never ``pyplot``, so it
works headless, in any thread, and does not touch the global backend or figure registry of the training process.

The monitor renders it off the training thread (:class:`FigureWriter`): matplotlib is imported and its fonts
loaded in a background thread when training starts, the figure is drawn in the background as soon as its data is
complete (often while the last steps still train), and the training thread only waits for what is left of that
at the end of ``fit`` and hands the image to the loggers. Importing this module does not import matplotlib.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["FigureWriter", "History", "RenderedFigure", "cooldown", "plot_history", "render_png"]

#: ``{"adamw/decay": {"decay_norm": [[step, value], ...], ...}, ...}``
History = Mapping[str, Mapping[str, Sequence[Sequence[float]]]]

_STYLES: dict[str, dict[str, str]] = {
    "decay_norm": {"label": "decay ‖lr·λ·w‖", "color": "tab:red"},
    "grad_update_norm": {"label": "gradient update ‖lr·u‖", "color": "tab:blue"},
    "eff_decay_rate_median": {"label": "Adam+L2 lr·λ/(√v̂+ε), median", "color": "tab:purple"},
    "uniform_decay_rate": {"label": "AdamW lr·λ (every coordinate)", "color": "tab:red"},
    "update_norm": {"label": "update ‖Δw‖", "color": "tab:blue"},
    "weight_norm": {"label": "weight ‖w‖", "color": "tab:gray"},
}


def _series(history: Mapping[str, Sequence[Sequence[float]]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(s), float(v)) for s, v in history.get(key, []) if v > 0]
    return [s for s, _ in points], [v for _, v in points]


def _marker(xs: Sequence[float]) -> dict[str, object]:
    # a short fit logs a handful of points (one, at the default interval): a line alone would not show them
    return {"marker": "o", "markersize": 3} if len(xs) <= 30 else {}


def cooldown(history: History) -> tuple[float, float] | None:
    """``(first, last)`` step of the learning rate's cooldown: from the step of its peak to the last logged step,
    when the lr logged last is below the peak (the groups' ``lr`` series; the first group that has one).
    ``None`` without an lr history or while the lr has not come down from its peak."""
    for key in sorted(history):
        points = history[key].get("lr", [])
        if len(points) >= 2:
            peak_x, peak = max(((float(x), float(v)) for x, v in points), key=lambda p: (p[1], -p[0]))
            last_x, last = float(points[-1][0]), float(points[-1][1])
            return (peak_x, last_x) if last < peak and last_x > peak_x else None
    return None


def _log_axis(ax: Any) -> None:
    """A log y axis whose ticks are labelled at 1, 2 and 5 times powers of ten: a series that spans less than a
    decade (a ratio moving by 20 %) still gets labelled ticks, so its scale can be read (with major ticks only
    at powers of ten it got none, and a small change filled the panel like a rise of decades). No minor ticks:
    they cost as much again as the rest of the draw."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(LogFormatterSciNotation(base=10.0, labelOnlyBase=False))
    ax.yaxis.set_minor_locator(NullLocator())


def _grad_to_weight_panel(ax: Any, history: History, span: tuple[float, float] | None) -> None:
    """``‖g‖/‖w‖`` of every group that reports it, the lr cooldown shaded: a late rise of the gradient norm under
    constant decay (Defazio et al., 2025), or its absence under ``"adamc"``, is visible at a glance. Groups
    without decay are drawn thin; the SGD steady state ``√(2λ/lr)`` (Van Laarhoven, 2017) dashed."""
    for key in sorted(history):
        series = history[key]
        xs, ys = _series(series, "grad_to_weight")
        if not xs:
            continue
        decayed = any(v > 0 for _, v in series.get("decay_norm", [])) or not key.startswith("adamw/")
        (line,) = ax.plot(xs, ys, label=key, linewidth=1.5 if decayed else 0.8, **_marker(xs))
        eq_x, eq_y = _series(series, "equilibrium_grad_to_weight")
        if eq_x:
            ax.plot(eq_x, eq_y, linestyle="--", color=line.get_color(), label=f"{key} steady state √(2λ/lr)")
    if span is not None:
        ax.axvspan(*span, color="tab:orange", alpha=0.12, label="lr cooldown")
    _log_axis(ax)
    ax.set_ylabel("‖g‖ / ‖w‖")
    ax.set_title("gradient-to-weight ratio per group")


def plot_history(history: History, title: str | None = None, fit_starts: Sequence[float] = ()) -> Figure:
    """One panel per parameter group, log scale, x axis = optimizer step, and one panel of all groups'
    gradient-to-weight ratios with the lr cooldown shaded.

    * AdamW groups: decay norm and gradient-update norm (and their ratio on a second axis);
    * Adam + coupled L2 groups: min-median-max band of the per-coordinate decay rate vs AdamW's uniform ``lr·λ``;
    * other optimizers: update norm and weight norm;
    * last panel: ``grad_to_weight`` of every group (:func:`cooldown` shaded), when the history has it.

    ``fit_starts``: x positions where a later fit of the same monitor began (a dashed vertical line each).
    """
    from matplotlib.figure import Figure

    groups = sorted(history)
    ratio_panel = any(_series(series, "grad_to_weight")[0] for series in history.values())
    keys = groups + (["grad_to_weight"] if ratio_panel else [])
    height = 2.8 * max(len(keys), 1)
    # (no constrained layout and no minor ticks on the log axes: each cost as much again as the rest of the draw;
    # fixed margins in inches instead)
    fig = Figure(figsize=(8.0, height))
    fig.subplots_adjust(left=0.1, right=0.9, top=1.0 - 0.8 / height, bottom=0.5 / height, hspace=0.45)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no logged steps", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    span = cooldown(history)
    for ax, key in zip(axes, keys, strict=True):
        if key == "grad_to_weight" and key not in history:
            _grad_to_weight_panel(ax, history, span)
            _finish(ax, fit_starts)
            continue
        series = history[key]
        kind = key.split("/", 1)[0]
        if kind == "adamw":
            for name in ("decay_norm", "grad_update_norm"):
                xs, ys = _series(series, name)
                if xs:
                    ax.plot(xs, ys, **_STYLES[name], **_marker(xs))
            xs, ys = _series(series, "decay_to_grad_ratio")
            if xs:
                twin = ax.twinx()
                twin.plot(
                    xs,
                    ys,
                    color="black",
                    linestyle=":",
                    linewidth=1.0,
                    label="decay / gradient",
                    **_marker(xs),
                )
                _log_axis(twin)
                twin.set_ylabel("ratio")
                twin.legend(loc="lower right", fontsize="small")
            decay = [v for _, v in series.get("decay_norm", [])]
            if decay and not any(v > 0 for v in decay):
                ax.text(
                    0.99, 0.95, "decay = 0 (weight_decay = 0)", transform=ax.transAxes, ha="right", va="top"
                )
            ax.set_ylabel("norm per step")
        elif kind == "adam_l2":
            lo_x, lo_y = _series(series, "eff_decay_rate_min")
            hi_x, hi_y = _series(series, "eff_decay_rate_max")
            if lo_x and len(lo_x) == len(hi_x):
                ax.fill_between(lo_x, lo_y, hi_y, color="tab:purple", alpha=0.2, label="Adam+L2 min..max")
            for name in ("eff_decay_rate_median", "uniform_decay_rate"):
                xs, ys = _series(series, name)
                if xs:
                    style = dict(_STYLES[name])
                    ax.plot(
                        xs,
                        ys,
                        linestyle="--" if name == "uniform_decay_rate" else "-",
                        **style,
                        **_marker(xs),
                    )
            ax.set_ylabel("decay rate per step")
        else:
            for name in ("update_norm", "weight_norm"):
                xs, ys = _series(series, name)
                if xs:
                    ax.plot(xs, ys, **_STYLES[name], **_marker(xs))
            ax.set_ylabel("norm")
        _log_axis(ax)
        ax.set_title(key)
        _finish(ax, fit_starts)
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, y=1.0 - 0.15 / height, va="top")
    return fig


def _finish(ax: Any, fit_starts: Sequence[float]) -> None:
    for i, x in enumerate(fit_starts):
        ax.axvline(x, color="gray", linestyle="--", linewidth=0.8, label="new fit" if i == 0 else None)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small")


@dataclass
class RenderedFigure:
    """A summary figure drawn and written: the PNG file and its pixels (``H x W x 4`` uint8, for TensorBoard)."""

    path: str
    rgba: Any
    #: what the caller prepared from the file in the same background thread (e.g. a ``wandb.Image``)
    extras: dict[str, Any]


def render_png(
    history: History, path: str, *, title: str | None = None, fit_starts: Sequence[float] = (), dpi: int = 100
) -> RenderedFigure:
    """Draw :func:`plot_history` once with the Agg canvas and write it to ``path`` as a PNG (folders created).

    Raises whatever matplotlib or the file system raise (the caller warns)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig = plot_history(history, title=title, fit_starts=fit_starts)
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba()).copy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="png", compress_level=1)
    tmp = f"{path}.tmp{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)  # a reader never sees half a file
    return RenderedFigure(path=path, rgba=rgba, extras={})


_WARM = threading.Event()


def _warm_up() -> None:
    """Import matplotlib and draw a tiny figure once per process (fonts, Agg): what a first draw would cost."""
    if _WARM.is_set():
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0, 1.0), dpi=20)
    ax = fig.subplots()
    ax.plot([1.0, 2.0], [1.0, 10.0], label="x")
    ax.set_yscale("log")
    ax.set_title("x")
    ax.legend()
    FigureCanvasAgg(fig).draw()
    _WARM.set()


class FigureWriter:
    """Draws and writes the summary figure in a background thread; the caller only waits at :meth:`result`.

    Jobs run one after the other in submission order (a later one replaces an earlier one's file). Each job is a
    non-daemon thread: a figure being written when the program ends is finished, not cut off.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: RenderedFigure | None = None
        self._error: BaseException | None = None
        #: the ``version`` of the last submitted job (``None``: nothing submitted)
        self.submitted: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # (a pickled monitor takes no thread or pending figure along)
        return {"submitted": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def warm_up(self) -> None:
        """Import matplotlib and load its fonts in the background (once per process)."""
        if not _WARM.is_set() and self._thread is None:
            self._start(lambda: (_warm_up(), None)[1])

    def submit(
        self,
        history: History,
        path: str,
        *,
        version: Any,
        title: str | None = None,
        fit_starts: Sequence[float] = (),
        prepare: Callable[[RenderedFigure], None] | None = None,
    ) -> None:
        """Render ``history`` (a copy the caller no longer changes) to ``path`` in the background; ``prepare`` runs
        on the result in the same thread (e.g. building a logger's image object)."""
        self.submitted = version

        def job() -> RenderedFigure:
            _warm_up()
            out = render_png(history, path, title=title, fit_starts=fit_starts)
            if prepare is not None:
                prepare(out)
            return out

        self._start(job)

    def _start(self, job: Callable[[], RenderedFigure | None]) -> None:
        previous = self._thread

        def run() -> None:
            if previous is not None:
                previous.join()
            try:
                result = job()
                if result is not None:
                    self._result, self._error = result, None
            except BaseException as err:  # reported by result(), on the caller's thread
                self._error = err

        self._thread = threading.Thread(target=run, name="lightning-adamw-figure", daemon=False)
        self._thread.start()

    def result(self) -> RenderedFigure | None:
        """Wait for the submitted jobs; the last figure, or ``None``. Raises the error of a job that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        out, self._result = self._result, None
        return out
