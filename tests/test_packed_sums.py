"""The ``packed`` backend (AdamW groups on a CPU): its layout, its sums against float64 references of the same
inputs, and its path through real optimizer steps (compared with parameter snapshots).

The comparison with the other backends on whole optimizer states is ``tests/test_backends.py``; the plan cache is
``tests/test_plan_cache.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import PlanCache, update_split
from lightning_adamw.update_split.backends.packed import BLOCK, adamw_item_sums, build_layout
from lightning_adamw.update_split.contract import SUM_COLUMNS, Col, TensorWork, compute_dtype
from lightning_adamw.update_split.plan import plan_for
from lightning_adamw.update_split.scalars import step_scalars
from tests.helpers import adamw_sums
from tests.helpers.monitor_bounds import bias_correction_rel
from tests.helpers.monitor_reference import (
    checked_step,
    compare_metrics,
    reference_bounds,
    reference_metrics,
)
from tests.helpers.tolerance import formula_rel, unit_roundoff

U32 = unit_roundoff(torch.float32)
#: adamw_item_sums' output columns are SUM_COLUMNS["adamw"]: N, B and E unscaled, S, G, R, RD
WIDTH = len(SUM_COLUMNS["adamw"])
#: ... of which these, in the order of adamw_sums.COLUMNS (xx, wx, s, ww)
AS_ADAMW_SUMS = [SUM_COLUMNS["adamw"].index(c) for c in (Col.B, Col.E, Col.S, Col.N)]


def _items(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[TensorWork]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen).to(dtype)
        m = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
        v = (torch.rand(shape, generator=gen) * 1e-4).to(dtype)
        out.append(
            TensorWork(
                row=j,
                weight=1.0,
                param=p,
                p=p.reshape(-1),
                compute_dtype=compute_dtype(shape, dtype, p.device),
                m=m.reshape(-1),
                v=v.reshape(-1),
            )
        )
    return out


def _check_against_float64(
    out: torch.Tensor, items: list[TensorWork], eps: list[float], scale: list[float]
) -> None:
    """Each item's four sums within their derived bounds of the float64 sums of the same inputs, and a sum
    missing its largest term outside them (the bounds are tight enough to see a wrong sum)."""
    for j, it in enumerate(items):
        ref = adamw_sums.reference(it.p, it.m, it.v, eps[j], scale[j])
        # blocks of BLOCK elements summed in the compute dtype (the dtype rule); block sums added in float64
        bound = adamw_sums.bounds(
            ref, adamw_sums.PACKED, it.compute_dtype, inner_terms=BLOCK, outer_terms=it.p.numel() + 2
        )
        got = out[j, AS_ADAMW_SUMS].tolist()
        for column, g, want, b in zip(adamw_sums.COLUMNS, got, ref.sums, bound, strict=True):
            assert abs(g - want) <= b, (j, column, g, want, b)
        for column, g, wrong, b in zip(
            adamw_sums.COLUMNS, got, adamw_sums.without_largest(ref), bound, strict=True
        ):
            if ref.numel > 0:
                assert abs(g - wrong) > b, (j, column, "a sum missing its largest term passes", g, wrong, b)


SHAPES = [(300, 7), (1000,), (5,), (64, 64), (1,), (BLOCK,), (3, BLOCK + 1), (0,), (17,)]


@pytest.mark.parametrize("chunk", [64, 700, 5000, 1 << 20])
def test_layout_covers_every_element_once_within_the_chunk(chunk: int) -> None:
    items = _items(SHAPES)
    buckets = build_layout(items, chunk)
    covered = [0] * len(items)
    for b in buckets:
        sizes = b.split_sizes[0::2]
        assert sum(sizes) <= chunk  # the extra memory bound: never an overfilled bucket
        assert b.padded_numel % BLOCK == 0 and b.padded_numel == sum(b.split_sizes)
        assert b.block_item_index.numel() == b.padded_numel // BLOCK
        for j, size in zip(b.piece_item, sizes, strict=True):
            covered[j] += size
        # every piece of a bucket has the compute dtype the dtype rule gives its tensor
        assert {items[j].compute_dtype for j in b.piece_item} == {b.compute_dtype}
    assert covered == [it.p.numel() for it in items]
    assert {b.compute_dtype for b in buckets} == {torch.float32, torch.float64}


@pytest.mark.parametrize("chunk", [64, 700, 1 << 20])
@pytest.mark.parametrize("uniform", [True, False], ids=["same_step", "steps_differ"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_item_sums_match_float64(chunk: int, uniform: bool, dtype: torch.dtype) -> None:
    items = _items(SHAPES, dtype)
    eps = [0.03e-8 if uniform else (0.01 + 0.001 * j) * 1e-8 for j in range(len(items))]
    scale = [1e-3 if uniform else 1e-3 * (1 + 0.1 * j) for j in range(len(items))]
    out = torch.zeros(len(items), WIDTH, dtype=torch.float64)
    eps_arg = eps[0] if uniform else torch.tensor(eps, dtype=torch.float64)
    scale_arg = scale[0] if uniform else torch.tensor(scale, dtype=torch.float64)
    for b in build_layout(items, chunk):
        adamw_item_sums(b, eps_arg, scale_arg, 0.0, [it.p for it in items], out)
    _check_against_float64(out, items, eps, scale)


def test_device_scalars_and_zero_eps() -> None:
    """Per-item vectors of scalars (as capturable / fused accelerator optimizers give) and eps = 0 (the padding
    must not divide 0/0)."""
    items = _items(SHAPES[:4])
    out_t = torch.zeros(4, WIDTH, dtype=torch.float64)
    out_f = torch.zeros(4, WIDTH, dtype=torch.float64)
    grads = [it.p for it in items]
    for b in build_layout(items, 900):
        adamw_item_sums(b, torch.zeros(4), torch.full((4,), 2e-3), torch.zeros(4), grads, out_t)
        adamw_item_sums(b, 0.0, 2e-3, 0.0, grads, out_f)
    assert torch.isfinite(out_t).all()
    # (the vector holds 2e-3 rounded to float32: that is the input the sums of out_t are of)
    _check_against_float64(out_t, items, [0.0] * 4, [float(torch.tensor(2e-3, dtype=torch.float32))] * 4)
    _check_against_float64(out_f, items, [0.0] * 4, [2e-3] * 4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))


def test_device_scalar_path_agrees_with_host_path() -> None:
    """Capturable / fused accelerator optimizers keep ``step`` on the device: the bias corrections are then
    float32 tensors, handled as vectors. Flagging a CPU optimizer capturable after its step takes that path on
    the CPU; it must agree with the host path up to the float32 corrections (and keep the plan)."""
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    cache = PlanCache()
    checked_step(model, opt, 0, cache=cache)
    # (from step 1 on: at step 0 the zero-initialised bias is restored to 0 only with the corrections the step
    # really used, and this optimizer used float64 ones)
    host_split, record = checked_step(model, opt, 1, cache=cache)
    host = host_split.metrics(per_layer=True)
    plan = cache.get(opt)
    for group in opt.param_groups:
        group["capturable"] = True
    assert all(isinstance(s.step_size, torch.Tensor) for s in step_scalars(plan.works, opt.param_groups))
    device = update_split(opt, cache=cache).metrics(per_layer=True)
    assert cache.get(opt) is plan
    assert set(device) == set(host)
    # float32 bias corrections (step 2): lr*u carries their relative error on top of the usual ones
    step_size, bc2 = (bias_correction_rel(2.0, beta, U32, U32) for beta in (0.9, 0.999))
    bounds = reference_bounds(record, eta_rel=step_size[0] + bc2[1])
    assert compare_metrics(device, reference_metrics(record), bounds) == {}
    # (grad_to_weight and the rounded-away shares read w_old / the update too: checked against snapshots in
    # tests/test_grad_and_rounding.py)
    from_the_step = ("grad_to_weight", "rounded_away_fraction", "rounded_away_sq_norm_fraction")
    for key, value in host.items():  # (hyperparameter-only metrics and grad_norm: the same expressions)
        if key not in bounds and not key.endswith(from_the_step):
            assert device[key] == pytest.approx(value, rel=formula_rel(4), abs=0), key


def _packed_layout(opt: torch.optim.Optimizer) -> Any:
    plan = plan_for(
        opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=None,
        triton=False, backend="packed", cache=None, key=None,
    )  # fmt: skip
    (assignment,) = plan.assignments
    assert assignment.backend == "packed"
    return assignment


def test_groups_share_one_layout_and_vector_shaped_tensors_get_float64_buckets() -> None:
    small = _model()
    opt = torch.optim.AdamW(build_param_groups(small, 0.1), lr=1e-2)
    checked_step(small, opt, 0)
    assignment = _packed_layout(opt)
    assert len(assignment.parts) == 2  # decay and no_decay groups, one layout
    buckets = assignment.prepared.buckets
    assert sorted(str(b.compute_dtype) for b in buckets) == ["torch.float32", "torch.float64"]

    torch.manual_seed(0)
    large = nn.Sequential(nn.Linear(1100, 1000), nn.LayerNorm(1000))
    opt = torch.optim.AdamW(build_param_groups(large, 0.1), lr=1e-3)
    large(torch.randn(4, 1100)).square().mean().backward()
    opt.step()
    by_dtype: dict[torch.dtype, int] = {}
    for b in _packed_layout(opt).prepared.buckets:
        by_dtype[b.compute_dtype] = by_dtype.get(b.compute_dtype, 0) + sum(b.split_sizes[0::2])
    assert by_dtype == {torch.float32: 1100 * 1000, torch.float64: 3 * 1000}
