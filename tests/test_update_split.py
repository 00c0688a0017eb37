"""The functional core: the split of real optimizer steps against parameter snapshots taken around them."""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adamw.update_split as us
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import (
    adamw_update_split,
    derive_metrics,
    generic_update_split,
    take_snapshot,
    update_split,
)
from lightning_adamw.update_split.scalars import bias_corrections, replay_device, replay_float32, replay_host
from tests.helpers.monitor_bounds import bias_correction_rel
from tests.helpers.monitor_reference import (
    check_split,
    checked_step,
    compare_metrics,
    make_model,
    reference_bounds,
    reference_metrics,
    snapshot_record,
)
from tests.helpers.tolerance import SAFETY, formula_rel, gamma, unit_roundoff

U64 = unit_roundoff(torch.float64)
U32 = unit_roundoff(torch.float32)


def train_and_check(
    opt_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int = 4,
    weight_decay: float = 0.1,
    chunk_numel: int | None = None,
) -> tuple[torch.optim.Optimizer, us.UpdateSplit, dict[str, Any]]:
    model = make_model(dtype)
    opt = opt_factory(build_param_groups(model, weight_decay))
    gen = torch.Generator().manual_seed(1)
    split = record = None
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen).to(dtype)

        def closure(x: torch.Tensor = x) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()

        record = snapshot_record(opt, step, closure)
        split = update_split(opt, chunk_numel=chunk_numel)
        check_split(split, record)
    assert split is not None and record is not None
    return opt, split, record


VARIANTS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "foreach": (torch.optim.AdamW, {"foreach": True}),
    "for_loop": (torch.optim.AdamW, {"foreach": False}),
    "fused": (torch.optim.AdamW, {"fused": True}),
    "amsgrad": (torch.optim.AdamW, {"amsgrad": True}),
    "maximize": (torch.optim.AdamW, {"maximize": True}),
    "amsgrad_maximize_for_loop": (torch.optim.AdamW, {"amsgrad": True, "maximize": True, "foreach": False}),
    "adam_decoupled": (torch.optim.Adam, {"decoupled_weight_decay": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adamw_split_matches_snapshots(variant: str, dtype: torch.dtype) -> None:
    cls, kwargs = VARIANTS[variant]
    _, split, record = train_and_check(lambda g: cls(g, lr=1e-2, **kwargs), dtype)
    metrics = split.metrics(per_layer=True)
    # the bounds are tight enough to see a decay computed with weight_decay off by 1e-3 (float32; 1e-6 float64)
    off = 1e-3 if dtype == torch.float32 else 1e-6
    key = "adamw/decay/decay_norm"
    assert abs(metrics[key] * (1 + off) - reference_metrics(record)[key]) > reference_bounds(record)[key]
    # the no-decay group has no decay component at all: exactly zero, not "small"
    assert metrics["adamw/no_decay/decay_norm"] == 0.0
    no_decay_layers = [k for k in metrics if k.startswith("adamw_layer/") and k.endswith("/decay_norm")]
    assert {k: metrics[k] for k in no_decay_layers if metrics[k] == 0.0} == {
        f"adamw_layer/{n}/decay_norm": 0.0 for n in ("0.bias", "1.weight", "1.bias", "3.bias")
    }
    assert metrics["adamw/decay/decay_norm"] > 0.0
    # equilibrium predictions and EMA timescale only where there is decay
    assert "adamw/no_decay/equilibrium_weight_norm" not in metrics
    assert metrics["adamw/decay/ema_timescale_steps"] == pytest.approx(
        1.0 / (1e-2 * 0.1), rel=formula_rel(2), abs=0
    )


def test_chunk_size_does_not_change_results() -> None:
    """Chunks change only the order of the sums: every chunking is within its bound of the same reference, so
    two of them differ by at most twice the bound (metrics of the hyperparameters alone: by rounding)."""
    results = []
    for chunk in (1, 7, 100, None):
        _, split, record = train_and_check(
            lambda g: torch.optim.AdamW(g, lr=1e-2), torch.float64, steps=2, chunk_numel=chunk
        )
        results.append(split.metrics(per_layer=True))
    bounds = reference_bounds(record)
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key, value in results[0].items():
            tol = 2.0 * bounds[key] if key in bounds else formula_rel(4) * abs(value)
            assert abs(other[key] - value) <= tol, (key, other[key], value, tol)


def test_adam_and_adamw_identical_without_decay() -> None:
    """With weight_decay=0 Adam and AdamW are the same algorithm: same weights, bit for bit, same split."""
    models = [make_model(torch.float32, seed=3) for _ in range(2)]
    opts = [
        torch.optim.Adam(build_param_groups(models[0], 0.0), lr=1e-2),
        torch.optim.AdamW(build_param_groups(models[1], 0.0), lr=1e-2),
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 8, generator=gen)
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p0, p1)
        m0, m1 = (update_split(o).metrics(per_layer=True) for o in opts)
        assert m0 == m1  # Adam(wd=0) is reported as AdamW, with identical numbers
        assert m0["adamw/decay/decay_norm"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "chunk"),
    [({}, None), ({"maximize": True}, None), ({"amsgrad": True, "foreach": False}, 37), ({}, 5)],
    ids=["plain", "maximize", "amsgrad_chunked", "tiny_chunks"],
)
def test_coupled_l2_statistics(kwargs: dict[str, Any], chunk: int | None) -> None:
    lr, wd = 1e-2, 0.1
    opt, split, _ = train_and_check(
        lambda g: torch.optim.Adam(g, lr=lr, **kwargs),
        torch.float64,
        weight_decay=wd,
        chunk_numel=chunk,
    )
    metrics = split.metrics()
    kinds = {g.name: g.kind for g in split.groups}
    assert kinds == {"decay": "adam_l2", "no_decay": "adamw"}  # Adam with wd=0 in a group is AdamW there
    # per-coordinate decay rate lr*wd/(sqrt(v_hat)+eps) from the optimizer state, vs torch's min/median/max
    group = opt.param_groups[0]
    rates = []
    for p in group["params"]:
        st = opt.state[p]
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if kwargs.get("amsgrad") else st["exp_avg_sq"]
        denom = v.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8
        rates.append((lr * wd / denom).reshape(-1))
    rates_t = torch.cat(rates)
    # min / max: the same float64 formula, up to sqrt(.) vs (.)**0.5 of the bias correction (6 roundings a side)
    assert metrics["adam_l2/decay/eff_decay_rate_min"] == pytest.approx(
        float(rates_t.min()), rel=formula_rel(6), abs=0
    )
    assert metrics["adam_l2/decay/eff_decay_rate_max"] == pytest.approx(
        float(rates_t.max()), rel=formula_rel(6), abs=0
    )
    median = metrics["adam_l2/decay/eff_decay_rate_median"]
    assert median == pytest.approx(
        float(rates_t.median()), rel=median_rel_bound(lr * wd / rates_t, U64), abs=0
    )
    assert metrics["adam_l2/decay/uniform_decay_rate"] == lr * wd
    # L2 inside Adam is not a uniform decay: the rate spreads over orders of magnitude across coordinates
    assert metrics["adam_l2/decay/eff_decay_rate_max"] > 10 * metrics["adam_l2/decay/eff_decay_rate_min"]
    assert 0.0 < metrics["adam_l2/decay/l2_grad_share"] < 1.0


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_coupled_median_rank_convention(n: int) -> None:
    """The median is the one torch.median gives for the rates (lower median), also for even counts."""
    w = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.logspace(-3, 1, n, dtype=torch.float64)
    opt.step()
    st = opt.state[w]
    denom = st["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999) + 1e-8
    rates = 0.1 * 0.5 / denom
    metrics = update_split(opt).metrics()
    bound = median_rel_bound(denom, U64)
    assert metrics["adam_l2/group0/eff_decay_rate_median"] == pytest.approx(
        float(rates.median()), rel=bound, abs=0
    )
    if n >= 2:  # the neighbouring rank (the upper median) is outside the bound
        upper = float(rates.sort().values[n // 2]) if n % 2 == 0 else float(rates.sort().values[n // 2 + 1])
        assert metrics["adam_l2/group0/eff_decay_rate_median"] != pytest.approx(upper, rel=bound, abs=0)


def median_rel_bound(denominators: torch.Tensor, u: float) -> float:
    """Relative error bound of the monitor's median of the coupled-L2 decay rates ``lr*wd / denominator``.

    The median denominator is found by 3 passes of 1024 bins over ``[log min, log max]``: the true median's
    log lies in the last bin, of width ``W = log(max/min) / 1024**3``, whose midpoint is returned (error
    ``W/2``). Each pass computes ``(log d - lo) / width`` with rounding ``<= 4 u L`` in log units (``L`` the
    largest ``|log d|``), which can move a value across a bin edge by that much; ``exp`` and the final
    division add 2 roundings (float64).
    """
    logs = denominators.double().log()
    width = float(logs.max() - logs.min())
    largest = float(logs.abs().max())
    log_error = width / (2.0 * 1024**3) + 3 * 4 * u * largest
    return SAFETY * (math.expm1(log_error) + gamma(2, U64))


def test_generic_fallback_from_snapshot() -> None:
    model = make_model(torch.float64)
    opt = torch.optim.SGD(
        build_param_groups(model, 1e-2), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    )
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(16, 8, generator=gen, dtype=torch.float64)

        def closure(x: torch.Tensor = x) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()

        snapshot = take_snapshot(opt)
        record = snapshot_record(opt, step, closure)
        metrics = generic_update_split(opt, snapshot, per_layer=True)
        expected = reference_metrics(record, adam_family=False)
        assert compare_metrics(metrics, expected, reference_bounds(record, adam_family=False)) == {}
        assert not any(k.startswith("adamw") for k in metrics)
    # without a snapshot nothing can be said about the update of a non-Adam optimizer
    assert update_split(opt).metrics() == {}


def test_parameters_without_gradient_are_left_out() -> None:
    model = make_model(torch.float64)
    unused = nn.Linear(8, 8).double()  # never gets a gradient, so Adam does not update it
    groups = build_param_groups(model, 0.1)
    groups[0]["params"] = [*groups[0]["params"], ("unused.weight", unused.weight)]
    opt = torch.optim.AdamW(groups, lr=1e-2)

    def closure() -> None:
        opt.zero_grad()
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()

    record = snapshot_record(opt, 0, closure)
    split = update_split(opt)
    names = [t.name for g in split.groups for t in g.tensors]
    assert "unused.weight" not in names and "0.weight" in names
    check_split(split, record)


def test_nonfinite_values_are_counted_not_reported() -> None:
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    split = update_split(opt)
    assert split.nonfinite_tensors == ["0.weight"]
    metrics = split.metrics(per_layer=True)
    assert all(math.isfinite(v) for v in metrics.values())
    assert not any(k.startswith("adamw/decay/") or k.startswith("adamw_layer/0.weight/") for k in metrics)
    assert "adamw/no_decay/grad_update_norm" in metrics and "adamw_layer/3.weight/decay_norm" in metrics


def test_fused_step_skipped_by_grad_scaler_is_not_reported() -> None:
    """A fused optimizer is always called by GradScaler; an overflow step must not be reported."""
    results: dict[str, list[us.UpdateSplit]] = {"fused": [], "foreach": []}
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        model = make_model(torch.float32)
        opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2, **kwargs)
        opt.register_step_post_hook(lambda o, a, k, name=name: results[name].append(update_split(o)))
        scaler = torch.amp.GradScaler("cpu")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(model(torch.randn(4, 8)).sum()).backward()
        model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert len(results["fused"]) == 1 and results["fused"][0].skipped
    assert results["fused"][0].metrics() == {}
    assert results["foreach"] == []  # GradScaler did not even call step(): the hook never fired


def test_no_per_parameter_item_and_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(torch.float32)
    opt = torch.optim.Adam(build_param_groups(model, 0.1), lr=1e-2)  # coupled + decoupled groups
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    counts = {"item": 0, "cpu": 0}
    real_item, real_cpu = torch.Tensor.item, torch.Tensor.cpu

    def item(self: torch.Tensor) -> Any:
        counts["item"] += 1
        return real_item(self)

    def cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counts["cpu"] += 1
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    metrics = update_split(opt).metrics(per_layer=True)
    assert metrics
    assert counts == {"item": 0, "cpu": 1}


def test_device_bias_scalars_match_host() -> None:
    ts, lr, betas = (1, 2, 50, 1000), 1e-3, (0.9, 0.999)
    steps = [torch.tensor(float(t)) for t in ts]
    stacked = torch.stack(steps)
    host = replay_host(stacked, lr, *betas)
    device = replay_device(stacked, lr, *betas)  # (CPU tensors here: the same float64 arithmetic)
    # (on a device they come back as one vector each: no 0-d tensor per parameter)
    assert isinstance(device[0], torch.Tensor) and device[0].shape == (len(steps),)
    # float64 on both sides: the two errors add up
    tol = [2 * bias_correction_rel(t, beta, U64)[which] for which, beta in enumerate(betas) for t in ts]
    for h, d, rel in zip(host[0] + host[1], [*device[0], *device[1]], tol, strict=True):
        assert float(d) == pytest.approx(h, rel=SAFETY * rel, abs=0)
    # a replay with lr in float32 (one float32 rounding of lr) would be caught
    wrong = replay_host(stacked, float(torch.tensor(lr, dtype=torch.float32)), *betas)
    assert float(device[0][0]) != pytest.approx(wrong[0][0], rel=SAFETY * tol[0], abs=0)
    # capturable Adam's float32 replay (beta and lr rounded to float32 too): the same up to float32 cancellation
    # in 1 - beta**t; the float64 side's error is negligible next to it
    capturable = replay_float32(stacked, lr, *betas)
    tol = [
        bias_correction_rel(t, beta, U32, U32)[which] + 2 * U32
        for which, beta in enumerate(betas)
        for t in ts
    ]
    for h, c, rel in zip(host[0] + host[1], [*capturable[0], *capturable[1]], tol, strict=True):
        assert float(c) == pytest.approx(h, rel=SAFETY * rel, abs=0)


def test_capturable_bias_corrections_replay_torch() -> None:
    """torch's capturable path computes 1 - beta**t in float32; the reconstruction must use the same numbers."""
    steps = [torch.tensor(1.0)]
    ss, bc2 = bias_corrections(steps, 1e-2, 0.9, 0.999, float32=True)
    bc1_t = torch._foreach_pow(0.9, steps)
    torch._foreach_sub_(bc1_t, 1)
    torch._foreach_div_(bc1_t, 1e-2)
    torch._foreach_reciprocal_(bc1_t)
    bc2_t = torch._foreach_pow(0.999, steps)
    torch._foreach_sub_(bc2_t, 1)
    torch._foreach_neg_(bc2_t)
    torch._foreach_sqrt_(bc2_t)
    assert torch.equal(-ss[0], bc1_t[0]) and torch.equal(bc2[0], bc2_t[0])


def test_low_precision_parameters() -> None:
    """bfloat16 weights and state: torch's arithmetic and storage round to 2^-8, which the bounds count."""
    model = make_model(torch.bfloat16)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)

    def closure() -> None:
        model(torch.randn(4, 8, dtype=torch.bfloat16)).float().sum().backward()

    record = snapshot_record(opt, 0, closure)
    split = update_split(opt)
    check_split(split, record)
    metrics = split.metrics()
    assert all(math.isfinite(v) for v in metrics.values())
    # bfloat16's 2^-8 per stored element still leaves a decay computed with lr off by 10 % outside the bound
    bound = reference_bounds(record)["adamw/decay/decay_norm"]
    want = reference_metrics(record)["adamw/decay/decay_norm"]
    assert (
        abs(metrics["adamw/decay/decay_norm"] - want)
        <= bound
        < abs(metrics["adamw/decay/decay_norm"] * 1.1 - want)
    )


def test_group_and_parameter_labels() -> None:
    model = make_model(torch.float64)
    # no "name", no "param_names": group{i} and group{i}.param{j}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    metrics = update_split(opt).metrics(per_layer=True)
    assert "adamw/group0/decay_norm" in metrics
    assert "adamw_layer/group0.param0/decay_norm" in metrics
    # two groups with the same name stay apart
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": params[:2], "name": "x"}, {"params": params[2:], "name": "x"}])
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    metrics = update_split(opt).metrics(per_layer=True)
    assert "adamw/x/decay_norm" in metrics and "adamw/x_1/decay_norm" in metrics
    # (their unnamed tensors take the unique group labels: no per-layer series is merged either)
    assert "adamw_layer/x.param0/decay_norm" in metrics and "adamw_layer/x_1.param0/decay_norm" in metrics


def test_adamw_update_split_on_groups_and_state() -> None:
    model = make_model(torch.float64)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    direct = adamw_update_split(opt.param_groups, opt.state, per_layer=True, steps_per_epoch=10)
    assert direct == update_split(opt, steps_per_epoch=10).metrics(per_layer=True)
    assert direct["adamw/decay/ema_timescale_epochs"] == pytest.approx(
        1.0 / (1e-2 * 0.1 * 10), rel=formula_rel(3), abs=0
    )


def test_derived_metric_formulas() -> None:
    lr, wd, beta1, numel = 1e-3, 0.05, 0.9, 1000
    metrics = derive_metrics(
        "adamw",
        [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, numel, 1, 0.0, 0.0],
        lr=lr,
        weight_decay=wd,
        beta1=beta1,
        steps_per_epoch=20,
    )
    # Kosson et al. (2023), AdamW: sqrt(2*lr*wd*(1-beta1)/(1+beta1)) and sqrt(lr*C/(2*wd))
    # (tolerances: roundings of each side, the literals 0.1 = 1 - 0.9 and 1.9 = 1 + 0.9 included)
    angle = math.sqrt(2 * lr * wd * 0.1 / 1.9)
    assert metrics["equilibrium_angular_update"] == pytest.approx(angle, rel=formula_rel(8), abs=0)
    assert metrics["equilibrium_weight_norm"] == pytest.approx(
        math.sqrt(lr * numel / (2 * wd)), rel=formula_rel(4), abs=0
    )
    assert metrics["ema_timescale_steps"] == pytest.approx(1 / (lr * wd), rel=formula_rel(2), abs=0)
    assert metrics["ema_timescale_epochs"] == pytest.approx(1 / (lr * wd * 20), rel=formula_rel(3), abs=0)
    without_momentum = derive_metrics(
        "adamw", [1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0], lr=lr, weight_decay=wd, beta1=0.0
    )
    angle = math.sqrt(2 * lr * wd)
    assert without_momentum["equilibrium_angular_update"] == pytest.approx(angle, rel=formula_rel(6), abs=0)
    no_decay = derive_metrics("adamw", [1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0], lr=lr, weight_decay=0.0)
    assert no_decay["decay_norm"] == 0.0 and "equilibrium_weight_norm" not in no_decay


def test_documented_metric_names_are_the_computed_ones() -> None:
    """The name tuples (copied into the docs) list exactly what each kind of group and tensor reports."""
    sums = [4.0, 1.0, 0.3, 4.5, 2.0, 0.1, 2, 0.5, 10, 1, 0.0, 0.0]  # (indexed by Col)
    full = derive_metrics("adamw", sums, lr=1e-2, weight_decay=0.1, beta1=0.9, steps_per_epoch=5)
    assert set(full) == set(us.ADAMW_GROUP_METRICS)
    layer = derive_metrics("adamw", sums, lr=1e-2, weight_decay=0.1, group_level=False)
    assert set(layer) == set(us.ADAMW_LAYER_METRICS)
    l2_layer = derive_metrics("adam_l2", sums, lr=1e-2, weight_decay=0.1, group_level=False)
    assert set(l2_layer) == set(us.ADAM_L2_LAYER_METRICS)
    assert set(derive_metrics("generic", sums, lr=1e-2, weight_decay=0.0)) == set(us.GENERIC_METRICS)
    model = make_model(torch.float64)
    opt = torch.optim.Adam(build_param_groups(model, 0.1), lr=1e-2)
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    group = next(g for g in update_split(opt).groups if g.kind == "adam_l2")
    assert set(group.metrics) == set(us.ADAM_L2_GROUP_METRICS)


def test_module_docstring_examples() -> None:
    failures, tried = doctest.testmod(us, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_packed_path_with_different_step_counts_per_tensor() -> None:
    """Tensors whose Adam `step` differs (one skipped steps without a gradient) share a packed bucket."""
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(16, 8, generator=gen)

        def closure(x: torch.Tensor = x, step: int = step) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()
            if step == 0:
                model[1].bias.grad = None  # this bias starts one step later than the rest

        record = snapshot_record(opt, step, closure)
        steps = {float(opt.state[p]["step"]) for p in model.parameters() if p in opt.state}
        if step > 0:
            assert len(steps) == 2
        check_split(update_split(opt), record)


def test_tensor_metrics_are_derived_on_demand() -> None:
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    split, _ = checked_step(model, opt, 0)
    fresh = update_split(opt)
    tensor = fresh.groups[0].tensors[0]
    assert tensor._metrics is None  # group metrics alone do not build the per-tensor dicts
    fresh.metrics()
    assert tensor._metrics is None
    layer = fresh.metrics(per_layer=True)
    assert tensor._metrics is not None and layer == split.metrics(per_layer=True)
    assert all(math.isfinite(v) for v in layer.values())


def test_functional_core_imports_no_lightning() -> None:
    """Functional core, Lightning shell: the grouping and update arithmetic load with torch alone, and neither
    they nor ``import lightning_adamw`` import Triton."""
    import subprocess
    import sys

    code = (
        "import sys, lightning_adamw, lightning_adamw.param_groups, lightning_adamw.update_split, "
        "lightning_adamw.update_split.backends, lightning_adamw.optim_checks, lightning_adamw.schedules\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'triton'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_reference_adam_step_replays_torch() -> None:
    """The package's one written-out Adam step (used by tests, benchmarks and examples) is torch's: AdamW and
    Adam + L2, amsgrad and maximize, on float64 tensors, within float64 rounding of torch's own step."""
    from lightning_adamw.update_split.backends.reference import adam_step

    for cls, kwargs in [
        (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
        (torch.optim.Adam, {"weight_decay": 0.1, "maximize": True}),
    ]:
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(50, dtype=torch.float64))
        opt = cls([w], lr=1e-2, foreach=False, **kwargs)
        mine = w.detach().clone()
        state: dict[str, Any] = {}
        for _ in range(3):
            g = torch.randn(50, dtype=torch.float64)
            w.grad = g.clone()
            mine = adam_step(mine, g, state, lr=1e-2, decoupled=cls is torch.optim.AdamW, **kwargs)
            opt.step()
        # a dozen float64 roundings per element on either side, relative to the step and the weights
        tol = 2 * SAFETY * gamma(16, U64) * (w.detach().abs() + 1e-2)
        assert ((mine - w.detach()).abs() <= tol).all(), cls.__name__
