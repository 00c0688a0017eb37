"""Weight decay from its EMA timescale τ = 1/(lr·λ) (Wang & Aitchison, 2024): conversions, option conflicts,
the plain-words checks, and what τ means for real AdamW steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import update_split
from lightning_adamw.weight_decay import (
    TimescaleDecay,
    WeightDecayScheduler,
    check_timescale_options,
    describe_timescale,
    resolve_weight_decay,
    timescale_in_steps,
    timescale_steps,
    timescale_warning,
    weight_decay_from_timescale,
)
from tests.helpers.tolerance import SAFETY, gamma, unit_roundoff

U64 = unit_roundoff(torch.float64)


@pytest.mark.parametrize("lr", [1e-4, 3e-3, 0.1])
@pytest.mark.parametrize("tau", [10.0, 1234.5, 1e6])
def test_weight_decay_and_timescale_are_inverse(lr: float, tau: float) -> None:
    wd = weight_decay_from_timescale(lr, tau)
    assert wd == pytest.approx(1.0 / (lr * tau), rel=SAFETY * gamma(4, U64), abs=0)
    # two closed forms of two roundings each, composed: 4 roundings
    assert timescale_steps(lr, wd) == pytest.approx(tau, rel=SAFETY * gamma(4, U64), abs=0)


def test_independent_schedule_takes_per_step_units() -> None:
    """Under "independent" λ is the per-step decay at the peak lr: τ = 1/λ, whatever the lr."""
    assert weight_decay_from_timescale(123.0, 200.0, schedule="independent") == 1.0 / 200.0
    assert timescale_steps(0.5, 0.005, schedule="independent") == 200.0
    assert timescale_steps(1e-3, 0.0) == math.inf and timescale_steps(0.0, 0.1) == math.inf


def test_timescale_is_what_real_adamw_steps_do() -> None:
    """λ from τ = 50 steps at lr 1e-2: 50 real AdamW steps with no gradient multiply the weights by exactly
    (1 - 1/τ)^τ (≈ e^-1: the initial weights' share of the average after one timescale). Bound: each step
    rounds ``1 - lr·λ`` (2) and the product (1), plus ``lr·λ`` from τ (3) and the reference power (≤ 2·50)."""
    tau, lr = 50, 1e-2
    wd = weight_decay_from_timescale(lr, tau)
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd)
    for _ in range(tau):
        w.grad = torch.zeros_like(w)
        opt.step()
    want = (1.0 - 1.0 / tau) ** tau
    bound = SAFETY * gamma(3 * tau + 3 + 2 * tau, U64) * want
    assert float((w.detach() / w0 - want).abs().max()) <= bound
    assert abs(want - math.exp(-1)) < 0.01  # one timescale: e^-1 of the start remains (to O(1/τ))


@pytest.mark.parametrize(("schedule", "wd"), [("constant", 0.1), ("independent", 1e-3)])
def test_monitor_timescale_is_the_same_number(schedule: str, wd: float) -> None:
    """The monitor's ``ema_timescale_steps`` (1/(lr·weight_decay) of the step, torch-level) is
    :func:`timescale_steps` at the peak lr, also when "independent" makes torch's weight_decay λ/lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    lr = 3e-3
    opt = torch.optim.AdamW(build_param_groups(model, wd), lr=lr)
    WeightDecayScheduler(opt, schedule)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    metric = update_split(opt).metrics()["adamw/decay/ema_timescale_steps"]
    assert metric == pytest.approx(
        timescale_steps(lr, wd, schedule=schedule), rel=SAFETY * gamma(6, U64), abs=0
    )


def test_timescale_in_steps_from_epochs_or_fraction() -> None:
    assert timescale_in_steps(ema_timescale_epochs=2.5, steps_per_epoch=40) == 100.0
    assert timescale_in_steps(ema_timescale_fraction=0.25, total_steps=1000) == 250.0
    with pytest.raises(
        ValueError, match="exactly one of `ema_timescale_epochs` and `ema_timescale_fraction`"
    ):
        timescale_in_steps(
            ema_timescale_epochs=1.0, ema_timescale_fraction=0.1, steps_per_epoch=3, total_steps=9
        )
    with pytest.raises(ValueError, match="exactly one"):
        timescale_in_steps()
    with pytest.raises(
        ValueError, match=r"`ema_timescale_epochs` needs the number of optimizer steps per epoch"
    ):
        timescale_in_steps(ema_timescale_epochs=1.0)
    with pytest.raises(
        ValueError, match=r"`ema_timescale_fraction` needs the planned number of optimizer steps"
    ):
        timescale_in_steps(ema_timescale_fraction=0.5)
    with pytest.raises(ValueError, match=r"`ema_timescale_fraction` must be finite and > 0"):
        timescale_in_steps(ema_timescale_fraction=0.0, total_steps=10)
    with pytest.raises(ValueError, match=r"`ema_timescale_epochs` must be finite and > 0"):
        timescale_in_steps(ema_timescale_epochs=math.inf, steps_per_epoch=10)
    with pytest.raises(TypeError, match=r"`ema_timescale_epochs` must be a number"):
        timescale_in_steps(ema_timescale_epochs="2", steps_per_epoch=10)


@pytest.mark.parametrize(
    ("given", "names"),
    [
        ({"weight_decay": 0.1, "ema_timescale_epochs": 2.0}, "`weight_decay` and `ema_timescale_epochs`"),
        ({"weight_decay": 0.1, "ema_timescale_fraction": 0.2}, "`weight_decay` and `ema_timescale_fraction`"),
        (
            {"ema_timescale_epochs": 2.0, "ema_timescale_fraction": 0.2},
            "`ema_timescale_epochs` and `ema_timescale_fraction`",
        ),
    ],
)
def test_two_ways_to_set_the_decay_is_an_error_naming_both(given: dict[str, float], names: str) -> None:
    with pytest.raises(ValueError, match=f"{names} are both given"):
        check_timescale_options(**given)
    with pytest.raises(ValueError, match=f"{names} are both given"):
        resolve_weight_decay(1e-3, steps_per_epoch=10, total_steps=100, **given)
    with pytest.raises(ValueError) as raised:
        check_timescale_options(**given)
    assert "three ways" not in str(raised.value)  # (two were given: the message once said "three ways")


def test_all_three_given_is_an_error_naming_all() -> None:
    with pytest.raises(ValueError, match="`weight_decay` and `ema_timescale_epochs` and `ema_timescale_fraction` are"
                       " all given"):  # fmt: skip
        check_timescale_options(weight_decay=0.1, ema_timescale_epochs=2.0, ema_timescale_fraction=0.2)


def test_check_timescale_options_says_which_and_validates_early() -> None:
    assert check_timescale_options() is None
    assert check_timescale_options(weight_decay=0.0) == "weight_decay"
    assert check_timescale_options(ema_timescale_fraction=0.3) == "ema_timescale_fraction"
    with pytest.raises(ValueError, match=r"`ema_timescale_epochs` must be finite and > 0"):
        check_timescale_options(ema_timescale_epochs=-1.0)


def test_resolve_weight_decay_gives_every_view() -> None:
    got = resolve_weight_decay(1e-3, ema_timescale_fraction=0.25, steps_per_epoch=100, total_steps=4000)
    assert got == TimescaleDecay(
        weight_decay=pytest.approx(1.0),
        lr=1e-3,
        tau_steps=1000.0,
        tau_epochs=10.0,
        tau_fraction=0.25,
        source="ema_timescale_fraction",
    )
    got = resolve_weight_decay(2e-3, ema_timescale_epochs=3, steps_per_epoch=50)
    assert got.tau_steps == 150.0 and got.tau_fraction is None and got.tau_epochs == 3.0
    assert got.weight_decay == pytest.approx(1 / (2e-3 * 150), rel=SAFETY * gamma(3, U64), abs=0)
    got = resolve_weight_decay(1e-3, weight_decay=0.5, total_steps=4000)
    assert got.source == "weight_decay" and got.tau_steps == pytest.approx(2000.0) and got.tau_fraction == 0.5
    got = resolve_weight_decay(1e-3, ema_timescale_fraction=0.1, total_steps=1000, schedule="independent")
    assert got.weight_decay == 0.01  # per-step units: 1/τ
    with pytest.raises(
        ValueError, match="give one of `weight_decay`, `ema_timescale_epochs`, `ema_timescale_fraction`"
    ):
        resolve_weight_decay(1e-3)


@pytest.mark.parametrize(
    ("option", "value", "tau"),
    [
        ("ema_timescale_fraction", 0.01, 0.2),  # the fresh user's run: 1% of 20 steps, lr·λ = 5
        ("ema_timescale_fraction", 0.05, 1.0),  # lr·λ = 1: every step zeroes the weights
        ("ema_timescale_epochs", 0.1, 0.5),  # a tenth of a 5-step epoch
    ],
)
def test_a_timescale_of_one_step_or_less_is_refused(option: str, value: float, tau: float) -> None:
    with pytest.raises(
        ValueError, match=rf"`{option}`={value!r} gives an EMA timescale of τ = {tau:g} optimizer"
    ):
        resolve_weight_decay(0.01, total_steps=20, steps_per_epoch=5, **{option: value})
    for schedule in ("constant", "independent", "adamc"):
        with pytest.raises(ValueError, match="τ must be more than one step"):
            resolve_weight_decay(
                0.01, total_steps=20, steps_per_epoch=5, schedule=schedule, **{option: value}
            )
    # just above one step is allowed (the monitor then warns that it is shorter than an epoch)
    assert resolve_weight_decay(0.01, ema_timescale_fraction=0.06, total_steps=20).tau_steps == pytest.approx(
        1.2
    )


def test_describe_timescale() -> None:
    got = resolve_weight_decay(1e-3, ema_timescale_fraction=0.25, steps_per_epoch=100, total_steps=4000)
    assert describe_timescale(got) == (
        "λ = 1 (from ema_timescale_fraction): τ = 1/(lr·λ), lr=0.001 = 1000 steps = 10 epochs = 0.25 of training"
    )
    got = resolve_weight_decay(1e-3, weight_decay=0.01, schedule="independent")
    assert describe_timescale(got) == "λ = 0.01: τ = 1/λ = 100 steps"
    assert describe_timescale(resolve_weight_decay(1e-3, weight_decay=0.0)) == "λ = 0: no decay (τ = ∞)"
    longer = resolve_weight_decay(1e-3, weight_decay=0.01, total_steps=50)  # τ = 1e5 steps
    assert describe_timescale(longer).endswith("= 1e+05 steps = 2000 times the whole run")


def test_timescale_warnings_in_plain_words() -> None:
    longer = timescale_warning(5000.0, total_steps=1000, steps_per_epoch=100)
    assert longer is not None and "longer than the whole run (1000 steps)" in longer
    assert "cannot reach its equilibrium" in longer and "not an average over training" in longer
    shorter = timescale_warning(50.0, total_steps=1000, steps_per_epoch=100)
    assert shorter is not None and "shorter than one epoch (100 steps)" in shorter
    both = timescale_warning(50.0, total_steps=40, steps_per_epoch=100)  # a run shorter than an epoch
    assert both is not None and "longer than the whole run" in both and "shorter than one epoch" in both
    assert timescale_warning(300.0, total_steps=1000, steps_per_epoch=100) is None
    assert timescale_warning(math.inf, total_steps=1000, steps_per_epoch=100) is None
    assert timescale_warning(5000.0) is None  # nothing known: nothing to say
