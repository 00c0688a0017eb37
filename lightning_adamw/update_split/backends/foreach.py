r"""The ``foreach`` backend: the sums with torch's multi-tensor (``torch._foreach_*``) kernels, any kind of group.

Tensors are cut into slices of at most ``chunk`` elements and grouped into buckets of about ``chunk`` elements per
device and compute dtype (:func:`~lightning_adamw.update_split.contract.compute_dtype`), so the extra memory is
one bucket's buffer. Per bucket, :math:`b` is rebuilt in one new buffer with the very operations torch's Adam
used — ``sqrt(v) / sqrt(1 - beta2^t) + eps``, reciprocal, times ``m``, times ``lr / (1 - beta1^t)``
(:func:`denominators`) — or, for optimizers without Adam state, as ``w_old - w_new`` in the snapshot's buffer.
Squared norms come from ``torch._foreach_norm`` (one multi-tensor kernel), dot products from ``torch.dot``; the
rounded-away columns from the computed change :math:`\Delta` in a second buffer, compared piece by piece with
:func:`~lightning_adamw.update_split.contract.half_ulp` of the stored weights
(:mod:`~lightning_adamw.update_split.backends.rounded_away`: on a CPU only the pieces an exact screen flags).

It is what Adam + coupled L2 groups and snapshot groups use; the denominators of the coupled groups' median
(:mod:`~lightning_adamw.update_split.median`) come from the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.backends.rounded_away import exact_sums, safe_bound, scale_k
from lightning_adamw.update_split.contract import (
    SUM_COLUMNS,
    SumsRequest,
    Tables,
    TensorWork,
    acc_dtype,
    auto_chunk,
    host_to,
)

__all__ = ["BACKEND", "Piece", "buckets", "denominators"]

_MIN_CHUNK = 1 << 16
_MAX_CHUNK = 1 << 24


@dataclass
class Piece:
    """A slice of one item's flat tensors (the whole item when it fits in a chunk)."""

    #: index of the item in the request
    j: int
    item: TensorWork
    p: Tensor
    m: Tensor | None = None
    v: Tensor | None = None
    g: Tensor | None = None
    snap: Tensor | None = None


def _pieces(j: int, item: TensorWork, g: Tensor | None, chunk: int) -> Iterator[Piece]:
    n = item.p.numel()
    if n <= chunk:
        yield Piece(j, item, item.p, item.m, item.v, g, item.snap)
        return
    for start in range(0, n, chunk):
        cut = slice(start, min(start + chunk, n))
        yield Piece(
            j,
            item,
            item.p[cut],
            None if item.m is None else item.m[cut],
            None if item.v is None else item.v[cut],
            None if g is None else g[cut],
            None if item.snap is None else item.snap[cut],
        )


def buckets(
    items: Sequence[TensorWork], chunk: int, grads: Sequence[Tensor] | None = None
) -> Iterator[list[Piece]]:
    """Slices of ``items`` grouped by device and compute dtype into buckets of about ``chunk`` elements."""
    open_buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Piece], int]] = {}
    for j, item in enumerate(items):
        for piece in _pieces(j, item, None if grads is None else grads[j], chunk):
            key = (piece.p.device, item.compute_dtype)
            bucket, size = open_buckets.get(key, ([], 0))
            bucket.append(piece)
            size += piece.p.numel()
            if size >= chunk:
                yield bucket
                bucket, size = [], 0
            open_buckets[key] = (bucket, size)
    for bucket, _ in open_buckets.values():
        if bucket:
            yield bucket


def _cast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return tensors if all(t.dtype == dtype for t in tensors) else [t.to(dtype) for t in tensors]


def _scalars(values: list[Any], tensors: list[Tensor]) -> list[Any]:
    # foreach kernels take a list of Python scalars, or of tensors on each tensor's device
    if all(isinstance(s, float) for s in values):
        return values
    return [torch.as_tensor(s, device=t.device) for s, t in zip(values, tensors, strict=True)]


def denominators(bucket: list[Piece], bc2_sqrt: list[Any], eps: list[float]) -> list[Tensor]:
    """``sqrt(v) / sqrt(1 - beta2^t) + eps`` per piece, as torch's Adam computes it, in the bucket's compute dtype
    (one new buffer per piece). ``bc2_sqrt`` and ``eps`` are indexed by the pieces' item index ``j``."""
    dtype = bucket[0].item.compute_dtype
    denom = torch._foreach_sqrt(_cast([pc.v for pc in bucket], dtype))  # type: ignore[misc]
    torch._foreach_div_(denom, _scalars([bc2_sqrt[pc.j] for pc in bucket], denom))
    torch._foreach_add_(denom, [eps[pc.j] for pc in bucket])
    return denom


def _sq_norms(tensors: list[Tensor], acc: torch.dtype) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors)).to(acc).square()


def _dots(a: list[Tensor], b: list[Tensor], acc: torch.dtype) -> Tensor:
    # torch.dot allocates nothing (a foreach mul + sum would need another chunk-sized buffer)
    return torch.stack([torch.dot(x, y) for x, y in zip(a, b, strict=True)]).to(acc)


class ForeachBackend:
    name = "foreach"
    kinds = frozenset({"adamw", "adam_l2", "generic"})
    partial_terms = None  # _foreach_norm / dot over a whole slice of at most the chunk
    fallible = False

    def accepts(self, item: TensorWork) -> bool:
        return True

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> int:
        # about 1/16 of the parameters at a time, so the extra buffer stays a small fraction of the model
        return auto_chunk(
            [it.p.numel() for it in items], chunk_numel, lo=_MIN_CHUNK, hi=_MAX_CHUNK, divisor=16
        )

    def add_sums(self, prepared: int, request: SumsRequest, tables: Tables) -> None:
        kind = request.kind
        items = request.items
        signs = None
        step_size: list[Any] = []
        bc2: list[Any] = []
        eps: list[float] = []
        decay: list[float] = []
        if kind != "generic":
            step_size, bc2, eps = request.per_item()
            decay = request.decay_coefficients()
        grads = [g for part in request.parts for g in (part.grads or ())]
        if kind == "adam_l2":
            # torch negates the gradient before adding the L2 term: <g, w_old> changes sign under maximize
            signs = [-1.0 if part.scalars.maximize else 1.0 for part in request.parts for _ in part.items]
        columns = SUM_COLUMNS[kind]
        for bucket in buckets(items, prepared, grads):
            block = self._bucket(kind, bucket, step_size, bc2, eps, decay, signs, request.grad_scale)
            device = bucket[0].p.device
            rows = host_to([pc.item.row for pc in bucket], torch.int64, device)
            weights = [pc.item.weight for pc in bucket]
            if any(w != 1.0 for w in weights):
                block = block * host_to(weights, block.dtype, device).unsqueeze(1)
            tables.add(device, rows, columns, block)

    def _bucket(
        self,
        kind: str,
        bucket: list[Piece],
        step_size: list[Any],
        bc2: list[Any],
        eps: list[float],
        decay: list[float],
        signs: list[float] | None,
        grad_scale: Tensor | None,
    ) -> Tensor:
        """One bucket's sums, a ``pieces x len(SUM_COLUMNS[kind])`` block in the table's dtype."""
        device = bucket[0].p.device
        dtype = bucket[0].item.compute_dtype
        acc = acc_dtype(device)
        params = _cast([pc.p for pc in bucket], dtype)
        if kind == "generic":
            # b = w_old - w_new, computed in the snapshot buffer (ours: a copy taken for this step)
            buf = [pc.snap.to(dtype, copy=True) if pc.snap.dtype != dtype else pc.snap for pc in bucket]  # type: ignore[union-attr]
            col_s = _sq_norms(buf, acc)
            torch._foreach_sub_(buf, params)
        else:
            # lr*u = (lr / bc1) * m / denom, the quantity torch's addcdiv subtracted, built in one buffer
            buf = denominators(bucket, bc2, eps)
            torch._foreach_reciprocal_(buf)
            torch._foreach_mul_(buf, _cast([pc.m for pc in bucket], dtype))  # type: ignore[misc]
            torch._foreach_mul_(buf, _scalars([step_size[pc.j] for pc in bucket], buf))
        col_n = _sq_norms(params, acc)
        col_b = _sq_norms(buf, acc)
        col_e = _dots(params, buf, acc)
        grads = _cast([pc.g for pc in bucket], dtype)  # type: ignore[misc]
        col_g = _sq_norms(grads, acc)
        if grad_scale is not None:  # fused optimizer + GradScaler: p.grad is still scaled
            inv = 1.0 / grad_scale.to(device=device, dtype=acc)
            col_g = col_g * inv * inv
        if kind == "generic":
            return torch.stack([col_n, col_b, col_e, col_s, col_g], dim=1)
        col_r, col_rd = _rounded_away(bucket, params, buf, [decay[pc.j] for pc in bucket], acc)
        torch._foreach_add_(buf, params)  # now w_new + b: w_old * (1 - lr*wd), or w_old (coupled L2)
        col_s = _sq_norms(buf, acc)
        if kind != "adam_l2":
            return torch.stack([col_n, col_b, col_e, col_s, col_g, col_r, col_rd], dim=1)
        col_f = _dots(grads, buf, acc)
        if signs is not None and any(s < 0 for s in signs):
            col_f = col_f * host_to([signs[pc.j] for pc in bucket], acc, device)
        if grad_scale is not None:
            col_f = col_f * inv
        return torch.stack([col_n, col_b, col_e, col_s, col_g, col_f, col_r, col_rd], dim=1)


def _rounded_away(
    bucket: list[Piece],
    params: list[Tensor],
    b: list[Tensor],
    decay: list[float],
    acc: torch.dtype,
    screen: bool | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per piece: how many coordinates' computed change :math:`\Delta = c\,w + (1+c)\,b` storage rounds away
    (``0 < |delta| < half_ulp(w)``), and the sum of their :math:`\Delta^2` (the contract's ``R``, ``RD``).

    :math:`k|\Delta|` is formed with ``k = 2/eps`` of each piece's storage dtype and tested by
    :func:`~lightning_adamw.update_split.backends.rounded_away.exact_sums`; on a CPU only the pieces the screen of
    that module flags are tested (three multi-tensor kernels for the others). ``screen``: ``None`` screens on a
    CPU only; ``False`` tests every piece (the tests compare the two)."""
    storage = [pc.p.dtype for pc in bucket]
    k = [scale_k(s) for s in storage]
    k_delta = torch._foreach_mul(b, [(1.0 + c) * kk for c, kk in zip(decay, k, strict=True)])
    ck = [c * kk for c, kk in zip(decay, k, strict=True)]
    if len(set(ck)) == 1:  # (one group and storage dtype: the usual bucket, one multi-tensor kernel fewer)
        if ck[0] != 0.0:
            torch._foreach_add_(k_delta, params, alpha=ck[0])
    else:
        torch._foreach_add_(k_delta, torch._foreach_mul(params, ck))
    torch._foreach_abs_(k_delta)
    device = params[0].device
    todo = range(len(bucket))
    if screen is None:
        screen = device.type == "cpu"
    if screen:
        margin = torch._foreach_abs(params)
        torch._foreach_sub_(margin, k_delta)  # |w| - k|delta|
        nonempty = [i for i, m in enumerate(margin) if m.numel() > 0]
        tops = torch._foreach_max([margin[i] for i in nonempty])
        todo = [
            i
            for i, top in zip(nonempty, tops, strict=True)
            if not float(top) <= safe_bound(storage[i])  # (NaN: tested)
        ]
    counts = torch.zeros(len(bucket), dtype=acc, device=device)
    squares = torch.zeros(len(bucket), dtype=acc, device=device)
    for i in todo:
        # (params are read again afterwards: the test works on a copy)
        count, square = exact_sums(params[i].reshape(1, -1).clone(), k_delta[i].view(1, -1), storage[i], acc)
        counts[i] = count[0]
        squares[i] = square[0]
    return counts, squares


BACKEND = ForeachBackend()
