r"""The ``triton`` backend: the AdamW sums in one fused Triton kernel per dtype combination (the CUDA path).

The same sums as the ``packed`` backend (:mod:`~lightning_adamw.update_split.backends.packed`), with
:math:`X = m / (\sqrt{v} + c\epsilon)`: :math:`N = \sum w^2`, :math:`B = s^2 \sum X^2`, :math:`E = s \sum w X`,
:math:`S = \sum (w + sX)^2`, :math:`G = \sum g^2` and the rounded-away ``R``, ``RD`` (:math:`\Delta = c\,w + (1+c)\,sX`
against half the storage spacing at :math:`w`, from its exponent bits). The torch path moves about 100 bytes per element through a dozen whole-buffer
kernels; on a GPU that is several times the optimizer's own fused step, which reads and writes about 28 bytes
per element once. This kernel reads ``w``, ``m``, ``v`` and the gradient once, straight from the optimizer's
tensors (no scratch buffers): about 16 bytes per element, about half the fused step. The gradients are new tensors
after every ``zero_grad``: their pointer table is rebuilt when their addresses change (:func:`grad_pointers`).

Layout (:func:`build_fused_layout`, built once per plan): per device and dtype combination, tables of data
pointers, sizes, result rows and replica weights (one entry per tensor), and per program which entry it reads and
where in it it starts. Each program sums ``FUSED_SPAN`` elements of one tensor, ``FUSED_BLOCK`` at a time in
per-lane accumulators (``partial_terms`` = ``FUSED_SPAN / FUSED_BLOCK + FUSED_BLOCK - 1``), and adds the seven
sums (scaled, weighted, in float64) into its tensor's row of the table with atomic adds: one launch per dtype
combination, nothing else on the device, no host synchronisation.

Entries the dtype rule puts in float64 are computed in float64, their ``s`` and ``c*eps`` read in float64 too
(``w_new + s*X`` must cancel to exactly 0 for a weight that was 0 before the step); float32 entries use them
rounded to float32 inside the elementwise arithmetic (as the optimizer's own float32 arithmetic does) and in
float64 to scale the sums.

Triton is imported only when this backend runs (the kernel lives in ``_triton_kernel.py``). It runs on CUDA,
and under ``TRITON_INTERPRET=1`` on CPU tensors too, which is how the test suite checks it without a GPU.
``LIGHTNING_ADAMW_TRITON=0`` (or ``update_split(..., triton=False)``) leaves it out of the automatic choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.backends._kernels import KNOWN_DTYPES, installed, readable_grads
from lightning_adamw.update_split.backends._kernels import switched_off as env_switched_off
from lightning_adamw.update_split.contract import (
    NUM_COLUMNS,
    Col,
    SumsRequest,
    Tables,
    TensorWork,
    host_to,
    storage_spacing,
)

__all__ = [
    "BACKEND",
    "ENV",
    "FUSED_BLOCK",
    "FUSED_SPAN",
    "FusedGroup",
    "available",
    "build_fused_layout",
    "fused_supported",
    "fused_table_sums",
    "grad_pointers",
    "shared_scalars",
]

#: Elements summed by one program of the kernel
FUSED_SPAN = 16384
#: Elements loaded at a time by one program (its vector width)
FUSED_BLOCK = 1024
#: ``LIGHTNING_ADAMW_TRITON=0`` (or ``false``, ``no``, ``off``) keeps the kernel out of the automatic choice
ENV = "LIGHTNING_ADAMW_TRITON"
_KNOWN = KNOWN_DTYPES


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def switched_off() -> bool:
    """Whether ``LIGHTNING_ADAMW_TRITON`` turns the kernel off."""
    return env_switched_off(ENV)


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: CUDA with Triton installed (or any CPU tensor under
    ``TRITON_INTERPRET=1``), unless ``LIGHTNING_ADAMW_TRITON=0``. Does not import Triton."""
    if switched_off() or not installed("triton"):
        return False
    if device.type == "cuda":
        return not _interpreting()
    return device.type == "cpu" and _interpreting()


def fused_supported(item: TensorWork) -> bool:
    """Whether a tensor can go to the kernel: contiguous flat tensors of a floating dtype it knows."""
    tensors = (item.p, item.m, item.v)
    return all(t is not None and t.is_contiguous() and t.dtype in _KNOWN for t in tensors)


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
    #: the tensors behind the pointers (kept alive with the layout)
    items: list[TensorWork] = field(default_factory=list, repr=False)
    #: the gradient pointers of the last call and their table on the device (see :func:`grad_pointers`)
    grad_ptrs: tuple[tuple[int, ...], Tensor] | None = field(default=None, repr=False)


def build_fused_layout(items: Sequence[TensorWork], span: int = FUSED_SPAN) -> list[FusedGroup]:
    """Group ``items`` by device and dtypes and build each group's pointer tables and program map. An item's
    per-item scalars are at its position in ``items``; its sums go to row ``item.row``, times ``item.weight``.
    Raises ``ValueError`` naming an item :func:`fused_supported` refuses."""
    grouped: dict[tuple[Any, ...], list[tuple[int, TensorWork]]] = {}
    for j, item in enumerate(items):
        if not fused_supported(item):
            raise ValueError(f"item {j} (row {item.row}): the fused kernel needs contiguous float tensors")
        if item.p.numel() == 0:
            continue
        key = (item.p.device, item.p.dtype, item.m.dtype, item.v.dtype, item.compute_dtype)  # type: ignore[union-attr]
        grouped.setdefault(key, []).append((j, item))
    out = []
    for (device, pdt, mdt, vdt, compute), entries in grouped.items():
        blocks_entry: list[int] = []
        blocks_start: list[int] = []
        for e, (_, item) in enumerate(entries):
            starts = range(0, item.p.numel(), span)
            blocks_entry += [e] * len(starts)
            blocks_start += starts
        its = [item for _, item in entries]
        tensors = [t for it in its for t in (it.p, it.m, it.v)]
        weights = [float(it.weight) for it in its]
        out.append(
            FusedGroup(
                device=device,
                dtypes=(pdt, mdt, vdt),
                compute_dtype=compute,
                aligned=all(t.data_ptr() % 16 == 0 for t in tensors),  # type: ignore[union-attr]
                span=span,
                num_blocks=len(blocks_entry),
                p_ptrs=host_to([it.p.data_ptr() for it in its], torch.int64, device),
                m_ptrs=host_to([it.m.data_ptr() for it in its], torch.int64, device),  # type: ignore[union-attr]
                v_ptrs=host_to([it.v.data_ptr() for it in its], torch.int64, device),  # type: ignore[union-attr]
                entry_item=host_to([j for j, _ in entries], torch.int64, device),
                entry_numel=host_to([it.p.numel() for it in its], torch.int64, device),
                entry_row=host_to([it.row for it in its], torch.int64, device),
                entry_weight=host_to(weights, torch.float64, device)
                if any(w != 1.0 for w in weights)
                else None,
                block_entry=host_to(blocks_entry, torch.int32, device),
                block_start=host_to(blocks_start, torch.int64, device),
                items=its,
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


def grad_pointers(group: FusedGroup, grads: Sequence[Tensor]) -> tuple[Tensor, torch.dtype, list[Tensor]]:
    """The kernel's table of gradient pointers for ``group`` (``grads``: the flat gradient of each of its items,
    new tensors after every ``zero_grad``), their dtype, and the tensors behind them to keep alive until the
    kernel has run. Gradients that are not contiguous, or do not share one dtype the kernel knows, are copied
    (contiguous, float32: a rare layout, exact for every half-precision gradient). The table is reused while
    the pointers are unchanged (the caching allocator often hands out the same blocks)."""
    kept = readable_grads(grads, group.device)
    key = tuple(g.data_ptr() for g in kept)
    if group.grad_ptrs is None or group.grad_ptrs[0] != key:
        group.grad_ptrs = (key, host_to(list(key), torch.int64, group.device))
    return group.grad_ptrs[1], kept[0].dtype if kept else torch.float32, kept


def fused_table_sums(
    group: FusedGroup,
    eps_scaled: Tensor,
    scale: Tensor,
    table: Tensor,
    *,
    decay: Tensor | None = None,
    grads: Sequence[Tensor] | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    r"""Add the AdamW columns of the contract (``SUM_COLUMNS["adamw"]``: ``N, B, E, S, G, R, RD``) of each
    tensor of ``group`` into its row of ``table`` (in place), times its weight.

    ``eps_scaled`` (``c_2*eps``), ``scale`` (``s``) and ``decay`` (``c`` of the computed change
    :math:`\Delta = c\,w + (1 + c)\,sX`, 0 when ``None``) are float64 vectors on the group's device: one value
    per item, or one value shared by all (length 1, see :func:`shared_scalars`). ``grads``: the flat gradient of
    each tensor of ``group`` in its order (``None``: the weights stand in, for tests of the other columns), with
    ``grad_scale`` the ``GradScaler`` scale a fused optimizer left in them. ``table`` is a contiguous float64
    ``rows x NUM_COLUMNS`` tensor. Raises ``ValueError`` for other tables or scalars.
    """
    if table.dtype != torch.float64 or not table.is_contiguous() or table.shape[-1] != NUM_COLUMNS:
        raise ValueError(
            f"table: the fused kernel adds into a contiguous float64 rows x {NUM_COLUMNS} tensor"
        )
    if decay is None:
        decay = torch.zeros_like(scale[:1])
    if eps_scaled.dtype != torch.float64 or scale.dtype != torch.float64 or decay.dtype != torch.float64:
        raise ValueError("eps_scaled, scale and decay: float64 vectors")
    from lightning_adamw.update_split.backends import _triton_kernel as kernel  # imports Triton

    vectors = [eps_scaled, scale, decay]
    n = max(t.numel() for t in vectors)
    per_item = n > 1
    if per_item:
        eps_scaled, scale, decay = (t.expand(n).contiguous() if t.numel() == 1 else t for t in vectors)
    g_ptrs, g_dtype, kept = grad_pointers(group, grads if grads is not None else [it.p for it in group.items])
    eps_s, tiny_s = storage_spacing(group.dtypes[0])
    pdt, mdt, vdt, gdt = (kernel.tl_dtype(str(d).removeprefix("torch.")) for d in (*group.dtypes, g_dtype))
    exact = group.compute_dtype == torch.float64
    kernel.adamw_sums_kernel[(group.num_blocks,)](
        group.p_ptrs,
        group.m_ptrs,
        group.v_ptrs,
        g_ptrs,
        group.entry_item,
        group.entry_numel,
        group.entry_row,
        group.entry_weight if group.entry_weight is not None else eps_scaled,  # (not read unweighted)
        group.block_entry,
        group.block_start,
        eps_scaled,
        scale,
        decay,
        grad_scale if grad_scale is not None else eps_scaled,  # (not read without a scale)
        table,
        P_DTYPE=pdt,
        M_DTYPE=mdt,
        V_DTYPE=vdt,
        G_DTYPE=gdt,
        COMPUTE=kernel.tl_dtype("float64" if exact else "float32"),
        EXACT=exact,
        HALF_EPS=0.5 * eps_s,
        HALF_SUBNORMAL=0.5 * eps_s * tiny_s,
        GRAD_SCALED=grad_scale is not None,
        PER_ITEM=per_item,
        WEIGHTED=group.entry_weight is not None,
        ALIGNED=group.aligned and all(g.data_ptr() % 16 == 0 for g in kept) and not _interpreting(),
        K=NUM_COLUMNS,
        COL_N=int(Col.N),
        COL_B=int(Col.B),
        COL_E=int(Col.E),
        COL_S=int(Col.S),
        COL_G=int(Col.G),
        COL_R=int(Col.R),
        COL_RD=int(Col.RD),
        BLOCK=FUSED_BLOCK,
        SPAN=group.span,
        num_warps=4,
    )
    del kept  # (the kernel is queued on the tensors' stream: the allocator reuses their memory after it)


class TritonBackend:
    name = "triton"
    kinds = frozenset({"adamw"})
    partial_terms = FUSED_SPAN // FUSED_BLOCK + FUSED_BLOCK - 1
    fallible = True

    def accepts(self, item: TensorWork) -> bool:
        return available(item.p.device) and fused_supported(item)

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> list[FusedGroup]:
        return build_fused_layout(items)

    def add_sums(self, prepared: list[FusedGroup], request: SumsRequest, tables: Tables) -> None:
        shared = request.shared_eps_and_scale()
        decay_shared = request.shared_decay_coefficient()
        grad_of = {
            id(it): g for part in request.parts for it, g in zip(part.items, part.grads or (), strict=True)
        }
        grad_scale = request.grad_scale
        scalars: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        for group in prepared:
            dev = group.device
            if dev not in scalars:
                if shared is not None:
                    both = shared_scalars(*shared, dev)
                    eps, scale = both[0:1], both[1:2]
                else:
                    eps, scale = request.eps_and_scale_vectors(dev)
                if decay_shared is not None:
                    decay = shared_scalars(decay_shared, 0.0, dev)[0:1]
                else:
                    decay = host_to(request.decay_coefficients(), torch.float64, dev)
                scalars[dev] = (eps, scale, decay)
            eps, scale, decay = scalars[dev]
            fused_table_sums(
                group,
                eps,
                scale,
                table=tables.on(dev),
                decay=decay,
                grads=[grad_of[id(it)] for it in group.items],
                grad_scale=None if grad_scale is None else grad_scale.to(device=dev, dtype=torch.float64),
            )


BACKEND = TritonBackend()
