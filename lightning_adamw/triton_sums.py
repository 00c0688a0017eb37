r"""The per-tensor sums of :mod:`lightning_adamw.packed_sums` in one fused Triton kernel: the GPU path.

The torch path moves about 100 bytes per element through a dozen whole-buffer kernels (gather ``m`` and ``v``,
``sqrt``, ``add``, ``div``, three products with the weights, block norms). On a GPU that is several times the
optimizer's own fused step, which reads and writes about 28 bytes per element once. This kernel reads ``w``,
``m`` and ``v`` once, straight from the optimizer's tensors (no scratch buffers), and writes four partial sums per
``FUSED_SPAN`` elements: about 12 bytes per element, under half the fused step.

Layout (:func:`build_fused_layout`, built once per optimizer and cached by the caller, like
:func:`lightning_adamw.packed_sums.build_layout`): per device and dtype, three tables of data pointers (one entry
per tensor) and, per program, which entry it reads and where in it it starts. Each program of the grid sums a
span of one tensor and writes ``[sum X^2, sum w*X, sum (w + s*X)^2, sum w^2]``; one ``index_add_`` in float64
then adds the spans into per-tensor rows, exactly as the torch path does. No host synchronisation, one launch
per dtype group.

Entries marked ``exact`` (1-D tensors, see :mod:`lightning_adamw.packed_sums`) are computed in float64.

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
    "fused_item_sums",
    "fused_supported",
]

#: Elements summed by one program of the kernel (one row of partial sums)
FUSED_SPAN = 16384
#: Elements loaded at a time by one program (its vector width)
FUSED_BLOCK = 1024
_ENV = "LIGHTNING_ADAMW_TRITON"
#: why the kernel was switched off for this process (it failed once), else ``None``
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
        block_entry,
        block_start,
        eps_ptr,
        scale_ptr,
        eps_value,
        scale_value,
        partial,
        P_DTYPE: tl.constexpr,
        M_DTYPE: tl.constexpr,
        V_DTYPE: tl.constexpr,
        COMPUTE: tl.constexpr,
        SCALARS: tl.constexpr,
        ALIGNED: tl.constexpr,
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
        if SCALARS == 0:  # shared, as float32 arguments (promoted to the compute dtype in the arithmetic)
            eps = eps_value
            scale = scale_value
        else:  # 1: one value per item; 2: shared, as float64 (the pointers' first element)
            item = tl.load(entry_item + entry) if SCALARS == 1 else 0
            eps = tl.load(eps_ptr + item).to(COMPUTE)
            scale = tl.load(scale_ptr + item).to(COMPUTE)
        # One program sums up to SPAN elements, BLOCK at a time, in per-lane accumulators reduced once at the end:
        # a program per BLOCK would spend as long on its reductions and stores as on its loads (half-precision
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
        row = partial + b.to(tl.int64) * 4
        tl.store(row + 0, tl.sum(acc_xx, axis=0))
        tl.store(row + 1, tl.sum(acc_wx, axis=0))
        tl.store(row + 2, tl.sum(acc_before, axis=0))
        tl.store(row + 3, tl.sum(acc_ww, axis=0))


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
    """Tensors of one device and dtype combination: pointer tables and the block map of the kernel's grid."""

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
    entry_item: Tensor
    entry_numel: Tensor
    block_entry: Tensor
    block_start: Tensor
    #: item (row of ``out``) of each block, for the float64 ``index_add_``
    block_item: Tensor
    #: the tensors behind the pointers (kept alive with the layout; the torch path's input if the kernel fails)
    sources: list[PieceSource] = field(default_factory=list, repr=False)


def fused_supported(src: PieceSource) -> bool:
    """Whether a tensor can go to the kernel: contiguous flat tensors of a floating dtype it knows."""
    known = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return all(t.is_contiguous() and t.dtype in known for t in (src.p, src.m, src.v))


def build_fused_layout(sources: Sequence[PieceSource], span: int = FUSED_SPAN) -> list[FusedGroup]:
    """Group ``sources`` by device and dtypes and build each group's pointer tables and block map.

    Every source must pass :func:`fused_supported` (the caller sends the others down the torch path).
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
        entries, blocks_entry, blocks_start, blocks_item = [], [], [], []
        for e, src in enumerate(srcs):
            n = src.p.numel()
            entries.append(src.item)
            starts = list(range(0, n, span))
            blocks_entry += [e] * len(starts)
            blocks_start += starts
            blocks_item += [src.item] * len(starts)
        tensors = [t for s in srcs for t in (s.p, s.m, s.v)]
        compute = torch.float64 if exact or pdt == torch.float64 else torch.float32

        def table(values: list[int], dtype: torch.dtype, device: torch.device = device) -> Tensor:
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
                entry_item=table(entries, torch.int64),
                entry_numel=table([s.p.numel() for s in srcs], torch.int64),
                block_entry=table(blocks_entry, torch.int32),
                block_start=table(blocks_start, torch.int64),
                block_item=table(blocks_item, torch.int64),
                sources=list(srcs),
            )
        )
    return out


def fused_item_sums(
    group: FusedGroup,
    eps_scaled: float | Tensor,
    scale: float | Tensor,
    out: Tensor,
) -> None:
    r"""Add the group's ``[sum X^2, sum w*X, sum (w + s*X)^2, sum w^2]`` per item into ``out`` (in place).

    Same contract as :func:`lightning_adamw.packed_sums.adamw_item_sums`: ``X = m / (sqrt(v) + c*eps)``;
    ``eps_scaled`` and ``scale`` are floats shared by every item or float vectors with one value per item (on the
    group's device); ``out`` is ``num_items x 4``.
    """
    if triton is None:  # pragma: no cover - callers check fused_available first
        raise RuntimeError("the fused monitor kernel needs Triton")
    if isinstance(eps_scaled, Tensor) or isinstance(scale, Tensor):
        scalars = 1
        eps_vec = eps_scaled if isinstance(eps_scaled, Tensor) else torch.full_like(out[:, 0], eps_scaled)
        scale_vec = scale if isinstance(scale, Tensor) else torch.full_like(out[:, 0], scale)
        eps_vec, scale_vec = eps_vec.contiguous(), scale_vec.contiguous()
    elif group.compute_dtype == torch.float64:
        # float64 groups need float64 scalars: `w_new + s*X` must cancel to exactly 0 for a weight that was 0
        # before the step, which a float32-rounded `s` does not do (a kernel argument float is float32)
        scalars = 2
        both = torch.tensor([eps_scaled, scale], dtype=torch.float64)
        if group.device.type != "cpu":
            both = both.to(group.device, non_blocking=True)
        eps_vec, scale_vec = both[0:1], both[1:2]
    else:
        scalars = 0
        eps_vec = scale_vec = out  # not read: any pointer will do
    eps_value, scale_value = (0.0, 0.0) if scalars else (float(eps_scaled), float(scale))
    partial = torch.empty(group.num_blocks, 4, dtype=group.compute_dtype, device=group.device)
    pdt, mdt, vdt = (_tl_dtype(d) for d in group.dtypes)
    cdt = tl.float64 if group.compute_dtype == torch.float64 else tl.float32
    _adamw_sums_kernel[(group.num_blocks,)](
        group.p_ptrs,
        group.m_ptrs,
        group.v_ptrs,
        group.entry_item,
        group.entry_numel,
        group.block_entry,
        group.block_start,
        eps_vec,
        scale_vec,
        eps_value,
        scale_value,
        partial,
        P_DTYPE=pdt,
        M_DTYPE=mdt,
        V_DTYPE=vdt,
        COMPUTE=cdt,
        SCALARS=scalars,
        ALIGNED=group.aligned and not _interpreting(),
        BLOCK=FUSED_BLOCK,
        SPAN=group.span,
        num_warps=4,
    )
    out.index_add_(0, group.block_item, partial.to(out.dtype))
