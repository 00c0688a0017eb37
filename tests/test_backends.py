"""Every backend against the float64 ``reference`` backend, on the same optimizer states, under one contract.

For each case (real optimizer steps on a small model: fp32, bf16, fp64, amsgrad, maximize, tensors whose step
counts differ, replica-weighted shards, device-side bias corrections, small chunks, Adam + coupled L2, an
optimizer without Adam state) and each backend that sums its kinds of groups, the whole sums table is compared,
row by row and column by column, with the reference's, each entry within the error bound derived from the
contract's arithmetic (``tests/helpers/backend_bounds.py``): the compute dtype the dtype rule gives the tensor,
the backend's partial-sum length and its roundings. The ``triton`` backend runs natively on CUDA, and under
Triton's interpreter in the child pytest of ``tests/test_triton_sums.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import ShardReduce, take_snapshot
from lightning_adamw.update_split.backends import BACKENDS, triton
from lightning_adamw.update_split.contract import NUM_COLUMNS, SUM_COLUMNS, Col, compute_dtype
from lightning_adamw.update_split.plan import Plan, plan_for
from lightning_adamw.update_split.scalars import step_scalars
from lightning_adamw.update_split.state import current_grads
from lightning_adamw.update_split.sums import sums_table
from tests.helpers.backend_bounds import ARITHMETIC, row_bounds, row_terms
from tests.helpers.tolerance import unit_roundoff

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNS = triton.available(DEVICE)


@dataclass
class Case:
    """An optimizer after real steps, and how to split it."""

    optimizer: torch.optim.Optimizer
    adam_family: bool = True
    reduce: ShardReduce | None = None
    chunk_numel: int | None = None
    snapshot: dict[torch.Tensor, torch.Tensor] | None = None


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # (64 x 300: more than one Triton program and many packed blocks; biases and gains: float64 by the rule)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 300), nn.Linear(300, 3)
    )
    nn.init.zeros_(model[0].bias)  # a weight that was 0 before its first step
    return model.to(DEVICE, dtype)


def _train(
    optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    dtype: torch.dtype = torch.float32,
    steps: int = 3,
    skip_first: bool = False,
    snapshot: bool = False,
) -> tuple[torch.optim.Optimizer, dict[torch.Tensor, torch.Tensor] | None]:
    model = _model(dtype)
    opt = optimizer_factory(build_param_groups(model, 0.1))
    gen = torch.Generator().manual_seed(1)
    snap = None
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=gen).to(DEVICE, dtype)).float().square().mean().backward()
        if skip_first and step == 0:
            model[3].bias.grad = None  # this bias starts a step later: its step count differs
        if snapshot and step == steps - 1:
            snap = take_snapshot(opt)
        opt.step()
    return opt, snap


def _adamw(**kwargs: Any) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    return lambda groups: torch.optim.AdamW(groups, lr=1e-2, **kwargs)


def _device_scalars() -> Case:
    opt, _ = _train(_adamw())
    for group in opt.param_groups:  # corrections as float32 vectors (capturable / fused CUDA optimizers)
        group["capturable"] = True
    return Case(opt)


def _sharded() -> Case:
    opt, _ = _train(_adamw())
    # a single process standing in for ranks: 1-D tensors replicated on 2 ranks, matrices on 3
    reduce = ShardReduce(all_reduce=lambda t, op: None, weight=lambda p: 0.5 if p.dim() == 1 else 1.0 / 3.0)
    return Case(opt, reduce=reduce)


def _generic() -> Case:
    opt, snap = _train(lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9), snapshot=True)
    return Case(opt, adam_family=False, snapshot=snap)


CASES: dict[str, Callable[[], Case]] = {
    "fp32": lambda: Case(_train(_adamw(foreach=True))[0]),
    "bf16": lambda: Case(_train(_adamw(), dtype=torch.bfloat16)[0]),
    "fp64": lambda: Case(_train(_adamw(), dtype=torch.float64)[0]),
    "fp16": lambda: Case(_train(_adamw(eps=1e-4), dtype=torch.float16)[0]),
    "amsgrad": lambda: Case(_train(_adamw(amsgrad=True))[0]),
    "maximize": lambda: Case(_train(_adamw(maximize=True))[0]),
    "mixed_steps": lambda: Case(_train(_adamw(), skip_first=True)[0]),
    "sharded_weights": _sharded,
    "device_scalars": _device_scalars,
    "small_chunks": lambda: Case(_train(_adamw())[0], chunk_numel=1000),
    # updates of about 3e-9 on weights of about 0.1: float32 rounds some of them away (R, RD between 0 and all)
    "fp32_tiny_lr": lambda: Case(_train(lambda g: torch.optim.AdamW(g, lr=3e-9))[0]),
    "coupled_l2": lambda: Case(_train(lambda g: torch.optim.Adam(g, lr=1e-2))[0]),
    "coupled_l2_amsgrad_maximize": lambda: Case(
        _train(lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True, maximize=True), dtype=torch.float64)[0]
    ),
    "generic_sgd": _generic,
}
_BUILT: dict[str, Case] = {}


def _case(name: str) -> Case:
    if name not in _BUILT:  # built once per process, shared by the backends
        _BUILT[name] = CASES[name]()
    return _BUILT[name]


def _kinds_of(name: str) -> set[str]:
    """The kinds of groups of a case (build_param_groups' no-decay group is AdamW even under Adam + L2)."""
    if name == "generic_sgd":
        return {"generic"}
    if name.startswith("coupled_l2"):
        return {"adam_l2", "adamw"}
    return {"adamw"}


PAIRS = [
    pytest.param(
        backend,
        case,
        id=f"{backend}-{case}",
        marks=[pytest.mark.skipif(not TRITON_RUNS, reason="triton: on CUDA, or under TRITON_INTERPRET=1")]
        if backend == "triton"
        else [],
    )
    for backend in ("foreach", "packed", "numba", "triton")
    for case in CASES
    if _kinds_of(case) <= BACKENDS[backend].kinds
]


def _table(case: Case, backend: str) -> tuple[torch.Tensor, Plan]:
    opt = case.optimizer
    snapshot = (
        None if case.snapshot is None else {p: t.clone() for p, t in case.snapshot.items()}
    )  # (scratch)
    plan = plan_for(
        opt.param_groups,
        opt.state,
        adam_family=case.adam_family,
        snapshot=snapshot,
        reduce=case.reduce,
        chunk_numel=case.chunk_numel,
        triton=True,
        backend=backend,
        cache=None,
        key=None,
    )
    assert {a.backend for a in plan.assignments} == {backend}
    table = sums_table(plan, step_scalars(plan.works, opt.param_groups), case.reduce, None)
    return table.cpu(), plan


@pytest.mark.parametrize(("backend", "case_name"), PAIRS)
def test_backend_matches_the_reference(backend: str, case_name: str) -> None:
    case = _case(case_name)
    got, plan = _table(case, backend)
    want, _ = _table(case, "reference")
    assert got.shape == want.shape == (plan.num_rows, NUM_COLUMNS)
    # the constant columns come from the plan, the same for every backend
    assert torch.equal(got[:, [Col.NUMEL, Col.COUNT]], want[:, [Col.NUMEL, Col.COUNT]])
    scalars = step_scalars(plan.works, case.optimizer.param_groups)
    arithmetic = ARITHMETIC[backend]
    partial = BACKENDS[backend].partial_terms
    checked = rounded_rows = 0
    for work, sc in zip(plan.works, scalars, strict=True):
        grads = current_grads(work.items)
        step_size = (
            list(sc.step_size.unbind(0)) if isinstance(sc.step_size, torch.Tensor) else list(sc.step_size)
        )
        bc2 = list(sc.bc2_sqrt.unbind(0)) if isinstance(sc.bc2_sqrt, torch.Tensor) else list(sc.bc2_sqrt)
        for j, item in enumerate(work.items):
            terms = row_terms(
                work.kind,
                item,
                sc,
                step_size[j] if step_size else 0.0,
                bc2[j] if bc2 else 1.0,
                grads[j],
            )
            bounds = row_bounds(terms, arithmetic, item.compute_dtype, partial, item.weight)
            for col in SUM_COLUMNS[work.kind]:
                g, w = float(got[item.row, col]), float(want[item.row, col])
                assert abs(g - w) <= bounds[col], (work.label, item.row, col.name, g, w, bounds[col])
                checked += 1
                blocked = partial is not None or item.compute_dtype == torch.float64
                if blocked and col in (Col.N, Col.G) and terms.largest[col] > 0:
                    # tight enough to reject a sum that lost its largest term (a float32 sum of a whole tensor's
                    # terms, foreach's, has the worst-case bound gamma_n: looser than one of 10^4 terms; Adam's b
                    # are too even in size for B to tell)
                    assert bounds[col] < item.weight * terms.largest[col], (work.label, item.row, col.name)
            if col_r_checked := (Col.R in SUM_COLUMNS[work.kind] and float(want[item.row, Col.R]) >= 100):
                # the band of either-way coordinates is a small share of those rounded away
                assert bounds[Col.R] <= 0.1 * float(want[item.row, Col.R]), (work.label, item.row)
            rounded_rows += col_r_checked
            # columns of other kinds stay 0
            others = [c for c in Col if c not in SUM_COLUMNS[work.kind] and c not in (Col.NUMEL, Col.COUNT)]
            assert float(got[item.row, others].abs().sum()) == 0.0
    assert checked >= 4 * 7
    if case_name == "fp32_tiny_lr":  # storage rounds updates away: R and RD are really tested
        assert rounded_rows >= 2


@pytest.mark.parametrize("case_name", ["fp32", "bf16", "coupled_l2"])
def test_the_bounds_see_a_float64_tensor_summed_in_float32(case_name: str) -> None:
    """The dtype rule is checked by the bounds: for every tensor the rule puts in float64 (biases, gains),
    products formed in float32 instead fall outside the float64 bound in some column. So a backend that does not
    follow the rule fails :func:`test_backend_matches_the_reference`."""
    case = _case(case_name)
    _, plan = _table(case, "reference")
    scalars = step_scalars(plan.works, case.optimizer.param_groups)
    exact = 0
    for work, sc in zip(plan.works, scalars, strict=True):
        for j, item in enumerate(work.items):
            if item.compute_dtype != torch.float64:
                continue
            exact += 1
            step_size, bc2 = sc.step_size[j], sc.bc2_sqrt[j]
            grad = current_grads([item])[0]
            terms = row_terms(work.kind, item, sc, step_size, bc2, grad)
            bounds = row_bounds(terms, ARITHMETIC["packed"], torch.float64, None)
            w, b = terms.vectors["w"], terms.vectors["b"]
            w32, b32 = w.float(), b.float()
            float32 = {Col.B: (b32 * b32).double().sum(), Col.E: (w32 * b32).double().sum()}
            exact64 = {Col.B: (b * b).sum(), Col.E: (w * b).sum()}
            assert any(abs(float(float32[c] - exact64[c])) > bounds[c] for c in float32), (work.label, j)
    assert exact >= 4


def test_the_dtype_rule() -> None:
    cpu, mps = torch.device("cpu"), torch.device("mps")
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    # biases, gains, scalars and vector-shaped gains (LayerScale (C, 1, 1), GRN (1, 1, 1, C)): float64
    for shape in [(16,), (), (1,), (64, 1, 1), (1, 1, 1, 64), (0,)]:
        assert compute_dtype(shape, f32, cpu) == f64, shape
        assert compute_dtype(shape, bf16, cpu) == f64, shape
    # matrices and kernels: float32, whatever the parameters' own dtype (half precision converts exactly)
    for shape in [(16, 8), (3, 3, 2, 2), (2, 300)]:
        assert compute_dtype(shape, f32, cpu) == f32
        assert compute_dtype(shape, bf16, cpu) == f32
        assert compute_dtype(shape, f64, cpu) == f64  # float64 parameters stay float64
    assert compute_dtype((16,), f32, mps) == f32  # no float64 on MPS
    # one unit roundoff apart: the bound of test_backend_matches_the_reference tells them apart
    assert unit_roundoff(f32) / unit_roundoff(f64) == 2.0**29


def test_forced_backends_refuse_what_they_cannot_take() -> None:
    case = _case("coupled_l2")
    with pytest.raises(ValueError, match="backend='packed' sums only"):
        _table(case, "packed")
    with pytest.raises(ValueError, match="unknown backend"):
        _table(case, "numpy")
    if not TRITON_RUNS:
        with pytest.raises(ValueError, match="no backend of \\['triton'\\] takes tensor"):
            _table(_case("fp32"), "triton")


def test_triton_is_not_imported_until_it_runs() -> None:
    """``import lightning_adamw`` imports neither Triton nor Lightning; on a CPU the kernel module stays unloaded.

    (torch itself may import Triton during a backward pass, so the call is checked on the kernel module.)"""
    import subprocess
    import sys

    code = (
        "import sys, torch, lightning_adamw, lightning_adamw.update_split\n"
        "assert 'triton' not in sys.modules and 'lightning' not in sys.modules\n"
        "m = torch.nn.Linear(4, 2); o = torch.optim.AdamW(m.parameters(), weight_decay=0.1)\n"
        "m(torch.randn(3, 4)).sum().backward(); o.step()\n"
        "lightning_adamw.update_split.update_split(o).metrics()\n"
        "assert 'lightning_adamw.update_split.backends._triton_kernel' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
