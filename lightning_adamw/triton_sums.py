r"""The per-tensor sums of an AdamW step in one fused Triton kernel: the monitor's GPU path.

Every AdamW metric of the monitor is a function of four sums per tensor (see
:func:`lightning_adamw.update_split.derive_metrics` and :mod:`lightning_adamw.packed_sums`):

.. math::

    N = \|w_{new}\|^2, \quad B = s^2 \sum X^2, \quad E = s \sum w_{new} X, \quad S = \sum (w_{new} + s X)^2,
    \qquad X = \frac{m}{\sqrt{v} + c\,\epsilon}.

The torch path (:mod:`lightning_adamw.packed_sums`) moves about 100 bytes per element through a dozen
whole-buffer kernels; on a GPU that is several times the optimizer's own fused step, which reads and writes about
28 bytes per element once. This kernel reads ``w``, ``m`` and ``v`` once, straight from the optimizer's tensors
(no scratch buffers): about 12 bytes per element, under half the fused step.

Layout (:func:`build_fused_layout`, built once per optimizer and cached by the caller): per device and dtype
combination, tables of data pointers, sizes, result rows and replica weights (one entry per tensor), and per
program which entry it reads and where in it it starts. Each program sums ``FUSED_SPAN`` elements of one tensor,
``FUSED_BLOCK`` at a time in per-lane accumulators, and adds ``[N, B, E, S]`` (scaled, weighted, in float64)
into its tensor's row of the caller's table with atomic adds. One launch per dtype combination, nothing else on
the device, no host synchronisation.

Entries marked ``exact`` (1-D tensors, see :mod:`lightning_adamw.packed_sums`) are computed in float64, and their
``s`` and ``c*eps`` are read in float64 too: ``w_new + s*X`` must cancel to exactly 0 for a weight that was 0
before the step. Float32 entries use them rounded to float32 inside the elementwise arithmetic (as the
optimizer's own float32 arithmetic does) and in float64 to scale the sums.

The kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors too, which is how the test suite checks it without a
GPU. Set ``LIGHTNING_ADAMW_TRITON=0`` to use the torch path on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.packed_sums import PieceSource

try:  # Triton ships with CUDA builds of torch on Linux; the CPU-only build has none, and needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = [
    "FUSED_BLOCK",
    "FUSED_SPAN",
    "FusedGroup",
    "build_fused_layout",
    "disable",
    "fused_available",
    "fused_supported",
    "fused_table_sums",
    "shared_scalars",
]

#: Elements summed by one program of the kernel
FUSED_SPAN = 16384
#: Elements loaded at a time by one program (its vector width)
FUSED_BLOCK = 1024
_ENV = "LIGHTNING_ADAMW_TRITON"
#: why the kernel was switched off for this process (it failed once), else empty
_disabled: list[str] = []


def disable(reason: str) -> None:
    """Switch the kernel off for the rest of the process (after it failed to compile or launch)."""
    _disabled.append(reason)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernel runs on ``device``: CUDA with Triton installed (or any CPU tensor under
    ``TRITON_INTERPRET=1``), unless ``LIGHTNING_ADAMW_TRITON=0``."""
    if (
        triton is None
        or _disabled
        or os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off")
    ):
        return False
    if device.type == "cuda":
        return not _interpreting()
    return device.type == "cpu" and _interpreting()


if triton is not None:

    @triton.jit
    def _adamw_sums_kernel(
        p_ptrs,
        m_ptrs,
        v_ptrs,
        entry_item,
        entry_numel,
        entry_row,
        entry_weight,
        block_entry,
        block_start,
        eps_ptr,
        scale_ptr,
        table,
        P_DTYPE: tl.constexpr,
        M_DTYPE: tl.constexpr,
        V_DTYPE: tl.constexpr,
        COMPUTE: tl.constexpr,
        PER_ITEM: tl.constexpr,
        WEIGHTED: tl.constexpr,
        ALIGNED: tl.constexpr,
        K: tl.constexpr,
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
        if ALIGNED:  # every tensor starts on 16 bytes: lets the loads be vectorised
            p = tl.multiple_of(p, 16)
            m = tl.multiple_of(m, 16)
            v = tl.multiple_of(v, 16)
        # float64 scalars: one per item, or one shared by all (index 0)
        item = tl.load(entry_item + entry) if PER_ITEM else 0
        eps64 = tl.load(eps_ptr + item)
        scale64 = tl.load(scale_ptr + item)
        eps = eps64.to(COMPUTE)
        scale = scale64.to(COMPUTE)
        # One program sums up to SPAN elements, BLOCK at a time, in per-lane accumulators reduced once at the end:
        # a program per BLOCK would spend as long on its reductions and atomics as on its loads (half-precision
        # tensors most of all).
        lanes = tl.arange(0, BLOCK)
        acc_xx = tl.zeros([BLOCK], dtype=COMPUTE)
        acc_wx = tl.zeros([BLOCK], dtype=COMPUTE)
        acc_before = tl.zeros([BLOCK], dtype=COMPUTE)
        acc_ww = tl.zeros([BLOCK], dtype=COMPUTE)
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
        weight = tl.load(entry_weight + entry) if WEIGHTED else 1.0
        row = table + tl.load(entry_row + entry) * K
        tl.atomic_add(row + 0, tl.sum(acc_ww, axis=0).to(tl.float64) * weight)
        tl.atomic_add(row + 1, tl.sum(acc_xx, axis=0).to(tl.float64) * (scale64 * scale64 * weight))
        tl.atomic_add(row + 2, tl.sum(acc_wx, axis=0).to(tl.float64) * (scale64 * weight))
        tl.atomic_add(row + 3, tl.sum(acc_before, axis=0).to(tl.float64) * weight)


def _tl_dtype(dtype: torch.dtype) -> Any:
    table = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }
    if dtype not in table:
        raise TypeError(f"the fused monitor kernel does not handle {dtype} tensors")
    return table[dtype]


@dataclass
class FusedGroup:
    """Tensors of one device and dtype combination: pointer tables and the program map of the kernel's grid."""

    device: torch.device
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]
    compute_dtype: torch.dtype
    aligned: bool
    #: elements per program (``FUSED_SPAN`` unless the layout was built with another)
    span: int
    num_blocks: int
    p_ptrs: Tensor
    m_ptrs: Tensor
    v_ptrs: Tensor
    #: per entry: item (index of the per-item scalars), numel, row of the result table, replica weight
    entry_item: Tensor
    entry_numel: Tensor
    entry_row: Tensor
    entry_weight: Tensor | None
    #: per program: its entry and the first element it sums
    block_entry: Tensor
    block_start: Tensor
    #: the tensors behind the pointers (kept alive with the layout; the torch path's input if the kernel fails)
    sources: list[PieceSource] = field(default_factory=list, repr=False)


def fused_supported(src: PieceSource) -> bool:
    """Whether a tensor can go to the kernel: contiguous flat tensors of a floating dtype it knows."""
    known = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return all(t.is_contiguous() and t.dtype in known for t in (src.p, src.m, src.v))


def build_fused_layout(sources: Sequence[PieceSource], span: int = FUSED_SPAN) -> list[FusedGroup]:
    """Group ``sources`` by device and dtypes and build each group's pointer tables and program map.

    Every source must pass :func:`fused_supported` (the caller sends the others down the torch path). A source's
    sums go to row ``src.row`` of the table (``src.item`` when ``row`` is negative), times ``src.weight``.
    """
    grouped: dict[tuple[Any, ...], list[PieceSource]] = {}
    for src in sources:
        if src.p.numel() == 0:
            continue
        if not fused_supported(src):
            raise ValueError(f"item {src.item}: the fused kernel needs contiguous float tensors")
        exact = src.exact and src.p.dtype != torch.float64
        key = (src.p.device, src.p.dtype, src.m.dtype, src.v.dtype, exact)
        grouped.setdefault(key, []).append(src)
    out = []
    for (device, pdt, mdt, vdt, exact), srcs in grouped.items():
        blocks_entry: list[int] = []
        blocks_start: list[int] = []
        for e, src in enumerate(srcs):
            starts = range(0, src.p.numel(), span)
            blocks_entry += [e] * len(starts)
            blocks_start += starts
        tensors = [t for s in srcs for t in (s.p, s.m, s.v)]
        compute = torch.float64 if exact or pdt == torch.float64 else torch.float32
        weights = [float(s.weight) for s in srcs]

        def table(values: list[Any], dtype: torch.dtype, device: torch.device = device) -> Tensor:
            t = torch.tensor(values, dtype=dtype)
            return t if device.type == "cpu" else t.to(device, non_blocking=True)

        out.append(
            FusedGroup(
                device=device,
                dtypes=(pdt, mdt, vdt),
                compute_dtype=compute,
                aligned=all(t.data_ptr() % 16 == 0 for t in tensors),
                span=span,
                num_blocks=len(blocks_entry),
                p_ptrs=table([s.p.data_ptr() for s in srcs], torch.int64),
                m_ptrs=table([s.m.data_ptr() for s in srcs], torch.int64),
                v_ptrs=table([s.v.data_ptr() for s in srcs], torch.int64),
                entry_item=table([s.item for s in srcs], torch.int64),
                entry_numel=table([s.p.numel() for s in srcs], torch.int64),
                entry_row=table([s.row if s.row >= 0 else s.item for s in srcs], torch.int64),
                entry_weight=table(weights, torch.float64) if any(w != 1.0 for w in weights) else None,
                block_entry=table(blocks_entry, torch.int32),
                block_start=table(blocks_start, torch.int64),
                sources=list(srcs),
            )
        )
    return out


def shared_scalars(eps_scaled: float, scale: float, device: torch.device) -> Tensor:
    """``[c*eps, s]`` as a float64 vector on ``device`` for :func:`fused_table_sums`, without a host-to-device copy
    (a copy from pageable memory can wait for the device): two fills whose values travel as kernel arguments."""
    if device.type == "cpu":
        return torch.tensor([eps_scaled, scale], dtype=torch.float64)
    both = torch.full((2,), eps_scaled, dtype=torch.float64, device=device)
    both[1:].fill_(scale)
    return both


def fused_table_sums(group: FusedGroup, eps_scaled: Tensor, scale: Tensor, table: Tensor) -> None:
    # (``shared_scalars`` gives both as one vector: pass ``v[0:1], v[1:2]``)
    r"""Add ``[N, B, E, S]`` of each tensor of ``group`` into columns 0-3 of its row of ``table`` (in place).

    ``X = m / (sqrt(v) + c*eps)``, ``N = sum w^2``, ``B = s^2 sum X^2``, ``E = s sum w X``,
    ``S = sum (w + s X)^2``, each times the entry's weight. ``eps_scaled`` (``c*eps``) and ``scale`` (``s``) are
    float64 vectors on the group's device: one value per item (indexed by ``PieceSource.item``), or one value
    shared by all (length 1, see :func:`shared_scalars`). ``table`` is a contiguous float64 ``rows x K`` tensor.
    """
    if triton is None:  # pragma: no cover - callers check fused_available first
        raise RuntimeError("the fused monitor kernel needs Triton")
    if table.dtype != torch.float64 or not table.is_contiguous():
        raise ValueError("table: the fused kernel adds into a contiguous float64 tensor")
    if eps_scaled.dtype != torch.float64 or scale.dtype != torch.float64:
        raise ValueError("eps_scaled and scale: float64 vectors")
    per_item = eps_scaled.numel() > 1 or scale.numel() > 1
    if per_item and (eps_scaled.numel() == 1 or scale.numel() == 1):
        n = max(eps_scaled.numel(), scale.numel())
        eps_scaled, scale = eps_scaled.expand(n).contiguous(), scale.expand(n).contiguous()
    pdt, mdt, vdt = (_tl_dtype(d) for d in group.dtypes)
    _adamw_sums_kernel[(group.num_blocks,)](
        group.p_ptrs,
        group.m_ptrs,
        group.v_ptrs,
        group.entry_item,
        group.entry_numel,
        group.entry_row,
        group.entry_weight if group.entry_weight is not None else eps_scaled,  # (not read unweighted)
        group.block_entry,
        group.block_start,
        eps_scaled,
        scale,
        table,
        P_DTYPE=pdt,
        M_DTYPE=mdt,
        V_DTYPE=vdt,
        COMPUTE=tl.float64 if group.compute_dtype == torch.float64 else tl.float32,
        PER_ITEM=per_item,
        WEIGHTED=group.entry_weight is not None,
        ALIGNED=group.aligned and not _interpreting(),
        K=table.shape[1],
        BLOCK=FUSED_BLOCK,
        SPAN=group.span,
        num_warps=4,
    )
