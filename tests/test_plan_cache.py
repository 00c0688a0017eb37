"""The plan of a call and the caller-owned :class:`PlanCache`: reuse while nothing changed, a rebuild when it did,
the automatic choice of backends (``triton=``, ``LIGHTNING_ADAMW_TRITON``), and a backend that fails at run time
(a new plan without it, decided in the cache, one warning; the old plan untouched)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import PlanCache, update_split
from lightning_adamw.update_split import backends as backends_module
from lightning_adamw.update_split.plan import plan_for
from tests.helpers.monitor_reference import check_split, checked_step, snapshot_record
from tests.helpers.tolerance import formula_rel


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))


def test_plan_is_cached_and_follows_changes() -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    cache = PlanCache()
    checked_step(model, opt, 0, cache=cache)
    plan = cache.get(opt)
    assert plan is not None
    checked_step(model, opt, 1, cache=cache)
    assert cache.get(opt) is plan  # reused: same tensors, same state

    # optimizer state replaced (a checkpoint loaded): new state tensors, new plan, still exact
    opt.load_state_dict(opt.state_dict())
    checked_step(model, opt, 2, cache=cache)
    assert cache.get(opt) is not plan
    plan = cache.get(opt)

    # parameter storage swapped under the same Parameter (as FSDP1 does with `.data`)
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone()
    checked_step(model, opt, 3, cache=cache)
    assert cache.get(opt) is not plan
    plan = cache.get(opt)

    # an optimizer state tensor's storage swapped in place (same tensor object): the fused kernel reads raw
    # pointers, so this must rebuild too
    state = opt.state[model[0].weight]
    state["exp_avg"].data = state["exp_avg"].data.clone()
    checked_step(model, opt, 3, cache=cache)
    assert cache.get(opt) is not plan

    # a parameter without a gradient this step is left out, and counted again when it has one
    model[3].weight.requires_grad_(False)
    split, _ = checked_step(model, opt, 4, cache=cache)
    assert "3.weight" not in {t.name for g in split.groups for t in g.tensors}
    model[3].weight.requires_grad_(True)
    split, _ = checked_step(model, opt, 5, cache=cache)
    assert "3.weight" in {t.name for g in split.groups for t in g.tensors}


def test_without_a_cache_nothing_is_kept() -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    first, _ = checked_step(model, opt, 0)
    second = update_split(opt)
    assert first.metrics(per_layer=True) == second.metrics(per_layer=True)  # (the same arithmetic, twice)
    cache = PlanCache()
    assert update_split(opt, cache=cache).metrics(per_layer=True) == first.metrics(per_layer=True)
    assert opt in cache and len(cache.failed) == 0


def test_cached_plan_reads_each_steps_scalars() -> None:
    """lr and weight decay change every step under a scheduler; the cached plan must not keep old ones."""
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cache = PlanCache()
    for step in range(4):
        opt.param_groups[0]["weight_decay"] = 0.1 * (step + 1)
        split, _ = checked_step(model, opt, step, cache=cache)
        decay = next(g for g in split.groups if g.name == "decay")
        # (the same float64 expressions evaluated twice: equal up to their own 1-3 roundings)
        assert decay.lr == pytest.approx(1e-2 / (1 + step), rel=formula_rel(2), abs=0)
        assert decay.weight_decay == pytest.approx(0.1 * (step + 1), rel=formula_rel(1), abs=0)
        timescale = 1.0 / (decay.lr * decay.weight_decay)
        assert decay.metrics["ema_timescale_steps"] == pytest.approx(timescale, rel=formula_rel(2), abs=0)
        sched.step()


def test_non_contiguous_parameter_is_not_cached_stale() -> None:
    """A transposed parameter's flat view is a copy: the plan must not keep it from one step to the next."""
    torch.manual_seed(0)
    model = _model()
    model[0].weight = nn.Parameter(torch.randn(8, 32).t())  # (32, 8), not contiguous
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    cache = PlanCache()
    for step in range(3):
        checked_step(model, opt, step, cache=cache)
    assert opt not in cache


def _backends(opt: torch.optim.Optimizer, **kwargs: Any) -> set[str]:
    args: dict[str, Any] = {
        "snapshot": None,
        "reduce": None,
        "chunk_numel": None,
        "triton": True,
        "backend": None,
    }
    plan = plan_for(opt.param_groups, opt.state, adam_family=True, cache=None, key=None, **{**args, **kwargs})
    return {a.backend for a in plan.assignments}


def test_the_dispatch_table_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamW groups: triton where it runs (CUDA), else numba (CPU, Numba installed), else packed; Adam + L2
    groups: foreach. ``triton=False`` and ``LIGHTNING_ADAMW_TRITON=0`` take the Triton kernel out of the choice,
    ``LIGHTNING_ADAMW_NUMBA=0`` the Numba one."""
    model = _model()
    adamw = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    adam = torch.optim.Adam(build_param_groups(model, 0.1), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    adamw.step()
    adam.step()
    cpu = "numba" if backends_module.numba.available() else "packed"
    auto = "triton" if backends_module.triton.available(torch.device("cpu")) else cpu
    assert _backends(adamw) == {auto}
    assert _backends(adam) == {"foreach", auto}  # coupled decay group, no-decay group (AdamW at wd = 0)
    assert _backends(adamw, triton=False) == {cpu}
    monkeypatch.setenv("LIGHTNING_ADAMW_TRITON", "0")
    assert _backends(adamw) == {cpu}
    monkeypatch.setenv("LIGHTNING_ADAMW_NUMBA", "0")
    assert _backends(adamw) == {"packed"}
    assert _backends(adamw, backend="reference") == {"reference"}


class _Broken:
    """A fallible backend that fails at run time, as a Triton that cannot compile or launch does."""

    name = "broken"
    kinds = frozenset({"adamw"})
    partial_terms = None
    fallible = True

    def __init__(self) -> None:
        self.calls = 0

    def accepts(self, item: Any) -> bool:
        return True

    def prepare(self, items: Any, chunk_numel: int | None) -> None:
        return None

    def add_sums(self, prepared: Any, request: Any, tables: Any) -> None:
        self.calls += 1
        raise RuntimeError("no compiler here")


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> _Broken:
    backend = _Broken()
    monkeypatch.setitem(backends_module.BACKENDS, "broken", backend)
    monkeypatch.setitem(backends_module.DISPATCH, "adamw", ("broken", "packed"))
    return backend


def test_a_failing_backend_rebuilds_the_plan_and_warns_once(broken: _Broken) -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    cache = PlanCache()
    record = snapshot_record(opt, 0, lambda: model(torch.randn(4, 8)).square().mean().backward())
    plan = plan_for(
        opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=None,
        triton=True, backend=None, cache=cache, key=opt,
    )  # fmt: skip
    assert cache.get(opt) is plan and {a.backend for a in plan.assignments} == {"broken"}
    with pytest.warns(RuntimeWarning, match="broken backend failed.*no compiler here"):
        split = update_split(opt, cache=cache)
    check_split(split, record)  # the next backend's numbers
    assert set(cache.failed) == {"broken"}
    rebuilt = cache.get(opt)
    assert rebuilt is not plan and {a.backend for a in rebuilt.assignments} == {"packed"}
    assert {a.backend for a in plan.assignments} == {"broken"}  # the failed plan was not changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no new warning, no new attempt
        check_split(update_split(opt, cache=cache), record)
    assert broken.calls == 1
    # a forced backend is not replaced behind the caller's back
    with pytest.raises(RuntimeError, match="no compiler here"):
        update_split(opt, backend="broken")


def test_a_failing_backend_without_a_cache_still_gives_the_numbers(broken: _Broken) -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    record = snapshot_record(opt, 0, lambda: model(torch.randn(4, 8)).square().mean().backward())
    with pytest.warns(RuntimeWarning, match="broken backend failed"):
        split = update_split(opt)
    check_split(split, record)
    assert all(math.isfinite(v) for v in split.metrics().values())


def test_a_pickled_cache_keeps_its_failures_and_no_plan() -> None:
    """A callback sent to spawned processes (``ddp_spawn``) is pickled: its cache takes no plan along (plans hold
    this process's tensors), but keeps the backends that failed."""
    import pickle

    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    cache = PlanCache()
    checked_step(model, opt, 0, cache=cache)
    cache.failed["triton"] = "RuntimeError('no compiler here')"
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.failed == cache.failed and opt not in copy and opt in cache
