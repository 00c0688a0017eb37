"""Item 2: the usual per-parameter ``.norm().item()`` loop against the package's batched computation.

Per-parameter optimizer monitors compute their statistics in a Python loop over the parameters, one small
tensor expression and one ``.item()`` per quantity per tensor. :func:`naive_update_split` does exactly that
for the same quantities the package computes (the sums per tensor of the contract,
:mod:`lightning_adamw.update_split.contract`: weight norm, update norm, <weight, update>, pre-decay weight norm,
gradient norm, and the count and squares of the coordinates whose update the storage dtype rounds away),
with the package's one written-out Adam step (:func:`~lightning_adamw.update_split.backends.reference.adam_update`)
in the parameters' dtype, then derives the metrics with the package's own
:func:`~lightning_adamw.update_split.derive_metrics`, so the two differ only in how the tensor work is done. The
results are checked to agree before anything is timed.

The package's ``reference`` backend (a float64 loop over the tensors, the oracle of the tests) is timed too, as
the baseline of the backends: ``update_split(optimizer, backend="reference")``.

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
REFERENCE = "reference backend (float64 loop), group metrics"
#: the torch kernels of the ``packed`` backend: what runs on a CPU without Numba (or with LIGHTNING_ADAMW_NUMBA=0)
TORCH_PATH = "torch kernels (packed backend, no Numba), group metrics"
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
    from lightning_adamw.update_split.backends.reference import adam_update
    from lightning_adamw.update_split.contract import NUM_COLUMNS, Col, decay_coefficient, half_ulp

    out: dict[str, float] = {}
    with torch.no_grad():
        for gi, group in enumerate(optimizer.param_groups):
            label = group_label(group, gi)
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            totals = [0.0] * NUM_COLUMNS
            for name, p in zip(param_labels(group, gi), group["params"], strict=True):
                if p.grad is None:  # left alone by the step: in the group's weights, with no update
                    if p.requires_grad:
                        totals[Col.IDLE] += p.norm().item() ** 2
                        totals[Col.IDLE_NUMEL] += float(p.numel())
                    continue
                state = optimizer.state[p]
                update = adam_update(  # lr * u, what addcdiv subtracted, in the parameters' dtype
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    step=float(state["step"]),
                    lr=lr,
                    betas=(beta1, beta2),
                    eps=eps,
                    dtype=None,
                )
                sums = [0.0] * NUM_COLUMNS
                sums[Col.N] = p.norm().item() ** 2
                sums[Col.B] = update.norm().item() ** 2
                sums[Col.E] = (p * update).sum().item()
                sums[Col.S] = (p + update).norm().item() ** 2
                sums[Col.G] = p.grad.norm().item() ** 2
                # the change the step computed, and where storing it loses it (the contract's R and RD)
                c = decay_coefficient("adamw", lr, wd)
                delta = (c * p.float() + (1.0 + c) * update.float()).abs()
                lost = (delta < half_ulp(p.float(), p.dtype)) & (delta > 0)
                sums[Col.R] = lost.sum().item()
                sums[Col.RD] = delta[lost].square().sum().item()
                sums[Col.NUMEL], sums[Col.COUNT] = float(p.numel()), 1.0
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
    """The callables compared in items 1 and 2 on one optimizer (all post-step, all every-step). The package's
    calls keep their plan in a cache, as the monitor does."""
    from lightning_adamw.update_split import PlanCache, update_split

    cache, torch_cache = PlanCache(), PlanCache()
    return {
        "foreach AdamW step": optimizer.step,
        "batched (package), group metrics": lambda: update_split(optimizer, cache=cache).metrics(),
        "batched (package), per-layer metrics": lambda: update_split(optimizer, cache=cache).metrics(
            per_layer=True
        ),
        TORCH_PATH: lambda: update_split(optimizer, backend="packed", cache=torch_cache).metrics(),
        "naive loop, group metrics": lambda: naive_update_split(optimizer),
        "naive loop, per-layer metrics": lambda: naive_update_split(optimizer, per_layer=True),
    }


def reference_variants(optimizer: torch.optim.Optimizer) -> dict[str, Callable[[], Any]]:
    """The package's packed path against its float64 ``reference`` backend, timed in rounds of their own: the
    reference's float64 copies of every tensor must not disturb the allocator state the other variants see."""
    from lightning_adamw.update_split import PlanCache, update_split

    cache = PlanCache()
    return {
        "batched (package), group metrics": lambda: update_split(optimizer, cache=cache).metrics(),
        REFERENCE: lambda: update_split(optimizer, backend="reference", cache=cache).metrics(),
    }


# ----------------------------------------------------------------------------------------------- benchmark


def run(repeats: int = 5, quick: bool = False, budget_s: float = 0.25) -> list[Row]:
    """Rows for item 2 (and the isolated monitor-vs-step ratio of item 1).

    The ``reference`` backend is timed after every other measurement of the item, on a rebuilt optimizer: its
    float64 copies of every tensor change the allocator's state (glibc raises its mmap threshold after large
    frees), which would change what the AdamW step's and the packed path's large temporaries cost afterwards."""
    from lightning_adamw.update_split import update_split

    rows: list[Row] = []
    models = QUICK_MODELS if quick else MODELS
    for model_name, cfg in models.items():
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
        rows.append(
            Row.from_stat(
                1,
                f"monitor math vs optimizer step, isolated, {model_name}",
                TORCH_PATH,
                "time / foreach AdamW step",
                stat(vs_step[TORCH_PATH]),
                unit="x",
                note="the fallback without Numba; no target",
            )
        )
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
    for model_name, cfg in models.items():
        rows += _reference_rows(model_name, cfg, repeats, budget_s)
    return rows


def _reference_rows(model_name: str, cfg: GPTConfig, repeats: int, budget_s: float) -> list[Row]:
    """The package's packed path against its float64 ``reference`` backend on the same state (see :func:`run`)."""
    from lightning_adamw.update_split import update_split

    rows: list[Row] = []
    _, optimizer = trained_optimizer(cfg)
    n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
    bench = f"every-step metrics, {model_name}"
    worst_reference = check_agreement(
        update_split(optimizer).metrics(per_layer=True),
        update_split(optimizer, backend="reference").metrics(per_layer=True),
    )
    ref_fns = reference_variants(optimizer)
    ref_calls = {name: calls_for(fn, budget_s) for name, fn in ref_fns.items()}
    ref_trials = {
        name: (lambda fn=fn, k=ref_calls[name]: time_per_call(fn, k)) for name, fn in ref_fns.items()
    }
    ref_results = interleaved(ref_trials, repeats=repeats, warmup_rounds=1)
    rows.append(
        Row.from_stat(
            ITEM,
            bench,
            REFERENCE,
            "time per call",
            stat([s * 1e3 for s in ref_results[REFERENCE]]),
            unit="ms",
            extra={"calls_per_repeat": ref_calls[REFERENCE], "tensors": n_tensors},
        )
    )
    reference = stat(paired_ratios(ref_results, "batched (package), group metrics")[REFERENCE])
    rows.append(
        Row.from_stat(
            ITEM,
            bench,
            "reference backend / batched, group metrics",
            "speed-up",
            reference,
            unit="x",
            note=f"the tests' float64 oracle, in rounds of its own; results agree to {worst_reference:.1e} relative",
        )
    )
    return rows
