"""Item 4: ``build_param_groups`` time on meta-device Llama-shaped models from 125M to 70B parameters.

The grouping looks at names, module types and shapes only, so the models are built on the ``meta`` device: no
memory, and the figures are what the grouping costs on any device. Two sweeps:

* the published shapes (125M ... 70B): the headline "time at 70B";
* a depth sweep at 70B width (10 ... 640 layers, up to ~5,800 tensors): growth in the number of tensors, with
  a least-squares line ``time = a + b * tensors`` and its R^2, and the time per tensor at each depth (linear
  growth means that figure stays flat).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

from torch import nn

from benchmarks.common import Row, cpu_clock, interleaved, stat
from benchmarks.models import LLAMA_SHAPES, LlamaConfig, build_meta, count_params

ITEM = 4
TARGET_70B_S = 1.0


def _trial(cfg: LlamaConfig, model: nn.Module) -> Callable[[], float]:
    from lightning_adamw import build_param_groups

    def run() -> float:
        # As timeit does: no garbage collection inside the timed region (a collection of the whole heap,
        # triggered by chance there, would be charged to the grouping).
        gc.disable()
        try:
            start = cpu_clock()
            groups = build_param_groups(model, weight_decay=0.1)
            elapsed = cpu_clock() - start
        finally:
            gc.enable()
        assert sum(len(g["params"]) for g in groups) == cfg.n_tensors
        return elapsed

    return run


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns ``(a, b, r2)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return a, b, 1 - ss_res / ss_tot


def run(repeats: int = 7, quick: bool = False) -> list[Row]:
    """Rows for item 4. ``quick`` keeps two small shapes and a short sweep (smoke test)."""
    shapes = LLAMA_SHAPES[:2] if quick else LLAMA_SHAPES
    base = LLAMA_SHAPES[-1]
    depths = (2, 4) if quick else (10, 40, 80, 160, 320, 640)
    sweep = [
        LlamaConfig(
            f"{base.name}-width x{d} layers", base.dim, d, base.ffn, base.heads, base.kv_heads, base.vocab
        )
        for d in depths
    ]
    rows: list[Row] = []

    models = {c.name: build_meta(c) for c in shapes}
    results = interleaved(
        {c.name: _trial(c, models[c.name]) for c in shapes}, repeats=repeats, warmup_rounds=1
    )
    for cfg in shapes:
        s = stat([v * 1e3 for v in results[cfg.name]])
        n_tensors, n_params = count_params(models[cfg.name])
        is_70b = cfg.name == "70B"
        rows.append(
            Row.from_stat(
                ITEM,
                "build_param_groups, meta device",
                f"Llama {cfg.name} ({n_params / 1e9:.2f}B params, {n_tensors} tensors)",
                "time",
                s,
                unit="ms",
                target=f"< {TARGET_70B_S * 1e3:g} ms" if is_70b else "",
                ok=(s.median < TARGET_70B_S * 1e3) if is_70b else None,
                extra={"tensors": n_tensors, "params": n_params},
            )
        )

    del models
    results = interleaved({c.name: _trial(c, build_meta(c)) for c in sweep}, repeats=repeats, warmup_rounds=1)
    medians = [stat(results[c.name]).median for c in sweep]
    for cfg, median in zip(sweep, medians, strict=True):
        s = stat([v / cfg.n_tensors * 1e6 for v in results[cfg.name]])
        rows.append(
            Row.from_stat(
                ITEM,
                "build_param_groups, depth sweep",
                f"{cfg.layers} layers ({cfg.n_tensors} tensors)",
                "time per tensor",
                s,
                unit="us",
                extra={"tensors": cfg.n_tensors, "total_s": median},
            )
        )
    a, b, r2 = _linear_fit([c.n_tensors for c in sweep], medians)
    per_tensor = [m / c.n_tensors for c, m in zip(sweep, medians, strict=True)]
    growth = max(per_tensor) / min(per_tensor)
    rows.append(
        Row(
            ITEM,
            "build_param_groups, depth sweep",
            f"fit time = a + b*tensors over {sweep[0].n_tensors}..{sweep[-1].n_tensors} tensors",
            "R^2 of linear fit",
            r2,
            n=len(sweep),
            target="linear in #tensors (R^2 >= 0.99)",
            ok=r2 >= 0.99 if not quick else None,
            note=f"a = {a * 1e3:.2f} ms, b = {b * 1e6:.1f} us/tensor; per-tensor time max/min = {growth:.2f}",
            extra={"a_s": a, "b_s_per_tensor": b, "per_tensor_s": per_tensor},
        )
    )
    return rows
