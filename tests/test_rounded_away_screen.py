"""The CPU screen for rounded-away coordinates (``backends/rounded_away.py``) and the packed backend's kept
scratch buffers: both are only about speed, so each must give exactly the numbers of the path without it.

The inputs are built so that the computed change is known exactly: ``v = 1``, ``eps = 0``, ``s = 1`` and ``c = 0``
make :math:`\\Delta = m` in every backend (``k = 2/eps_s`` is a power of two), so ``R`` and ``RD`` can also be
checked against the contract's definition in float64 with no band: blocks that are safe, blocks with a lost
coordinate among safe ones, blocks where :math:`\\Delta = 0` (flagged, nothing lost), weights of exactly 0 and
subnormal weights, in float32 and bfloat16 storage, in one bucket.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import PlanCache
from lightning_adamw.update_split.backends import foreach, packed
from lightning_adamw.update_split.backends.packed import BLOCK, PackedLayout, adamw_item_sums, build_layout
from lightning_adamw.update_split.contract import SUM_COLUMNS, Col, TensorWork, half_ulp
from lightning_adamw.update_split.plan import Plan, plan_for
from lightning_adamw.update_split.scalars import step_scalars
from lightning_adamw.update_split.sums import sums_table

_R, _RD = (SUM_COLUMNS["adamw"].index(c) for c in (Col.R, Col.RD))


def _designed(
    storage: torch.dtype, blocks: int, lost_blocks: list[int], seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(w, delta)`` of ``blocks * BLOCK`` coordinates (``storage`` values): safe updates everywhere, except in
    ``lost_blocks``, which hold updates far under half an ulp, updates just over it, updates of exactly 0,
    weights of exactly 0 and subnormal weights."""
    gen = torch.Generator().manual_seed(seed)
    eps, tiny = torch.finfo(storage).eps, torch.finfo(storage).tiny
    w = torch.randn(blocks, BLOCK, generator=gen).to(storage).double()
    sign = torch.randint(0, 2, (blocks, BLOCK), generator=gen).double() * 2 - 1
    delta = w.abs() * (0.1 + torch.rand(blocks, BLOCK, generator=gen).double()) * sign  # safe: > 10 ulp
    for b in lost_blocks:
        row_w, row_d = w[b], delta[b]
        row_d[:100] = row_w[:100] * (eps / 8)  # rounded away
        row_d[100:200] = row_w[100:200] * (2 * eps)  # kept (over the threshold whatever the binade)
        row_d[200:220] = 0.0  # no update: never counted
        row_w[220:240] = 0.0  # a weight of exactly 0: half the subnormal spacing is the threshold
        row_d[220:230] = tiny * eps / 8  # rounded away
        row_d[230:240] = tiny * eps * 2  # kept
        row_w[240:260] = tiny * eps * 4  # subnormal weights (threshold: half the subnormal spacing too)
        row_d[240:250] = -tiny * eps / 4
        row_d[250:260] = tiny * eps
    w = w.to(storage)
    delta = delta.float().double()  # (representable in the float32 compute dtype: exact there)
    return w.reshape(-1), delta.reshape(-1)


def _definition(w: Tensor, delta: Tensor, storage: torch.dtype) -> tuple[float, float]:
    h = half_ulp(w.double(), storage)
    lost = (delta.abs() < h) & (delta != 0)
    return float(lost.sum()), float(delta[lost].square().sum())


def _work(w: Tensor, delta: Tensor, row: int = 0) -> TensorWork:
    p = w.reshape(-1, 256)  # a matrix: float32 compute dtype
    return TensorWork(
        row=row,
        weight=1.0,
        param=p,
        p=p.reshape(-1),
        compute_dtype=torch.float32,
        m=delta.float(),  # with v = 1, eps = 0, s = 1, c = 0: delta = m
        v=torch.ones(delta.numel()),
    )


CASES = {
    # storage, blocks, blocks with lost coordinates: none flagged / a few (tested one by one) / most (all tested)
    "fp32_none": (torch.float32, 64, []),
    "fp32_few": (torch.float32, 64, [3, 40]),
    "fp32_most": (torch.float32, 32, list(range(0, 32, 2))),
    "bf16_few": (torch.bfloat16, 64, [0, 63]),
    "bf16_all": (torch.bfloat16, 16, list(range(16))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_screen_gives_the_exact_test_s_numbers(name: str) -> None:
    storage, blocks, lost_blocks = CASES[name]
    w, delta = _designed(storage, blocks, lost_blocks)
    # two tensors, the second of one and a half blocks (padding), so a bucket holds a mix
    w2, d2 = _designed(storage, 2, [1] if lost_blocks else [], seed=1)
    items = [_work(w, delta, 0), _work(w2[: 3 * BLOCK // 2], d2[: 3 * BLOCK // 2], 1)]
    grads = [it.p for it in items]
    (bucket,) = build_layout(items, 1 << 20)
    layout = PackedLayout(buckets=[bucket], num_items=2)
    (buffers,) = layout.all_buffers()
    got = {}
    for screen in (False, True, True):  # (twice with the screen: reused buffers and the screen's state)
        bucket.screen = screen
        out = torch.zeros(2, len(SUM_COLUMNS["adamw"]), dtype=torch.float64)
        adamw_item_sums(bucket, 0.0, 1.0, 0.0, grads, out, buffers)
        got[screen] = out
    assert torch.equal(got[True], got[False])  # the screen changes nothing, bit for bit
    for j, (ww, dd) in enumerate([(w, delta), (w2[: 3 * BLOCK // 2], d2[: 3 * BLOCK // 2])]):
        count, squares = _definition(ww, dd, storage)
        assert float(got[True][j, _R]) == count
        # (float32 products of exact values, summed in blocks of BLOCK: the summation error only)
        assert abs(float(got[True][j, _RD]) - squares) <= 2 * BLOCK * 2**-24 * squares
    if lost_blocks:  # the designed lost coordinates are there (in float32 the subnormal updates are 0)
        assert float(got[True][0, _R]) >= (100 if storage == torch.float32 else 120) * len(lost_blocks)
    else:
        assert float(got[True][0, _R]) == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_foreach_screen_gives_the_exact_test_s_numbers(name: str) -> None:
    storage, blocks, lost_blocks = CASES[name]
    w, delta = _designed(storage, blocks, lost_blocks)
    w2, d2 = _designed(storage, 2, [], seed=1)  # a piece with nothing lost: not tested at all
    items = [_work(w, delta, 0), _work(w2, d2, 1)]
    pieces = [foreach.Piece(j, it, it.p) for j, it in enumerate(items)]
    params = [it.p.float() for it in items]
    b = [it.m for it in items]  # delta = b with c = 0
    screened = foreach._rounded_away(pieces, params, b, [0.0, 0.0], torch.float64, screen=True)
    every = foreach._rounded_away(pieces, params, b, [0.0, 0.0], torch.float64, screen=False)
    assert all(torch.equal(s, e) for s, e in zip(screened, every, strict=True))
    count, squares = _definition(w, delta, storage)
    assert float(screened[0][0]) == count
    assert abs(float(screened[1][0]) - squares) <= 2 * w.numel() * 2**-24 * squares
    assert float(screened[0][1]) == 0.0


def test_screen_passes_nan_to_the_exact_test() -> None:
    w, delta = _designed(torch.float32, 4, [])
    delta[5] = math.nan
    items = [_work(w, delta)]
    (bucket,) = build_layout(items, 1 << 20)
    outs = []
    for screen in (False, True):
        bucket.screen = screen
        out = torch.zeros(1, len(SUM_COLUMNS["adamw"]), dtype=torch.float64)
        adamw_item_sums(bucket, 0.0, 1.0, 0.0, [items[0].p], out)
        outs.append(out)
    # (the exact test makes RD NaN; a screen that let the NaN block through as safe would give 0)
    assert math.isnan(float(outs[0][0, _RD])) and math.isnan(float(outs[1][0, _RD]))
    assert float(outs[0][0, _R]) == float(outs[1][0, _R])


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 96), nn.LayerNorm(96), nn.ReLU(), nn.Linear(96, 40)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_kept_plan_gives_the_numbers_of_a_new_one_at_every_step(dtype: torch.dtype) -> None:
    """Real AdamW steps; at each, the sums of a plan kept since the first step (its scratch buffers shared by
    several buckets: a small chunk, and the screen's state from earlier steps) equal those of a new plan bit for
    bit. The lr changes over the steps, so that buckets go from many rounded-away coordinates to few and back."""
    model = _model(dtype)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def table(cache: PlanCache | None) -> tuple[torch.Tensor, Plan]:
        plan = plan_for(
            opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=1500,
            triton=False, backend="packed", cache=cache, key=opt,
        )  # fmt: skip
        return sums_table(plan, step_scalars(plan.works, opt.param_groups), None, None), plan

    cache = PlanCache()
    layouts, rounded = set(), []
    for lr in (1e-2, 1e-9, 1e-9, 1e-2, 1e-9):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        model(torch.randn(8, 16, generator=gen).to(dtype)).float().square().mean().backward()
        opt.step()
        got, plan = table(cache)
        layouts.add(id(plan.assignments[0].prepared))
        assert (
            len(plan.assignments[0].prepared.buckets) >= 3
        )  # buckets share one scratch tensor within a call
        assert torch.equal(got, table(None)[0]), lr
        rounded.append(float(got[:, Col.R].sum()) / float(got[:, Col.NUMEL].sum()))
    assert len(layouts) == 1  # one plan, kept from step to step
    # few coordinates rounded away at lr 1e-2 (none in float32), most at 1e-9: both regimes were run
    assert max(rounded[0], rounded[3]) < 0.1 and min(rounded[1], rounded[2], rounded[4]) > 0.5
    if dtype == torch.float32:
        assert rounded[0] == rounded[3] == 0.0


def test_buffers_are_not_kept_and_a_failed_call_leaves_none() -> None:
    """The scratch buffers live for one call only (held, they would add to every step's peak memory); a call
    that raises half-way leaves none behind either, and the next call gives the numbers of a new plan."""
    model = _model(torch.float32)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    plan = plan_for(
        opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=1500,
        triton=False, backend="packed", cache=None, key=None,
    )  # fmt: skip
    scalars = step_scalars(plan.works, opt.param_groups)
    want = sums_table(plan, scalars, None, None)
    layout = plan.assignments[0].prepared
    assert not layout.buffers
    real = packed.adamw_item_sums
    calls = []

    def failing(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("half-way")
        real(*args)  # type: ignore[arg-type]

    packed.adamw_item_sums = failing  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="half-way"):
            sums_table(plan, scalars, None, None)
    finally:
        packed.adamw_item_sums = real
    assert not layout.buffers
    assert torch.equal(sums_table(plan, scalars, None, None), want)
