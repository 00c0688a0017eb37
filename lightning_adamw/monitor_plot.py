"""Summary figure of :class:`~lightning_adamw.monitor.WeightDecayMonitor`: decay vs gradient update per group.

Uses matplotlib's object-oriented API (``matplotlib.figure.Figure`` with the Agg canvas), never ``pyplot``, so it
works headless and does not touch the global backend or figure registry of the training process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

__all__ = ["History", "plot_history"]

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


def plot_history(history: History, title: str | None = None, fit_starts: Sequence[float] = ()) -> Figure:
    """One panel per parameter group, log scale, x axis = optimizer step.

    * AdamW groups: decay norm and gradient-update norm (and their ratio on a second axis);
    * Adam + coupled L2 groups: min-median-max band of the per-coordinate decay rate vs AdamW's uniform ``lr·λ``;
    * other optimizers: update norm and weight norm.

    ``fit_starts``: x positions where a later fit of the same monitor began (a dashed vertical line each).
    """
    keys = sorted(history)
    fig = Figure(figsize=(8.0, 2.8 * max(len(keys), 1)), layout="constrained")
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no logged steps", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        series = history[key]
        kind = key.split("/", 1)[0]
        if kind == "adamw":
            for name in ("decay_norm", "grad_update_norm"):
                xs, ys = _series(series, name)
                if xs:
                    ax.plot(xs, ys, **_STYLES[name])
            xs, ys = _series(series, "decay_to_grad_ratio")
            if xs:
                twin = ax.twinx()
                twin.plot(xs, ys, color="black", linestyle=":", linewidth=1.0, label="decay / gradient")
                twin.set_yscale("log")
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
                    ax.plot(xs, ys, linestyle="--" if name == "uniform_decay_rate" else "-", **style)
            ax.set_ylabel("decay rate per step")
        else:
            for name in ("update_norm", "weight_norm"):
                xs, ys = _series(series, name)
                if xs:
                    ax.plot(xs, ys, **_STYLES[name])
            ax.set_ylabel("norm")
        for i, x in enumerate(fit_starts):
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8, label="new fit" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_title(key)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    return fig
