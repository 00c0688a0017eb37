r"""``WeightDecayScheduler``: the decay each real AdamW step applied, measured from parameter snapshots.

With zero gradients Adam's update is exactly zero (``m = v = 0``, so ``m/(√v + ε) = 0``), and a step leaves
:math:`w_{new} = fl(w_{old} \cdot fl(1 - lr_t\,wd_t))` (fused kernels: :math:`fl(w - fl(lr_t wd_t) w)`). The
ratio :math:`w_{new}/w_{old}` therefore measures the decay the step applied, per element, to within (the counting
rules of :mod:`tests.helpers.tolerance`; :math:`u_p` the parameters' unit roundoff, :math:`x = lr_t wd_t`,
:math:`c = 1 - x`):

.. math:: |w_{new}/w_{old} - c| \le \gamma_4(u_p)(|c| + x) + \gamma_{10}(u_{64})(1 + 2x)

— torch's ``1 - lr·wd`` and the product (or ``lr·wd``, its product with ``w`` and the subtraction) in the
parameters' dtype, and in float64 the scheduler's formula (≤ 3 roundings), the test's own formula (≤ 3),
``1 - x`` and the ratio. Every check also shows that a wrong formula fails the same bound.
"""

from __future__ import annotations

import copy
import doctest
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

import lightning_adamw.weight_decay.scheduler as scheduler_module
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.schedules import WarmupCosineLR
from lightning_adamw.update_split import update_split
from lightning_adamw.weight_decay import (
    BASE_KEY,
    SCHEDULE_KEY,
    SCHEDULES,
    WeightDecaySchedule,
    WeightDecayScheduler,
    decay_factor,
    describe_schedule,
    parse_weight_decay_schedule,
)
from tests.helpers.monitor_reference import compare_metrics, reference_bounds, reference_metrics
from tests.helpers.tolerance import SAFETY, gamma, unit_roundoff

U64 = unit_roundoff(torch.float64)
LR = 1e-2
WD = 0.1  # torch units
WD_INDEPENDENT = 1e-3  # per-step decay at the peak lr (the paper's / Composer's units)
STEPS = 6


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(dtype)


def make_optimizer(
    model: nn.Module, weight_decay: float = WD, lr: float = LR, **kwargs: Any
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(build_param_groups(model, weight_decay), lr=lr, **kwargs)


LR_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "warmup_cosine": lambda opt: WarmupCosineLR(opt, warmup_steps=2, total_steps=STEPS),
    "cosine_annealing": lambda opt: CosineAnnealingLR(opt, T_max=STEPS),
}


def zero_grad_step(opt: torch.optim.Optimizer) -> tuple[list[float], list[torch.Tensor]]:
    """One real step with zero gradients and zero first moments (a resumed optimizer has them), so Adam's
    update is exactly 0: each group's lr during the step and the per-element ratio ``w_new / w_old`` (float64,
    elements with ``w_old != 0``)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
            if "exp_avg" in opt.state.get(p, {}):
                opt.state[p]["exp_avg"].zero_()
    old = [[p.detach().double().clone() for p in g["params"]] for g in opt.param_groups]
    lrs = [float(g["lr"]) for g in opt.param_groups]
    opt.step()
    ratios = []
    for group, olds in zip(opt.param_groups, old, strict=True):
        o = torch.cat([t.reshape(-1) for t in olds])
        n = torch.cat([p.detach().double().reshape(-1) for p in group["params"]])
        keep = o != 0
        ratios.append(n[keep] / o[keep])
    return lrs, ratios


def decay_bound(lr: float, wd: float, dtype: torch.dtype) -> float:
    x = lr * wd
    return SAFETY * (gamma(4, unit_roundoff(dtype)) * (abs(1 - x) + x) + gamma(10, U64) * (1 + 2 * x))


def decay_error(ratio: torch.Tensor, lr: float, wd: float) -> float:
    """Largest ``|w_new/w_old - (1 - lr·wd)|`` over the elements."""
    return float((ratio - (1.0 - lr * wd)).abs().max())


def expected_factor(kind: str, step: int, warmup: int, total: int, final: float) -> float:
    """λ's multiplier written out from the documented definition (hold, then cosine / linear to ``final``)."""
    if step < warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return final + (1.0 - final) * (1.0 + math.cos(math.pi * progress)) / 2.0
    return 1.0 - (1.0 - final) * progress


def expected_weight_decay(name: str, base: float, lr: float, lr_max: float, step: int) -> float:
    if name == "constant":
        return base
    if name == "independent":  # per-step decay base * lr / lr_max
        return base / lr_max
    if name == "adamc":
        return base * lr / lr_max
    return base * expected_factor(name, step, warmup=1, total=STEPS - 1, final=0.2)


def scheduler_for(name: str, opt: torch.optim.Optimizer) -> WeightDecayScheduler:
    options: dict[str, Any] = {"warmup_steps": 1, "total_steps": STEPS - 1, "final_ratio": 0.2}
    return WeightDecayScheduler(opt, name, **(options if name in ("cosine", "linear") else {}))


# ------------------------------------------------------------------------------------ the applied decay


@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "pre_hook_only"])
@pytest.mark.parametrize("lr_scheduler", list(LR_SCHEDULERS))
@pytest.mark.parametrize("name", SCHEDULES)
def test_applied_decay_is_the_formula(name: str, lr_scheduler: str, refresh: bool) -> None:
    """Every step applies exactly the schedule's value for that step's lr and index (float64 weights), the
    no-decay group is never touched, and the group shows the applied value right after the step."""
    base = WD_INDEPENDENT if name == "independent" else WD
    model = make_model()
    opt = make_optimizer(model, base)
    lr_sched = LR_SCHEDULERS[lr_scheduler](opt)
    wd_sched = scheduler_for(name, opt)
    decay, no_decay = opt.param_groups
    assert decay[BASE_KEY] == base and decay[SCHEDULE_KEY] == name
    assert BASE_KEY not in no_decay and SCHEDULE_KEY not in no_decay
    wrong_seen = False
    for step in range(STEPS):
        lrs, ratios = zero_grad_step(opt)
        lr = lrs[0]
        want = expected_weight_decay(name, base, lr, LR, step)
        bound = decay_bound(lr, want, torch.float64)
        assert decay_error(ratios[0], lr, want) <= bound, (step, decay["weight_decay"], want)
        assert decay["weight_decay"] == wd_sched.last_weight_decays[0]  # the monitor reads the applied value
        assert abs(decay["weight_decay"] - want) <= gamma(6, U64) * want
        # no decay: bit-identical weights and an exact 0, under every schedule
        assert torch.equal(ratios[1], torch.ones_like(ratios[1]))
        assert no_decay["weight_decay"] == 0.0 and wd_sched.last_weight_decays[1] is None
        # the bound sees a wrong formula: plain torch AdamW (constant λ) wherever the schedule differs from it
        plain = base
        if abs(want - plain) > 1e-6 * want:
            wrong_seen = True
            assert decay_error(ratios[0], lr, plain) > decay_bound(lr, plain, torch.float64)
        lr_sched.step()
        if refresh:
            wd_sched.refresh()
    assert wd_sched.step_count == STEPS
    assert wrong_seen == (name != "constant")


@pytest.mark.parametrize(
    "kwargs", [{"foreach": True}, {"foreach": False}, {"fused": True}], ids=["foreach", "for_loop", "fused"]
)
def test_applied_decay_float32_every_implementation(kwargs: dict[str, Any]) -> None:
    """float32 weights, each AdamW implementation (fused kernels form ``w - lr·wd·w``): within the float32
    bound of the AdamC value, and a decay off by 1 % fails it."""
    model = make_model(torch.float32)
    lr, wd = 0.1, 0.5  # per-step decays of 5e-2 down to 2e-4: 1 % of them stays far above float32 rounding
    opt = make_optimizer(model, wd, lr=lr, **kwargs)
    lr_sched = WarmupCosineLR(opt, warmup_steps=0, total_steps=STEPS)
    WeightDecayScheduler(opt, "adamc")
    for _ in range(STEPS):
        lrs, ratios = zero_grad_step(opt)
        want = wd * lrs[0] / lr
        bound = decay_bound(lrs[0], want, torch.float32)
        assert decay_error(ratios[0], lrs[0], want) <= bound
        assert decay_error(ratios[0], lrs[0], want * 1.01) > bound
        assert torch.equal(ratios[1], torch.ones_like(ratios[1]))
        lr_sched.step()


def test_independent_decay_does_not_depend_on_the_base_lr() -> None:
    """The point of "independent": two runs whose base lr differ by 3x apply the same per-step decay at every
    step of the same schedule shape (torch's plain AdamW would differ by 3x)."""
    measured = []
    for lr in (1e-2, 3e-2):
        model = make_model()
        opt = make_optimizer(model, WD_INDEPENDENT, lr=lr)
        lr_sched = WarmupCosineLR(opt, warmup_steps=1, total_steps=STEPS)
        WeightDecayScheduler(opt, "independent")
        run = []
        for _ in range(STEPS):
            lrs, ratios = zero_grad_step(opt)
            run.append((lrs[0] / lr, 1.0 - ratios[0]))  # (schedule multiplier, per-element decay)
            lr_sched.step()
        measured.append(run)
    for (eta_a, d_a), (eta_b, d_b) in zip(*measured, strict=True):
        assert eta_a == pytest.approx(eta_b, rel=gamma(4, U64), abs=0)  # the same schedule shape
        for d, eta in ((d_a, eta_a), (d_b, eta_b)):  # both apply λ·η_t, whatever their base lr
            x = WD_INDEPENDENT * eta
            assert float((d - x).abs().max()) <= decay_bound(1.0, x, torch.float64)
            assert float((d - 3 * x).abs().min()) > decay_bound(1.0, 3 * x, torch.float64)  # not lr-scaled


def test_adamc_uses_the_one_cycle_peak() -> None:
    """OneCycleLR starts at max_lr/25 (its ``initial_lr``) and peaks at ``max_lr``: AdamC's lr_max is the peak
    it records in the groups (``max_lr``), so the correction never exceeds 1."""
    model = make_model()
    opt = make_optimizer(model)
    lr_sched = OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    wd_sched = WeightDecayScheduler(opt, "adamc")
    assert wd_sched.group_rows()[0]["lr_max"] == LR
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr above lr_max" warning along the way
        for _ in range(STEPS):
            lrs, ratios = zero_grad_step(opt)
            want = WD * lrs[0] / LR
            assert decay_error(ratios[0], lrs[0], want) <= decay_bound(lrs[0], want, torch.float64)
            lr_sched.step()


def test_lr_above_lr_max_warns_once_and_lr_max_option_wins() -> None:
    model = make_model()
    opt = make_optimizer(model)
    WarmupCosineLR(opt, warmup_steps=0, total_steps=STEPS)
    wd_sched = WeightDecayScheduler(opt, "adamc")
    opt.param_groups[0]["lr"] = 2 * LR  # a schedule that goes above the group's initial_lr
    with pytest.warns(UserWarning, match=r"group 'decay' has lr 0.02, above its lr_max 0.01.*lr_max=") as rec:
        zero_grad_step(opt)
        zero_grad_step(opt)
    assert len([w for w in rec if "lr_max" in str(w.message)]) == 1
    wd_sched.remove()
    opt2 = make_optimizer(make_model())
    WeightDecayScheduler(opt2, "adamc", lr_max={"decay": 4 * LR})
    lrs, ratios = zero_grad_step(opt2)
    want = WD * LR / (4 * LR)
    assert decay_error(ratios[0], lrs[0], want) <= decay_bound(lrs[0], want, torch.float64)


# --------------------------------------------------------------------------------------- which groups


def head_and_body_optimizer(weight_decay: float = WD) -> torch.optim.Optimizer:
    body = make_model()
    head = nn.Linear(3, 2).double()
    groups = build_param_groups(body, weight_decay) + build_param_groups(
        head, weight_decay, group_prefix="head"
    )
    return torch.optim.AdamW(groups, lr=LR)


@pytest.mark.parametrize(
    "groups",
    [lambda g: not g["name"].startswith("head"), ["decay"], "decay", ["decay", "no_decay"], ["[dn]*"]],
    ids=["callable", "names", "one_name", "with_no_decay", "glob"],
)
def test_groups_selects_who_follows_head_keeps_adamw(groups: Any) -> None:
    """AdamC on the body only: the output layer's own group keeps ordinary AdamW (λ every step) — the paper's
    choice for LLMs; a selected group with zero decay still stays exactly 0."""
    opt = head_and_body_optimizer()
    lr_sched = WarmupCosineLR(opt, warmup_steps=0, total_steps=STEPS)
    wd_sched = WeightDecayScheduler(opt, "adamc", groups=groups)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "head/decay", "head/no_decay"]
    assert wd_sched.followed_groups() == ["decay"]
    assert SCHEDULE_KEY not in opt.param_groups[2]
    for _ in range(STEPS):
        lrs, ratios = zero_grad_step(opt)
        adamc = WD * lrs[0] / LR
        assert decay_error(ratios[0], lrs[0], adamc) <= decay_bound(lrs[0], adamc, torch.float64)
        assert decay_error(ratios[2], lrs[2], WD) <= decay_bound(lrs[2], WD, torch.float64)
        assert opt.param_groups[2]["weight_decay"] == WD
        for i in (1, 3):
            assert torch.equal(ratios[i], torch.ones_like(ratios[i]))
        lr_sched.step()
        wd_sched.refresh()
    assert wd_sched.describe() == (
        "weight decay schedule: adamc (λ·lr_t/lr_max, lr_max=0.01) on groups decay"
    )


def test_groups_added_later_follow_with_their_own_decay() -> None:
    """``add_param_group`` (BackboneFinetuning: the backbone at a tenth of the lr, ramped up later): a decayed
    group follows from its first step with its own ``weight_decay`` as λ and the optimizer's peak lr as lr_max,
    so the ramp raises its decay like the schedule multiplier and never warns; a zero-decay group stays 0."""
    model = make_model()
    extra = nn.Linear(3, 3).double()
    opt = make_optimizer(model)
    WarmupCosineLR(opt, warmup_steps=0, total_steps=STEPS)
    wd_sched = WeightDecayScheduler(opt, "adamc")
    opt.add_param_group(
        {"params": [extra.weight], "param_names": ["w"], "weight_decay": 0.2, "lr": LR / 10, "name": "added"}
    )
    opt.add_param_group(
        {"params": [extra.bias], "param_names": ["b"], "weight_decay": 0.0, "name": "added_bias"}
    )
    wd_sched.refresh()
    assert wd_sched.followed_groups() == ["decay", "added"]
    assert opt.param_groups[2][BASE_KEY] == 0.2 and "initial_lr" not in opt.param_groups[2]
    assert wd_sched.group_rows()[2]["lr_max"] == LR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lr in (LR / 10, LR / 4, LR):  # the ramp
            opt.param_groups[2]["lr"] = lr
            lrs, ratios = zero_grad_step(opt)
            want = 0.2 * lr / LR
            assert decay_error(ratios[2], lrs[2], want) <= decay_bound(lrs[2], want, torch.float64)
            assert torch.equal(ratios[3], torch.ones_like(ratios[3]))
            assert opt.param_groups[3]["weight_decay"] == 0.0


# -------------------------------------------------------------------------------------------- timing


def test_refresh_timing_contract() -> None:
    """Creation shows step 0's value; after a step the group holds that step's value (for the monitor's post-
    hook) even after the LR scheduler moved; ``refresh()`` then shows the next step's value, which the next step
    applies unchanged."""
    model = make_model()
    opt = make_optimizer(model)
    lr_sched = WarmupCosineLR(opt, warmup_steps=0, total_steps=STEPS)
    wd_sched = WeightDecayScheduler(opt, "adamc")
    group = opt.param_groups[0]
    assert group["weight_decay"] == WD  # step 0 at the peak lr
    for _ in range(STEPS - 1):
        shown = group["weight_decay"]
        lrs, ratios = zero_grad_step(opt)
        assert wd_sched.last_weight_decays[0] == shown  # what was shown is what the step used
        assert decay_error(ratios[0], lrs[0], shown) <= decay_bound(lrs[0], shown, torch.float64)
        assert group["weight_decay"] == shown  # post-step: still the applied value
        lr_sched.step()
        assert group["weight_decay"] == shown  # the LR scheduler does not touch it
        wd_sched.refresh()
        assert group["weight_decay"] == pytest.approx(WD * group["lr"] / LR, rel=gamma(4, U64), abs=0)
        assert group["weight_decay"] != shown


def test_skipped_fused_step_is_not_counted() -> None:
    """A fused step a GradScaler overflow skipped (``optimizer.found_inf``) applies nothing and does not move the
    step counter of a step schedule (resolved lazily: no host sync per step)."""
    model = make_model()
    opt = make_optimizer(model, fused=True)
    wd_sched = WeightDecayScheduler(opt, "linear", total_steps=4)
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    _, ratios = zero_grad_step(opt)
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    assert wd_sched.step_count == 0
    opt.found_inf = torch.tensor(0.0)
    zero_grad_step(opt)
    del opt.grad_scale, opt.found_inf
    zero_grad_step(opt)
    assert wd_sched.step_count == 2
    lrs, ratios = zero_grad_step(opt)
    want = WD * (1 - 2 / 4)  # step index 2 of a 4-step linear decay to 0
    assert decay_error(ratios[0], lrs[0], want) <= decay_bound(lrs[0], want, torch.float64)


# -------------------------------------------------------------------------------------------- resume


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    lr_sched: Any,
    wd_sched: WeightDecayScheduler,
    steps: range,
) -> list[float]:
    applied = []
    for k in steps:
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        applied.append(opt.param_groups[0]["weight_decay"])
        lr_sched.step()
        wd_sched.refresh()
    return applied


def _setup(name: str, model: nn.Module, base: float = WD) -> tuple[torch.optim.Optimizer, Any]:
    opt = make_optimizer(model, base)
    return opt, WarmupCosineLR(opt, warmup_steps=2, total_steps=8)


def _wd_options(name: str) -> dict[str, Any]:
    return {"total_steps": 8, "warmup_steps": 1} if name in ("cosine", "linear") else {}


@pytest.mark.parametrize("order", ["scheduler_first", "optimizer_first"])
@pytest.mark.parametrize("name", ["cosine", "adamc", "independent"])
def test_resume_continues_exactly(name: str, order: str) -> None:
    """Train 4 steps, save, rebuild everything, load, train 4 more: the applied weight decays and the weights are
    bit-identical to 8 uninterrupted steps (the scheduler created before or after the optimizer's load)."""
    base = WD_INDEPENDENT if name == "independent" else WD
    model = make_model()
    opt, lr_sched = _setup(name, model, base)
    wd_sched = WeightDecayScheduler(opt, name, **_wd_options(name))
    straight = _train(model, opt, lr_sched, wd_sched, range(8))

    model = make_model()
    opt, lr_sched = _setup(name, model, base)
    wd_sched = WeightDecayScheduler(opt, name, **_wd_options(name))
    first = _train(model, opt, lr_sched, wd_sched, range(4))
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "lr": lr_sched.state_dict(),
            "wd": wd_sched.state_dict(),
        }
    )
    assert saved["opt"]["param_groups"][0][BASE_KEY] == base
    assert saved["wd"]["step_count"] == 4

    resumed = make_model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2, lr2 = _setup(name, resumed, base)
    if order == "scheduler_first":
        wd2 = WeightDecayScheduler(opt2, name, **_wd_options(name))
        opt2.load_state_dict(saved["opt"])
        lr2.load_state_dict(saved["lr"])
    else:  # the group holds the scheduled value from the checkpoint: base_weight_decay says what λ is
        opt2.load_state_dict(saved["opt"])
        lr2.load_state_dict(saved["lr"])
        wd2 = WeightDecayScheduler(opt2, name, **_wd_options(name))
    wd2.load_state_dict(saved["wd"])
    assert wd2.resume_note is None
    second = _train(resumed, opt2, lr2, wd2, range(4, 8))
    assert first + second == straight
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert p is not q
    uninterrupted = make_model()
    opt3, lr3 = _setup(name, uninterrupted, base)
    _train(uninterrupted, opt3, lr3, WeightDecayScheduler(opt3, name, **_wd_options(name)), range(8))
    for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def _checkpoint_after(name: str, steps: int, base: float = WD, **options: Any) -> dict[str, Any]:
    model = make_model()
    opt, lr_sched = _setup(name, model, base)
    wd_sched = WeightDecayScheduler(opt, name, **options)
    _train(model, opt, lr_sched, wd_sched, range(steps))
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "lr": lr_sched.state_dict(),
            "wd": wd_sched.state_dict(),
        }
    )


def test_new_configuration_wins_on_resume() -> None:
    """A checkpoint of a cosine λ schedule at λ = 0.1, resumed with AdamC at λ = 0.05: step 4 applies the new
    schedule with the new λ, and one line says what changed."""
    saved = _checkpoint_after("cosine", 4, total_steps=8)
    model = make_model()
    model.load_state_dict(saved["model"])
    opt, lr_sched = _setup("adamc", model, 0.05)
    wd_sched = WeightDecayScheduler(opt, "adamc")
    opt.load_state_dict(saved["opt"])  # brings back base_weight_decay 0.1: the configuration puts 0.05 back
    assert opt.param_groups[0][BASE_KEY] == 0.05 and opt.param_groups[0][SCHEDULE_KEY] == "adamc"
    lr_sched.load_state_dict(saved["lr"])
    wd_sched.load_state_dict(saved["wd"])
    assert wd_sched.step_count == 4
    assert wd_sched.resume_note == (
        "WeightDecayScheduler: schedule 'cosine' -> 'adamc', base weight_decay of 'decay' 0.1 -> 0.05; the new "
        "configuration applies from step 4"
    )
    lrs, ratios = zero_grad_step(opt)
    want = 0.05 * lrs[0] / LR
    assert decay_error(ratios[0], lrs[0], want) <= decay_bound(lrs[0], want, torch.float64)


def test_resume_with_a_group_no_longer_scheduled() -> None:
    """The checkpoint scheduled the decay group ("independent": torch weight_decay λ/lr_max = 0.1); the new run
    leaves it out (``groups=[]``): it gets back its configured decay, not the scheduled value saved with it."""
    saved = _checkpoint_after("independent", 3, base=WD_INDEPENDENT)
    assert saved["opt"]["param_groups"][0]["weight_decay"] == pytest.approx(WD_INDEPENDENT / LR)
    for order in ("scheduler_first", "optimizer_first"):
        model = make_model()
        opt, _ = _setup("constant", model, WD_INDEPENDENT)
        if order == "scheduler_first":
            wd_sched = WeightDecayScheduler(opt, "constant", groups=[])
            opt.load_state_dict(saved["opt"])
        else:
            opt.load_state_dict(saved["opt"])
            wd_sched = WeightDecayScheduler(opt, "constant", groups=[])
        wd_sched.load_state_dict(saved["wd"])
        group = opt.param_groups[0]
        assert group["weight_decay"] == WD_INDEPENDENT, order
        assert BASE_KEY not in group and SCHEDULE_KEY not in group
        assert "'decay' no longer follows the schedule" in (wd_sched.resume_note or "")


def test_total_steps_from_the_checkpoint_when_not_configured() -> None:
    saved = _checkpoint_after("linear", 3, total_steps=8)
    opt, _ = _setup("linear", make_model())
    wd_sched = WeightDecayScheduler(opt, "linear")
    wd_sched.load_state_dict(saved["wd"])
    assert wd_sched.schedule.total_steps == 8
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(WD * (1 - 3 / 8), rel=gamma(4, U64))
    longer = WeightDecayScheduler(_setup("linear", make_model())[0], "linear", total_steps=16)
    longer.load_state_dict(saved["wd"])
    assert longer.schedule.total_steps == 16
    assert longer.resume_note == (
        "WeightDecayScheduler: total_steps 8 -> 16; the new configuration applies from step 3"
    )


# ------------------------------------------------------------------------- the monitor stays exact


@pytest.mark.parametrize("name", SCHEDULES)
def test_update_split_exact_under_every_schedule(name: str) -> None:
    """Real gradients: the monitor's functional core, reading the groups right after each step, splits the
    update exactly as the snapshots say, with the decay the schedule's formula gives for that step."""
    base = WD_INDEPENDENT if name == "independent" else WD
    model = make_model(torch.float32)
    opt = make_optimizer(model, base)
    lr_sched = WarmupCosineLR(opt, warmup_steps=1, total_steps=STEPS)
    wd_sched = scheduler_for(name, opt)
    for step in range(STEPS):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        lr = float(opt.param_groups[0]["lr"])
        record = {
            "step": step,
            "groups": [
                {
                    "label": g["name"],
                    "lr": float(g["lr"]),
                    "weight_decay": expected_weight_decay(name, base, lr, LR, step) if i == 0 else 0.0,
                    "maximize": False,
                    "decoupled": True,  # AdamW
                    "names": list(g["param_names"]),
                    "named": True,
                    "dtypes": [str(p.dtype) for p in g["params"]],
                    "old": [p.detach().double().clone() for p in g["params"]],
                }
                for i, g in enumerate(opt.param_groups)
            ],
        }
        opt.step()
        for rg, g in zip(record["groups"], opt.param_groups, strict=True):
            rg["new"] = [p.detach().double().clone() for p in g["params"]]
            rg["grad"] = [p.grad.detach().double().clone() for p in g["params"]]
        metrics = update_split(opt).metrics(per_layer=True)
        bad = compare_metrics(metrics, reference_metrics(record), reference_bounds(record))
        assert bad == {}, (name, step, bad)
        assert metrics["adamw/no_decay/decay_norm"] == 0.0
        lr_sched.step()
        wd_sched.refresh()


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("schedule", "options", "error", "match"),
    [
        (
            "cosinus",
            {},
            ValueError,
            r"unknown weight decay schedule 'cosinus'.*'constant', 'independent', 'adamc'",
        ),
        ("cosine", {"warmup_steps": -1}, ValueError, r"`warmup_steps` must be >= 0"),
        ("cosine", {"total_steps": 0}, ValueError, r"`total_steps` must be > 0"),
        (
            "linear",
            {"warmup_steps": 5, "total_steps": 3},
            ValueError,
            r"`total_steps` \(3\) must be >= `warmup_steps`",
        ),
        ("cosine", {"final_ratio": math.nan}, ValueError, r"`final_ratio` must be finite"),
        ("cosine", {"final_ratio": 1.5}, ValueError, r"`final_ratio` must be in \[0, 1\]"),
        ("adamc", {"lr_max": 0.0}, ValueError, r"`lr_max` must be > 0"),
        ("adamc", {"lr_max": math.inf}, ValueError, r"`lr_max` must be finite"),
        ("adamc", {"lr_max": {"decay": -1.0}}, ValueError, r"`lr_max\['decay'\]` must be > 0"),
        ("adamc", {"lr_max": {"head": 1e-3}}, ValueError, r"`lr_max` names groups \['head'\]"),
        (
            "adamc",
            {"final_ratio": 0.1},
            ValueError,
            r"'adamc' does not use `final_ratio`.*'cosine', 'linear'",
        ),
        ("constant", {"lr_max": 1e-3}, ValueError, r"'constant' does not use `lr_max`"),
        ("cosine", {"warmup_steps": 1.5}, TypeError, r"`warmup_steps` must be an int"),
        ({"warmup_steps": 3}, {}, ValueError, r"needs a `name`"),
        ({"name": "cosine", "total_steps": 3}, {"total_steps": 4}, ValueError, r"`total_steps` given twice"),
        (
            {"name": "cosine", "decay_to": 0.1},
            {},
            ValueError,
            r"unknown weight decay schedule option\(s\) 'decay_to'",
        ),
        (
            "adamc",
            {"groups": ["decay", "head"]},
            ValueError,
            r"`groups` entries \['head'\] match no parameter group",
        ),
        ("adamc", {"groups": [3]}, TypeError, r"`groups` must be group names"),
    ],
)
def test_bad_options_are_errors_naming_them(
    schedule: Any, options: dict[str, Any], error: type, match: str
) -> None:
    opt = make_optimizer(make_model())
    with pytest.raises(error, match=match):
        WeightDecayScheduler(opt, schedule, **options)
    assert SCHEDULE_KEY not in opt.param_groups[0]  # nothing half-applied


def test_bad_groups_are_errors_naming_the_group() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"group 'decay' has weight_decay=1 with the 'independent' schedule"):
        WeightDecayScheduler(make_optimizer(model, 1.0), "independent")  # torch units: refused at >= 1
    zero_lr = make_optimizer(model, lr=0.0)
    with pytest.raises(
        ValueError, match=r"group 'decay' has lr=0.0 and no initial_lr: the 'adamc' weight decay"
    ):
        WeightDecayScheduler(zero_lr, "adamc")
    WarmupCosineLR(zero_lr, total_steps=3)  # an LR scheduler recorded initial_lr = 0
    with pytest.raises(ValueError, match=r"group 'decay' has initial_lr=0.0: the 'independent' weight decay"):
        WeightDecayScheduler(zero_lr, "independent")
    # a later group's error leaves the earlier groups untouched (all checks run before any write)
    two = head_and_body_optimizer()
    two.param_groups[2]["weight_decay"] = math.nan
    with pytest.raises(ValueError, match=r"group 'head/decay' has weight_decay=nan"):
        WeightDecayScheduler(two, "adamc")
    assert BASE_KEY not in two.param_groups[0] and "initial_lr" not in two.param_groups[0]
    negative = make_optimizer(model)
    negative.param_groups[0]["weight_decay"] = -0.1
    with pytest.raises(ValueError, match=r"group 'decay' has weight_decay=-0.1: it must be finite and >= 0"):
        WeightDecayScheduler(negative, "cosine", total_steps=3)
    coupled = torch.optim.Adam(build_param_groups(model, WD), lr=LR)
    with pytest.raises(ValueError, match=r"group 'decay' of Adam applies weight_decay as coupled L2"):
        WeightDecayScheduler(coupled, "adamc")
    WeightDecayScheduler(coupled, "cosine", total_steps=3)  # scheduling an L2 coefficient is allowed


def test_independent_refuses_torch_units_message() -> None:
    with pytest.raises(ValueError) as info:
        WeightDecayScheduler(make_optimizer(make_model(), 1.0), "independent")
    assert "per-step decay at the peak lr" in str(info.value) and "multiplies the weights by 0" in str(
        info.value
    )


def test_step_schedule_without_length_fails_at_the_step_that_needs_it() -> None:
    """λ is exact without total_steps up to the end of the hold (f = 1 there); the first step that needs the
    length is an error naming `total_steps`, never a silently constant λ. ``set_total_steps`` fixes it."""
    opt = make_optimizer(make_model())
    wd_sched = WeightDecayScheduler(opt, "cosine", warmup_steps=1)
    zero_grad_step(opt)
    zero_grad_step(opt)  # step index 1 == warmup_steps: progress 0, f = 1
    with pytest.raises(ValueError, match=r"'cosine' weight decay schedule has no `total_steps`"):
        zero_grad_step(opt)
    wd_sched.set_total_steps(3)
    lrs, ratios = zero_grad_step(opt)
    want = WD * expected_factor("cosine", 2, 1, 3, 0.0)
    assert decay_error(ratios[0], lrs[0], want) <= decay_bound(lrs[0], want, torch.float64)
    with pytest.raises(ValueError, match=r"'adamc' weight decay schedule has no `total_steps`"):
        WeightDecayScheduler(make_optimizer(make_model()), "adamc").set_total_steps(3)


def test_one_scheduler_per_optimizer() -> None:
    opt = make_optimizer(make_model())
    first = WeightDecayScheduler(opt, "adamc")
    with pytest.raises(RuntimeError, match=r"already has a WeightDecayScheduler.*remove\(\)"):
        WeightDecayScheduler(opt, "constant")
    first.remove()
    WeightDecayScheduler(opt, "constant")
    assert opt.param_groups[0]["weight_decay"] == WD  # the base, not the last adamc value


def test_state_dict_loads_only_scheduler_state() -> None:
    wd_sched = WeightDecayScheduler(make_optimizer(make_model()), "adamc")
    with pytest.raises(ValueError, match=r"not a WeightDecayScheduler state dict"):
        wd_sched.load_state_dict({"last_epoch": 3})
    with pytest.raises(ValueError, match=r"`step_count` must be an int >= 0"):
        wd_sched.step_count = -1


# ------------------------------------------------------------------------------------- pure functions


def test_decay_factor_key_points() -> None:
    for kind in ("cosine", "linear"):
        assert decay_factor(kind, 0, warmup_steps=3, total_steps=13, final_ratio=0.1) == 1.0  # held
        assert decay_factor(kind, 3, warmup_steps=3, total_steps=13, final_ratio=0.1) == 1.0
        assert decay_factor(kind, 13, warmup_steps=3, total_steps=13, final_ratio=0.1) == pytest.approx(0.1)
        assert decay_factor(kind, 99, warmup_steps=3, total_steps=13, final_ratio=0.1) == pytest.approx(0.1)
        assert decay_factor(kind, 8, warmup_steps=3, total_steps=13, final_ratio=0.1) == pytest.approx(0.55)
    assert decay_factor("cosine", 4, warmup_steps=3, total_steps=13, final_ratio=0.0) == pytest.approx(
        (1 + math.cos(math.pi / 10)) / 2
    )
    with pytest.raises(ValueError, match="'cosine' and 'linear'"):
        decay_factor("adamc", 0, warmup_steps=0, total_steps=1, final_ratio=0.0)


def test_parse_from_yaml_shapes() -> None:
    spec, groups = parse_weight_decay_schedule({"name": "cosine", "warmup_steps": 2, "groups": ["decay"]})
    assert spec == WeightDecaySchedule("cosine", warmup_steps=2) and groups == ["decay"]
    assert parse_weight_decay_schedule(None) == (WeightDecaySchedule("constant"), None)
    assert parse_weight_decay_schedule("adamc", lr_max=3e-3)[0].options() == {"lr_max": 3e-3}


def test_descriptions() -> None:
    cosine = WeightDecaySchedule.create("cosine", warmup_steps=10, total_steps=1000, final_ratio=0.1)
    assert describe_schedule(cosine, ["decay"]) == (
        "weight decay schedule: cosine (λ held for 10 warm-up steps, then cosine to 0.1·λ at step 1000) on groups "
        "decay"
    )
    independent = WeightDecaySchedule.create("independent")
    assert describe_schedule(independent, ["decay", "head/decay"], {"decay": 3e-3, "head/decay": 3e-3}) == (
        "weight decay schedule: independent (per-step decay λ·lr_t/lr_max, λ in per-step units; torch "
        "weight_decay = λ/lr_max; lr_max=0.003) on groups decay, head/decay"
    )
    assert describe_schedule(WeightDecaySchedule.create("adamc"), ["a", "b"], {"a": 1e-3, "b": 2e-3}) == (
        "weight decay schedule: adamc (λ·lr_t/lr_max, lr_max per group: a=0.001, b=0.002) on groups a, b"
    )
    assert describe_schedule(WeightDecaySchedule.create("linear"), []).endswith(
        "on groups (none: no group with non-zero weight decay selected)"
    )


def test_group_rows_show_both_lambda_and_torch_value() -> None:
    opt = make_optimizer(make_model(), WD_INDEPENDENT)
    rows = WeightDecayScheduler(opt, "independent").group_rows()
    assert rows[0] == {
        "name": "decay",
        "follows": True,
        "base_weight_decay": WD_INDEPENDENT,
        "weight_decay": WD_INDEPENDENT / LR,
        "lr": LR,
        "lr_max": LR,
        "per_step_decay": LR * (WD_INDEPENDENT / LR),
    }
    assert rows[1]["follows"] is False and rows[1]["weight_decay"] == 0.0


def test_module_docstring_examples() -> None:
    assert doctest.testmod(scheduler_module).failed == 0
