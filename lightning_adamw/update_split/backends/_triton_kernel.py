"""The Triton kernel of the ``triton`` backend (imported only when that backend runs: it imports Triton).

See :mod:`lightning_adamw.update_split.backends.triton` for what it computes and how it is launched.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["adamw_sums_kernel", "tl_dtype"]


def tl_dtype(name: str) -> object:
    """The Triton dtype of a torch dtype's name (``"float32"``, ``"bfloat16"``, ...)."""
    return getattr(tl, name)


@triton.jit
def adamw_sums_kernel(
    p_ptrs,
    m_ptrs,
    v_ptrs,
    g_ptrs,
    entry_item,
    entry_numel,
    entry_row,
    entry_weight,
    block_entry,
    block_start,
    eps_ptr,
    scale_ptr,
    decay_ptr,
    grad_scale_ptr,
    table,
    P_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    EXACT: tl.constexpr,
    HALF_EPS: tl.constexpr,
    HALF_SUBNORMAL: tl.constexpr,
    GRAD_SCALED: tl.constexpr,
    PER_ITEM: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    K: tl.constexpr,
    COL_N: tl.constexpr,
    COL_B: tl.constexpr,
    COL_E: tl.constexpr,
    COL_S: tl.constexpr,
    COL_G: tl.constexpr,
    COL_R: tl.constexpr,
    COL_RD: tl.constexpr,
    BLOCK: tl.constexpr,
    SPAN: tl.constexpr,
):
    b = tl.program_id(0)
    entry = tl.load(block_entry + b)
    start = tl.load(block_start + b)
    n = tl.load(entry_numel + entry)
    p = tl.load(p_ptrs + entry).to(tl.pointer_type(P_DTYPE))
    m = tl.load(m_ptrs + entry).to(tl.pointer_type(M_DTYPE))
    v = tl.load(v_ptrs + entry).to(tl.pointer_type(V_DTYPE))
    g = tl.load(g_ptrs + entry).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:  # every tensor starts on 16 bytes: lets the loads be vectorised
        p = tl.multiple_of(p, 16)
        m = tl.multiple_of(m, 16)
        v = tl.multiple_of(v, 16)
        g = tl.multiple_of(g, 16)
    # float64 scalars: one per item, or one shared by all (index 0)
    item = tl.load(entry_item + entry) if PER_ITEM else 0
    eps64 = tl.load(eps_ptr + item)
    scale64 = tl.load(scale_ptr + item)
    decay64 = tl.load(decay_ptr + item)
    eps = eps64.to(COMPUTE)
    scale = scale64.to(COMPUTE)
    # the computed change delta = c*w + (1 + c)*s*X (contract: rounded away)
    decay = decay64.to(COMPUTE)
    step_scale = (scale64 * (1.0 + decay64)).to(COMPUTE)
    # One program sums up to SPAN elements, BLOCK at a time, in per-lane accumulators reduced once at the end:
    # a program per BLOCK would spend as long on its reductions and atomics as on its loads (half-precision
    # tensors most of all).
    lanes = tl.arange(0, BLOCK)
    acc_xx = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_wx = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_before = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_ww = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_gg = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_lost = tl.zeros([BLOCK], dtype=COMPUTE)  # (at most SPAN / BLOCK per lane: exact)
    acc_lost_sq = tl.zeros([BLOCK], dtype=COMPUTE)
    stop = tl.minimum(start + SPAN, n)
    for i in range(0, SPAN // BLOCK):  # a fixed trip count (past `stop` the loads are masked off)
        offs = start + i * BLOCK + lanes
        mask = offs < stop
        w = tl.load(p + offs, mask=mask, other=0.0).to(COMPUTE)
        mv = tl.load(m + offs, mask=mask, other=0.0).to(COMPUTE)
        vv = tl.load(v + offs, mask=mask, other=1.0).to(COMPUTE)
        x = mv / (tl.sqrt(vv) + eps)
        x = tl.where(mask, x, 0.0)  # masked lanes are 0 even when eps is 0
        before = w + scale * x  # w_new + eta*u: the weight before the step (times 1 - lr*wd)
        acc_xx += x * x
        acc_wx += w * x
        acc_before += before * before
        acc_ww += w * w
        gv = tl.load(g + offs, mask=mask, other=0.0).to(COMPUTE)
        acc_gg += gv * gv
        # half the storage dtype's spacing at w: 2^floor(log2|w|) from w's exponent bits (exact), times eps/2,
        # at least half the subnormal spacing
        if EXACT:
            power = (w.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
        else:
            power = (w.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        half_ulp = tl.maximum(power * HALF_EPS, HALF_SUBNORMAL)
        delta = tl.abs(decay * w + step_scale * x)
        lost = mask & (delta < half_ulp) & (delta > 0.0)
        acc_lost += tl.where(lost, 1.0, 0.0)
        acc_lost_sq += tl.where(lost, delta * delta, 0.0)
    weight = tl.load(entry_weight + entry) if WEIGHTED else 1.0
    row = table + tl.load(entry_row + entry) * K
    tl.atomic_add(row + COL_N, tl.sum(acc_ww, axis=0).to(tl.float64) * weight)
    tl.atomic_add(row + COL_B, tl.sum(acc_xx, axis=0).to(tl.float64) * (scale64 * scale64 * weight))
    tl.atomic_add(row + COL_E, tl.sum(acc_wx, axis=0).to(tl.float64) * (scale64 * weight))
    tl.atomic_add(row + COL_S, tl.sum(acc_before, axis=0).to(tl.float64) * weight)
    grad_weight = weight
    if GRAD_SCALED:  # a fused optimizer's GradScaler scale is still in .grad
        grad_scale = tl.load(grad_scale_ptr)
        grad_weight = weight / (grad_scale * grad_scale)
    tl.atomic_add(row + COL_G, tl.sum(acc_gg, axis=0).to(tl.float64) * grad_weight)
    tl.atomic_add(row + COL_R, tl.sum(acc_lost, axis=0).to(tl.float64) * weight)
    tl.atomic_add(row + COL_RD, tl.sum(acc_lost_sq, axis=0).to(tl.float64) * weight)
