"""The packed fast path of AdamW groups: layout, sums against float64 references, and the per-optimizer plan cache."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adamw.update_split as us
from lightning_adamw.packed_sums import BLOCK, PieceSource, adamw_item_sums, build_layout
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import update_split
from tests.helpers import adamw_sums
from tests.scripts.monitor_common import compare_metrics, reference_bounds, reference_metrics
from tests.test_update_split import U32, bias_correction_rel, check_split, formula_rel, snapshot_record


def _sources(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[PieceSource]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen).to(dtype)
        m = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
        v = (torch.rand(shape, generator=gen) * 1e-4).to(dtype)
        out.append(
            PieceSource(item=j, p=p.reshape(-1), m=m.reshape(-1), v=v.reshape(-1), exact=len(shape) <= 1)
        )
    return out


def _check_against_float64(
    out: torch.Tensor, sources: list[PieceSource], eps: list[float], scale: list[float]
) -> None:
    """Each item's four sums within their derived bounds of the float64 sums of the same inputs, and a sum
    missing its largest term outside them (the bounds are tight enough to see a wrong sum)."""
    for j, src in enumerate(sources):
        ref = adamw_sums.reference(src.p, src.m, src.v, eps[j], scale[j])
        compute = torch.float64 if src.exact or src.p.dtype == torch.float64 else torch.float32
        # blocks of BLOCK elements summed in the compute dtype; block sums (and buckets) added in float64
        bound = adamw_sums.bounds(
            ref, adamw_sums.PACKED, compute, inner_terms=BLOCK, outer_terms=src.p.numel() + 2
        )
        # (out's columns are [sum X^2, sum w*X, sum (w + s*X)^2, sum w^2], the order of adamw_sums.COLUMNS)
        got = out[j].tolist()
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
    sources = _sources(SHAPES)
    buckets = build_layout(sources, chunk)
    covered = [0] * len(sources)
    for b in buckets:
        sizes = b.split_sizes[0::2]
        assert sum(sizes) <= chunk  # the extra memory bound: never an overfilled bucket
        assert b.padded_numel % BLOCK == 0 and b.padded_numel == sum(b.split_sizes)
        assert b.block_item_index.numel() == b.padded_numel // BLOCK
        for j, size in zip(b.piece_item, sizes, strict=True):
            covered[j] += size
        # exact (float64) pieces and the others never share a bucket
        assert b.compute_dtype == (
            torch.float64 if all(sources[j].exact for j in b.piece_item) else torch.float32
        )
    assert covered == [s.p.numel() for s in sources]


@pytest.mark.parametrize("chunk", [64, 700, 1 << 20])
@pytest.mark.parametrize("uniform", [True, False], ids=["same_step", "steps_differ"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_item_sums_match_float64(chunk: int, uniform: bool, dtype: torch.dtype) -> None:
    sources = _sources(SHAPES, dtype)
    eps = [0.03e-8 if uniform else (0.01 + 0.001 * j) * 1e-8 for j in range(len(sources))]
    scale = [1e-3 if uniform else 1e-3 * (1 + 0.1 * j) for j in range(len(sources))]
    out = torch.zeros(len(sources), 4, dtype=torch.float64)
    eps_arg = eps[0] if uniform else torch.tensor(eps, dtype=torch.float64)
    scale_arg = scale[0] if uniform else torch.tensor(scale, dtype=torch.float64)
    for b in build_layout(sources, chunk):
        adamw_item_sums(b, eps_arg, scale_arg, out)
    _check_against_float64(out, sources, eps, scale)


def test_device_scalars_and_zero_eps() -> None:
    """Per-item vectors of scalars (as capturable / fused accelerator optimizers give) and eps = 0 (the padding
    must not divide 0/0)."""
    sources = _sources(SHAPES[:4])
    out_t = torch.zeros(4, 4, dtype=torch.float64)
    out_f = torch.zeros(4, 4, dtype=torch.float64)
    for b in build_layout(sources, 900):
        adamw_item_sums(b, torch.zeros(4), torch.full((4,), 2e-3), out_t)
        adamw_item_sums(b, 0.0, 2e-3, out_f)
    assert torch.isfinite(out_t).all()
    # (the vector holds 2e-3 rounded to float32: that is the input the sums of out_t are of)
    _check_against_float64(out_t, sources, [0.0] * 4, [float(torch.tensor(2e-3, dtype=torch.float32))] * 4)
    _check_against_float64(out_f, sources, [0.0] * 4, [2e-3] * 4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, **kwargs: Any
) -> tuple[us.UpdateSplit, Any]:
    """One real step with snapshots around it; the split checked against them (derived bounds)."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))

    def closure() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()

    record = snapshot_record(opt, step, closure)
    split = update_split(opt, **kwargs)
    check_split(split, record)
    return split, record


def _step_and_check(model: nn.Module, opt: torch.optim.Optimizer, step: int, **kwargs: Any) -> us.UpdateSplit:
    return _step(model, opt, step, **kwargs)[0]


def test_plan_is_cached_and_follows_changes() -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    _step_and_check(model, opt, 0)
    plan = us._PLANS[opt]
    _step_and_check(model, opt, 1)
    assert us._PLANS[opt] is plan  # reused: same tensors, same state

    # optimizer state replaced (a checkpoint loaded): new state tensors, new plan, still exact
    opt.load_state_dict(opt.state_dict())
    _step_and_check(model, opt, 2)
    assert us._PLANS[opt] is not plan
    plan = us._PLANS[opt]

    # parameter storage swapped under the same Parameter (as FSDP1 does with `.data`)
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone()
    _step_and_check(model, opt, 3)
    assert us._PLANS[opt] is not plan
    plan = us._PLANS[opt]

    # an optimizer state tensor's storage swapped in place (same tensor object): the fused kernel reads raw
    # pointers, so this must rebuild too
    state = opt.state[model[0].weight]
    state["exp_avg"].data = state["exp_avg"].data.clone()
    _step_and_check(model, opt, 3)
    assert us._PLANS[opt] is not plan

    # a parameter without a gradient this step is left out, and counted again when it has one
    model[3].weight.requires_grad_(False)
    split = _step_and_check(model, opt, 4)
    assert "3.weight" not in {t.name for g in split.groups for t in g.tensors}
    model[3].weight.requires_grad_(True)
    split = _step_and_check(model, opt, 5)
    assert "3.weight" in {t.name for g in split.groups for t in g.tensors}


def test_cached_plan_reads_each_steps_scalars() -> None:
    """lr and weight decay change every step under a scheduler; the cached plan must not keep old ones."""
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(4):
        opt.param_groups[0]["weight_decay"] = 0.1 * (step + 1)
        split = _step_and_check(model, opt, step)
        decay = next(g for g in split.groups if g.name == "decay")
        # (the same float64 expressions evaluated twice: equal up to their own 1-3 roundings)
        assert decay.lr == pytest.approx(1e-2 / (1 + step), rel=formula_rel(2), abs=0)
        assert decay.weight_decay == pytest.approx(0.1 * (step + 1), rel=formula_rel(1), abs=0)
        timescale = 1.0 / (decay.lr * decay.weight_decay)
        assert decay.metrics["ema_timescale_steps"] == pytest.approx(timescale, rel=formula_rel(2), abs=0)
        sched.step()


def test_tensor_metrics_are_derived_on_demand() -> None:
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    split = _step_and_check(model, opt, 0)
    fresh = update_split(opt)
    tensor = fresh.groups[0].tensors[0]
    assert tensor._metrics is None  # group metrics alone do not build the per-tensor dicts
    fresh.metrics()
    assert tensor._metrics is None
    layer = fresh.metrics(per_layer=True)
    assert tensor._metrics is not None and layer == split.metrics(per_layer=True)
    assert all(math.isfinite(v) for v in layer.values())


def test_device_scalar_path_agrees_with_host_path() -> None:
    """Capturable / fused accelerator optimizers keep ``step`` on the device: the bias corrections are then
    float32 tensors, handled as vectors. Flagging a CPU optimizer capturable after its step takes that path on
    the CPU; it must agree with the host path up to the float32 corrections (and keep the plan)."""
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    _step_and_check(model, opt, 0)
    # (from step 1 on: at step 0 the zero-initialised bias is restored to 0 only with the corrections the step
    # really used, and this optimizer used float64 ones)
    host_split, record = _step(model, opt, 1)
    host = host_split.metrics(per_layer=True)
    for group in opt.param_groups:
        group["capturable"] = True
    split = update_split(opt)
    assert all(w.device_scalars is not None for w in us._PLANS[opt].works if w.items)
    device = split.metrics(per_layer=True)
    assert set(device) == set(host)
    # float32 bias corrections (step 2): lr*u carries their relative error on top of the usual ones
    step_size, bc2 = (bias_correction_rel(2.0, beta, U32, U32) for beta in (0.9, 0.999))
    bounds = reference_bounds(record, eta_rel=step_size[0] + bc2[1])
    assert compare_metrics(device, reference_metrics(record), bounds) == {}
    for key, value in host.items():  # (hyperparameter-only metrics: the same expressions)
        if key not in bounds:
            assert device[key] == pytest.approx(value, rel=formula_rel(4), abs=0), key


def test_groups_share_one_layout_and_1d_tensors_get_float64_buckets() -> None:
    small = _model()
    opt = torch.optim.AdamW(build_param_groups(small, 0.1), lr=1e-2)
    _step_and_check(small, opt, 0)
    packed = us._PLANS[opt].packed
    assert packed is not None and len(packed.works) == 2  # decay and no_decay groups, one layout
    assert sorted(str(b.compute_dtype) for b in packed.buckets) == ["torch.float32", "torch.float64"]

    torch.manual_seed(0)
    large = nn.Sequential(nn.Linear(1100, 1000), nn.LayerNorm(1000))
    opt = torch.optim.AdamW(build_param_groups(large, 0.1), lr=1e-3)
    large(torch.randn(4, 1100)).square().mean().backward()
    opt.step()
    update_split(opt)
    buckets = us._PLANS[opt].packed.buckets  # type: ignore[union-attr]
    by_dtype: dict[torch.dtype, int] = {}
    for b in buckets:
        by_dtype[b.compute_dtype] = by_dtype.get(b.compute_dtype, 0) + sum(b.split_sizes[0::2])
    assert by_dtype == {torch.float32: 1100 * 1000, torch.float64: 3 * 1000}


def test_non_contiguous_parameter_is_not_cached_stale() -> None:
    """A transposed parameter's flat view is a copy: the plan must not keep it from one step to the next."""
    torch.manual_seed(0)
    model = _model()
    model[0].weight = nn.Parameter(torch.randn(8, 32).t())  # (32, 8), not contiguous
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    for step in range(3):
        _step_and_check(model, opt, step)
    assert opt not in us._PLANS


def test_functional_core_imports_no_lightning() -> None:
    """Functional core, Lightning shell: the grouping and update arithmetic load with torch alone."""
    import subprocess
    import sys

    code = (
        "import sys, lightning_adamw, lightning_adamw.param_groups, lightning_adamw.update_split, "
        "lightning_adamw.packed_sums, lightning_adamw.optim_checks, lightning_adamw.schedules\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
