"""Item 2: the usual per-parameter ``.norm().item()`` loop against the package's batched computation.

Per-parameter optimizer monitors compute their statistics in a Python loop over the parameters, one small
tensor expression and one ``.item()`` per quantity per tensor. :func:`naive_update_split` does exactly that
for the same quantities the package computes (the four sums per tensor of :mod:`lightning_adamw.update_split`:
weight norm, update norm, <weight, update>, pre-decay weight norm), then derives the metrics with the
package's own closed-form :func:`~lightning_adamw.update_split.derive_metrics`, so the two differ only in how
the tensor work is done. The results are checked to agree before anything is timed.

Also timed on the same parameters: a bare foreach ``AdamW.step()``, the reference of item 1's "every step
costs at most 1.3x an optimizer step" target, measured here outside of Lightning, without any noise from the
training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.common import Row, calls_for, interleaved, paired_ratios, stat, time_per_call
from benchmarks.models import GPT, GPTConfig

ITEM = 2
TARGET_SPEEDUP = 5.0
TARGET_VS_STEP = 1.3

#: >= 200 parameter tensors (292): the size of model where per-tensor overhead decides.
MODELS: dict[str, GPTConfig] = {
    "GPT 24x128 (292 tensors, 4.8M params)": GPTConfig(dim=128, layers=24),
    "GPT 24x384 (292 tensors, 43M params)": GPTConfig(dim=384, layers=24),
}
QUICK_MODELS: dict[str, GPTConfig] = {"GPT 17x32 (208 tensors)": GPTConfig(dim=32, layers=17, seq=16)}


# ----------------------------------------------------------------------------------------------- naive
# baseline


def naive_update_split(optimizer: torch.optim.Optimizer, per_layer: bool = False) -> dict[str, float]:
    """The same metrics as ``update_split(optimizer).metrics(per_layer)``, computed one tensor at a time.

    This is the reference implementation a per-parameter monitor would write: for each parameter rebuild the
    Adam step ``lr * m_hat / (sqrt(v_hat) + eps)`` and call ``.norm().item()`` / ``.sum().item()`` on it (each
    ``.item()`` is a device-to-host sync on an accelerator). Only AdamW groups are handled (that is all the
    benchmark uses).
    """
    from lightning_adamw.update_split import derive_metrics, group_label, param_labels

    out: dict[str, float] = {}
    with torch.no_grad():
        for gi, group in enumerate(optimizer.param_groups):
            label = group_label(group, gi)
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            totals = [0.0] * 8
            for name, p in zip(param_labels(group, gi), group["params"], strict=True):
                if p.grad is None:
                    continue
                state = optimizer.state[p]
                step = float(state["step"])
                denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step) + eps
                update = (
                    (lr / (1 - beta1**step)) * state["exp_avg"] / denom
                )  # lr * u, what addcdiv subtracted
                n = p.norm().item() ** 2
                b = update.norm().item() ** 2
                e = (p * update).sum().item()
                s = (p + update).norm().item() ** 2
                sums = [n, b, e, s, 0.0, 0.0, float(p.numel()), 1.0]
                totals = [t + x for t, x in zip(totals, sums, strict=True)]
                if per_layer:
                    for key, value in derive_metrics(
                        "adamw", sums, lr=lr, weight_decay=wd, beta1=beta1, group_level=False
                    ).items():
                        if math.isfinite(value):
                            out[f"adamw_layer/{name}/{key}"] = value
            for key, value in derive_metrics("adamw", totals, lr=lr, weight_decay=wd, beta1=beta1).items():
                if math.isfinite(value):
                    out[f"adamw/{label}/{key}"] = value
    return out


def check_agreement(batched: dict[str, float], naive: dict[str, float], rtol: float = 2e-3) -> float:
    """Largest relative difference between the two metric dicts; raises if keys or values disagree.

    The two orders of summation differ (per tensor in float32 then Python floats, vs float64 tables), so the
    tolerance is loose for the angle-like metrics that are differences of nearly equal sums.
    """
    if set(batched) != set(naive):
        missing = sorted(set(batched) ^ set(naive))[:5]
        raise AssertionError(f"naive and batched metric keys differ, e.g. {missing}")
    worst = 0.0
    for key, value in batched.items():
        ref = naive[key]
        scale = max(abs(value), abs(ref), 1e-12)
        rel = abs(value - ref) / scale
        if rel > rtol and abs(value - ref) > 1e-9:
            raise AssertionError(f"{key}: batched {value!r} vs naive {ref!r}")
        worst = max(worst, rel)
    return worst


# ----------------------------------------------------------------------------------------------- setup


def trained_optimizer(
    cfg: GPTConfig, device: str | torch.device = "cpu", steps: int = 2, batch: int = 4, **adamw: Any
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A :class:`GPT` with the package's groups and a foreach AdamW that has taken ``steps`` real steps.

    The gradients of the last step are kept, so ``optimizer.step()`` can be timed again and again.
    """
    from lightning_adamw import build_param_groups

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    kwargs = {"lr": 1e-3, **adamw}
    if not kwargs.get("fused"):
        kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), **kwargs)
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), device=device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
    return model, optimizer


def timed_variants(
    optimizer: torch.optim.Optimizer, sync: Callable[[], None] | None = None
) -> dict[str, Callable[[], Any]]:
    """The callables compared in items 1 and 2 on one optimizer (all post-step, all every-step)."""
    from lightning_adamw.update_split import update_split

    return {
        "foreach AdamW step": optimizer.step,
        "batched (package), group metrics": lambda: update_split(optimizer).metrics(),
        "batched (package), per-layer metrics": lambda: update_split(optimizer).metrics(per_layer=True),
        "naive loop, group metrics": lambda: naive_update_split(optimizer),
        "naive loop, per-layer metrics": lambda: naive_update_split(optimizer, per_layer=True),
    }


# ----------------------------------------------------------------------------------------------- benchmark


def run(repeats: int = 5, quick: bool = False, budget_s: float = 0.25) -> list[Row]:
    """Rows for item 2 (and the isolated monitor-vs-step ratio of item 1)."""
    from lightning_adamw.update_split import update_split

    rows: list[Row] = []
    for model_name, cfg in (QUICK_MODELS if quick else MODELS).items():
        model, optimizer = trained_optimizer(cfg)
        n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
        worst = max(
            check_agreement(update_split(optimizer).metrics(), naive_update_split(optimizer)),
            check_agreement(
                update_split(optimizer).metrics(per_layer=True), naive_update_split(optimizer, per_layer=True)
            ),
        )
        fns = timed_variants(optimizer)
        calls = {name: calls_for(fn, budget_s) for name, fn in fns.items()}
        trials = {name: (lambda fn=fn, k=calls[name]: time_per_call(fn, k)) for name, fn in fns.items()}
        results = interleaved(trials, repeats=repeats, warmup_rounds=1)
        bench = f"every-step metrics, {model_name}"
        for name, samples in results.items():
            rows.append(
                Row.from_stat(
                    ITEM,
                    bench,
                    name,
                    "time per call",
                    stat([s * 1e3 for s in samples]),
                    unit="ms",
                    extra={"calls_per_repeat": calls[name], "tensors": n_tensors},
                )
            )
        for kind in ("group metrics", "per-layer metrics"):
            speedup = paired_ratios(results, f"batched (package), {kind}")[f"naive loop, {kind}"]
            rows.append(
                Row.from_stat(
                    ITEM,
                    bench,
                    f"naive / batched, {kind}",
                    "speed-up",
                    stat(speedup),
                    unit="x",
                    target=f">= {TARGET_SPEEDUP:g}x",
                    ok=None if quick else stat(speedup).median >= TARGET_SPEEDUP,
                    note=f"results agree to {worst:.1e} relative",
                )
            )
        vs_step = paired_ratios(results, "foreach AdamW step")
        for kind in ("group metrics", "per-layer metrics"):
            s = stat(vs_step[f"batched (package), {kind}"])
            rows.append(
                Row.from_stat(
                    1,
                    f"monitor math vs optimizer step, isolated, {model_name}",
                    f"batched (package), {kind}",
                    "time / foreach AdamW step",
                    s,
                    unit="x",
                    target=f"<= {TARGET_VS_STEP:g}x",
                    ok=None if quick else s.median <= TARGET_VS_STEP,
                    note="update_split() after each step, no Lightning; reference for the every-step target",
                )
            )
        del model, optimizer
    return rows
