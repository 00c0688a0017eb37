"""The diagnostics of issue 14 §3 against parameter snapshots: ``grad_norm`` / ``grad_to_weight`` (the gradient
the step used: accumulated, clipped, unscaled), the SGD steady state ``equilibrium_grad_to_weight``, and the
share of an update that storing it in the parameters' dtype rounds away (``rounded_away_fraction``,
``rounded_away_sq_norm_fraction``).

Rounded away, checked against what really happened: a coordinate's update was lost when the stored weight did
not change. The monitor's definition (the contract: :math:`0 < |\\Delta| < h`, :math:`h` half the storage spacing)
and torch's arithmetic can disagree only on coordinates counted here as *ambiguous*: those whose exact
:math:`|\\Delta|` is within the arithmetic's error of :math:`h` (torch forms the denominator in the storage dtype
and applies the decay and the gradient step as two roundings), and those whose stored weight moved into another
binade with an update under twice the threshold (the spacing there is twice as large). The tests assert that the monitor's count differs from the count of
unchanged coordinates by at most the ambiguous ones, and that those are few.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw import WeightDecayMonitor
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import take_snapshot, update_split
from lightning_adamw.update_split.backends.packed import BLOCK
from lightning_adamw.update_split.backends.reference import adam_update
from lightning_adamw.update_split.contract import half_ulp
from tests.helpers.lit_monitor import MonitoredModule, StepRecorder, fit
from tests.helpers.tolerance import formula_rel, gamma, sqrt_error_bound, two_level_sum_bound, unit_roundoff

U32 = unit_roundoff(torch.float32)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4)).to(dtype)


def _steps(
    dtype: torch.dtype, lr: float, eps: float, steps: int = 3
) -> tuple[torch.optim.Optimizer, dict[torch.Tensor, torch.Tensor]]:
    """Real AdamW steps on ``dtype`` weights; returns the optimizer and float64 copies of the weights before the
    last step."""
    model = _model(dtype)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=lr, eps=eps)
    gen = torch.Generator().manual_seed(1)
    old: dict[torch.Tensor, torch.Tensor] = {}
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=gen).to(dtype)).float().square().mean().backward()
        old = {p: p.detach().double().clone() for g in opt.param_groups for p in g["params"]}
        opt.step()
    return opt, old


def _what_storage_kept(
    group: dict[str, Any], state: dict[torch.Tensor, Any], old: dict[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """From the snapshots: the group's coordinates, those whose exact update was not 0, those the stored weight
    did not follow (unchanged), the ambiguous ones (see the module docstring), and the matching squared norms."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    beta1, beta2 = group["betas"]
    out = dict.fromkeys(("numel", "unchanged", "ambiguous", "total_sq", "unchanged_sq", "ambiguous_sq"), 0.0)
    for p in group["params"]:
        st = state[p]
        w_old, w_new = old[p].reshape(-1), p.detach().double().reshape(-1)
        b = adam_update(
            st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1), step=float(st["step"]), lr=lr,
            betas=(beta1, beta2), eps=float(group["eps"]),
        )  # fmt: skip
        delta = (lr * wd * w_old + b).abs()  # the change the optimizer computed, exactly
        h = half_ulp(w_old, p.dtype)
        # torch: the denominator in the storage dtype (3 roundings), the step's own products (4 in float32);
        # the decay applied as a separate rounding (it shifts the point by at most lr*wd*|w|); the monitor's
        # float32 delta (tests/helpers/backend_bounds.py: at most 14 + 5 roundings)
        rho = gamma(3, unit_roundoff(p.dtype)) + gamma(4 + 14 + 5, U32)
        near = (delta - h).abs() <= rho * b.abs() + 2.0 * lr * wd * w_old.abs()
        # moved up into the next binade, whose spacing is twice that at w_old: the monitor's threshold at w_new
        binade = (torch.frexp(w_new).exponent != torch.frexp(w_old).exponent) & (delta < 2.0 * h)
        ambiguous = (near | binade) & (delta > 0)
        unchanged = (w_new == w_old) & (delta > 0)
        out["numel"] += w_old.numel()
        out["unchanged"] += float(unchanged.sum())
        out["ambiguous"] += float(ambiguous.sum())
        out["total_sq"] += float(delta.square().sum())
        out["unchanged_sq"] += float(delta[unchanged].square().sum())
        out["ambiguous_sq"] += float(((delta + rho * b.abs() + h)[ambiguous]).square().sum())
    return out


def _check_rounded(metrics: dict[str, float], prefix: str, kept: dict[str, float]) -> float:
    """The monitor's two shares against the snapshots' (within the ambiguous coordinates); returns its
    ``rounded_away_fraction``."""
    fraction = metrics[f"{prefix}/rounded_away_fraction"]
    assert abs(fraction * kept["numel"] - kept["unchanged"]) <= kept["ambiguous"] + 1e-9 * kept["numel"], (
        prefix, fraction, kept,
    )  # fmt: skip
    if kept["total_sq"] > 0:
        share = metrics[f"{prefix}/rounded_away_sq_norm_fraction"]
        want = kept["unchanged_sq"] / kept["total_sq"]
        # (+ the relative error of the monitor's ||delta||^2 and of its lost terms: float32 products)
        assert abs(share - want) <= kept["ambiguous_sq"] / kept["total_sq"] + gamma(40, U32), (
            prefix,
            share,
            want,
        )
    return fraction


#: dtype, lr, eps: the storage rounds away (almost) every update / a share of them / none
ROUNDING = {
    "bf16": (torch.bfloat16, 1e-4, 1e-8),
    "fp16": (torch.float16, 1e-4, 1e-4),  # (eps 1e-8 is 0 in float16)
    "fp32_tiny_lr": (torch.float32, 3e-9, 1e-8),
    "fp32": (torch.float32, 1e-3, 1e-8),
}


@pytest.mark.parametrize("case", list(ROUNDING))
def test_rounded_away_counts_the_coordinates_storage_did_not_change(case: str) -> None:
    dtype, lr, eps = ROUNDING[case]
    opt, old = _steps(dtype, lr, eps)
    split = update_split(opt)
    metrics = split.metrics(per_layer=True)
    fractions = {}
    for group, g in zip(opt.param_groups, split.groups, strict=True):
        kept = _what_storage_kept(group, opt.state, old)
        if g.name == "decay":  # the comparison is a real one (LayerNorm's gains start at 1.0, a binade edge)
            assert kept["ambiguous"] <= 0.05 * kept["numel"], kept
        fractions[g.name] = _check_rounded(metrics, f"adamw/{g.name}", kept)
        for p, t in zip(group["params"], g.tensors, strict=True):  # and per tensor
            one = {**group, "params": [p]}
            _check_rounded(metrics, f"adamw_layer/{t.key}", _what_storage_kept(one, opt.state, old))
    if case == "bf16":
        assert fractions["decay"] > 0.5  # bf16 stagnation, shown
    elif case == "fp32":
        assert fractions == {"decay": 0.0, "no_decay": 0.0}
    else:
        assert 0.0 < fractions["decay"] < 1.0


def test_bf16_true_fit_reports_the_rounded_away_update(tmp_path: Any) -> None:
    """``../shared/cases/bf16_true_update_norm.py`` as a test: ``precision="bf16-true"`` at lr 1e-4. ``update_norm``
    stays the update the optimizer computed; the share storage rounded away is reported beside it."""
    monitor, recorder = WeightDecayMonitor(log_every_n_steps=1, plot=False), StepRecorder()
    module = MonitoredModule(lr=1e-4, weight_decay=0.1, dtype=torch.bfloat16)
    trainer = fit(module, [monitor, recorder], tmp_path, max_steps=3, precision="bf16-true")
    opt = trainer.optimizers[0]
    record = recorder.records[-1]
    old = {
        p: w for group, rg in zip(opt.param_groups, record["groups"], strict=True)
        for p, w in zip(group["params"], rg["old"], strict=True)
    }  # fmt: skip
    fraction = _check_rounded(
        monitor.last_metrics, "adamw/decay", _what_storage_kept(opt.param_groups[0], opt.state, old)
    )
    assert fraction > 0.5
    # update_norm is the computed update, larger than the change the weights really made
    rg = record["groups"][0]
    measured = math.sqrt(
        sum(float((n - o).square().sum()) for o, n in zip(rg["old"], rg["new"], strict=True))
    )
    assert monitor.last_metrics["adamw/decay/update_norm"] > 1.5 * measured


def _grad_norm_bound(grads: list[torch.Tensor]) -> tuple[float, float]:
    """``(||g||, bound)``: squares summed in float32 blocks of at most ``BLOCK`` (the packed backend; float64
    tensors are summed more exactly still), then in float64, and the square root."""
    sq = sum(float(g.double().square().sum()) for g in grads)
    n = sum(g.numel() for g in grads)
    d = two_level_sum_bound(sq, inner_depth=BLOCK - 1, inner_dtype=torch.float32, outer_terms=n, per_term=4)
    return math.sqrt(sq), 2.0 * sqrt_error_bound(sq, d)


def test_grad_norm_is_the_accumulated_clipped_gradient(tmp_path: Any) -> None:
    """In a real fit with gradient accumulation and clipping by norm, ``grad_norm`` is the norm of the gradient
    the step used (read in the step post-hook: after Lightning's clipping), per group."""
    clip = 0.01
    monitor, recorder = WeightDecayMonitor(log_every_n_steps=1, plot=False, per_layer=True), StepRecorder()
    fit(
        MonitoredModule(lr=1e-2, weight_decay=0.1), [monitor, recorder], tmp_path, max_steps=3,
        accumulate_grad_batches=2, gradient_clip_val=clip, gradient_clip_algorithm="norm",
    )  # fmt: skip
    metrics = monitor.last_metrics
    total = 0.0
    for rg in recorder.records[-1]["groups"]:
        grads = [g for g in rg["grad"] if g is not None]
        want, bound = _grad_norm_bound(grads)
        assert abs(metrics[f"adamw/{rg['label']}/grad_norm"] - want) <= bound, rg["label"]
        total += want * want
        for name, g in zip(rg["names"], rg["grad"], strict=True):
            want, bound = _grad_norm_bound([g])
            assert abs(metrics[f"adamw_layer/{name}/grad_norm"] - want) <= bound, name
    # clipping was active: the unclipped cross-entropy gradient is far larger than `clip`
    assert clip * (1 - 1e-3) <= math.sqrt(total) <= clip * (1 + 1e-6)
    # grad_to_weight = grad_norm / ||w_old||, with the ||w_old|| of decay_norm = lr*wd*||w_old||
    lr_wd = 1e-2 * 0.1
    assert metrics["adamw/decay/grad_to_weight"] == pytest.approx(
        metrics["adamw/decay/grad_norm"] * lr_wd / metrics["adamw/decay/decay_norm"],
        rel=formula_rel(4),
        abs=0,
    )
    # (no decay: ||w_old|| = update_norm / update_to_weight)
    assert metrics["adamw/no_decay/grad_to_weight"] == pytest.approx(
        metrics["adamw/no_decay/grad_norm"]
        * metrics["adamw/no_decay/update_to_weight"]
        / metrics["adamw/no_decay/update_norm"],
        rel=formula_rel(4),
        abs=0,
    )


def test_grad_norm_is_unscaled_for_a_fused_optimizer_with_grad_scaler() -> None:
    """A fused AdamW stepped by a ``GradScaler`` leaves the scaled gradient in ``.grad``: ``grad_norm`` divides the
    scale out."""
    model = _model(torch.float32)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen: dict[str, Any] = {}

    def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen["split"] = update_split(optimizer)
        seen["grads"] = {g["name"]: [p.grad.double() / 1024.0 for p in g["params"]] for g in opt.param_groups}

    opt.register_step_post_hook(post)
    scaler.scale(model(torch.randn(16, 8)).square().mean()).backward()
    scaler.step(opt)
    for g in seen["split"].groups:
        want, bound = _grad_norm_bound(seen["grads"][g.name])
        assert abs(g.metrics["grad_norm"] - want) <= bound + gamma(3, unit_roundoff(torch.float64)) * want, (
            g.name
        )


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_steady_state_and_gradient_norm(momentum: float) -> None:
    """SGD groups (snapshot path): ``grad_norm`` of the gradient, and for plain SGD (no momentum) with decay the
    Van Laarhoven / Defazio et al. steady state ``equilibrium_grad_to_weight = sqrt(2 * weight_decay / lr)``; with
    momentum the papers give none, and none is logged."""
    model = _model(torch.float32)
    lr, wd = 0.1, 5e-4
    opt = torch.optim.SGD(build_param_groups(model, wd), lr=lr, momentum=momentum)
    model(torch.randn(16, 8)).square().mean().backward()
    grads = {g["name"]: [p.grad.clone() for p in g["params"]] for g in opt.param_groups}
    snapshot = take_snapshot(opt)
    opt.step()
    split = update_split(opt, snapshot=snapshot)
    for g in split.groups:
        want, bound = _grad_norm_bound(grads[g.name])
        assert abs(g.metrics["grad_norm"] - want) <= bound, g.name
        if g.name == "decay" and momentum == 0.0:
            assert g.metrics["equilibrium_grad_to_weight"] == pytest.approx(
                math.sqrt(2 * wd / lr), rel=formula_rel(3), abs=0
            )
        else:  # no decay, or momentum: no steady state from the papers
            assert "equilibrium_grad_to_weight" not in g.metrics
