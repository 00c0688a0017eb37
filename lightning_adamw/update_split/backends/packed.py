r"""The ``packed`` backend: AdamW sums of all tensors in a few large torch kernels (the CPU path).

The step is rewritten for one division per element (:meth:`SumsRequest.eps_and_scale`):

.. math::

    \eta u = s\,X, \qquad X = \frac{m}{\sqrt{v} + c\,\epsilon}, \quad c = \sqrt{1-\beta_2^t},\
    s = \frac{\eta c}{1-\beta_1^t},

so :math:`B = s^2 \sum X^2`, :math:`E = s \sum w X` and :math:`S = \sum (w + sX)^2`; ``G`` is
:math:`\sum g^2`, and the rounded-away ``R``, ``RD`` compare :math:`k|\Delta|`, :math:`\Delta = c\,w + (1+c)\,sX`,
with the power of two :math:`2^{\lfloor\log_2|w|\rfloor}` read from the weights' exponent bits (:math:`k = 2/\epsilon`
of the storage dtype, a power of two: exact), in float arithmetic only (comparisons into bool tensors and back
measured several times slower on a CPU). Written per tensor, that is a
dozen small kernels per parameter: a model with many small tensors is then dispatch-bound and the monitor costs
many optimizer steps. Here the work is laid out once per plan (:func:`build_layout`) and then done with about
thirty kernels per bucket of ``chunk`` elements, whatever the number of tensors in it:

* tensors are cut into *pieces* (flat views) that never cross a bucket; a bucket's three flat buffers ``x``,
  ``d`` and ``t`` hold each piece from a multiple of ``BLOCK`` elements on, the rest of its last block being
  padding (0), so ``x.view(-1, BLOCK)`` has whole blocks of one piece;
* gathering ``m``, ``v``, ``w`` and ``g`` into the buffers are multi-tensor ``torch._foreach_copy_`` kernels
  over the pieces; everything else (``sqrt``, ``+ c*eps``, ``x / d``, the products) is single kernels on whole
  buffers (when all pieces share their step count, the usual case);
* per-block sums (``vector_norm`` / ``sum`` over dimension 1) then go to per-tensor rows with one
  ``index_add_`` on an index tensor built once: a segmented sum without host synchronisation and without a
  kernel per tensor;
* ``R`` and ``RD`` need about ten passes per block; on a CPU a cheap exact screen first finds the blocks that can
  have a rounded-away coordinate at all (:func:`_rounded_away`), and only those take them.

Block sums are short (``BLOCK`` terms: ``partial_terms``) and the sums over blocks are in the table's dtype, so
the result is as exact as a float64 reduction of the products. Buckets are per compute dtype (the contract's
dtype rule), so the float64 tensors' products are exact. Extra memory: the three buffers, ``3 * chunk`` elements
of the compute dtype per compute dtype (half-precision state is converted while it is gathered), for the time
of one call (kept, they would add to every step's peak memory), plus ``5 * chunk / BLOCK`` block
sums; the chunk is about 1/24 of the parameters' bytes, so the buffers are about 1/16 of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.backends.rounded_away import exact_sums, safe_bound, scale_k
from lightning_adamw.update_split.contract import (
    SUM_COLUMNS,
    Col,
    SumsRequest,
    Tables,
    TensorWork,
    acc_dtype,
    host_to,
)

__all__ = ["BACKEND", "BLOCK", "PackedBucket", "PackedLayout", "adamw_item_sums", "build_layout"]

#: Elements per block of the scratch buffer: the length of the partial sums in the compute dtype.
BLOCK = 512
_MIN_CHUNK = 1 << 18
_MAX_CHUNK = 1 << 24
#: the table columns this backend fills, in the order of ``adamw_item_sums``'s output
_COLUMNS = SUM_COLUMNS["adamw"]
assert _COLUMNS == (Col.N, Col.B, Col.E, Col.S, Col.G, Col.R, Col.RD)
_B, _E, _G = (_COLUMNS.index(c) for c in (Col.B, Col.E, Col.G))


@dataclass
class PackedBucket:
    """One bucket: which slices of which items it holds and where they sit in the scratch buffers."""

    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype
    p: list[Tensor]
    m: list[Tensor]
    v: list[Tensor]
    piece_item: list[int]
    #: ``(start, stop)`` of each piece in its item's flat tensors (to cut the gradients, new at every step)
    piece_range: list[tuple[int, int]]
    split_sizes: list[int]
    padded_numel: int
    #: item of each ``BLOCK`` of the buffers
    block_item_index: Tensor
    #: positions of the padding in the buffers (``None`` when every piece fills its blocks)
    pad_flat_index: Tensor | None
    #: number of padding elements
    pad_numel: int = 0
    #: whether a piece is its whole item (its gradient is then used as it is, not sliced)
    piece_whole: list[bool] = field(default_factory=list)
    #: whether the next call screens the blocks for rounded-away coordinates (:func:`_rounded_away`): not for a
    #: bucket that is mostly padding (small tensors: the screen would cost as much as the test); off while most
    #: blocks need the exact test anyway (bf16 weights), on again when a call finds few blocks that did
    screen: bool = True


def _to_device(values: Sequence[int], device: torch.device) -> Tensor:
    return host_to(list(values), torch.int64, device)


def _pad_index(spans: list[tuple[int, int]], device: torch.device) -> Tensor | None:
    if not spans:
        return None
    positions = torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in spans])
    return positions if device.type == "cpu" else positions.to(device, non_blocking=True)


def build_layout(items: Sequence[TensorWork], chunk: int) -> list[PackedBucket]:
    """Cut ``items`` into buckets of at most ``chunk`` elements (plus padding), per device, dtype and compute
    dtype. A piece's item index is the item's position in ``items``."""
    chunk = max(1, int(chunk))
    open_: dict[tuple[torch.device, torch.dtype, torch.dtype], dict[str, Any]] = {}
    done: list[dict[str, Any]] = []

    def fresh(key: tuple[torch.device, torch.dtype, torch.dtype]) -> dict[str, Any]:
        return {"p": [], "m": [], "v": [], "item": [], "range": [], "sizes": [], "pads": [], "blocks": [],
                "whole": [], "used": 0, "offset": 0, "key": key}  # fmt: skip

    for j, item in enumerate(items):
        n = item.p.numel()
        if n == 0:
            continue
        key = (item.p.device, item.p.dtype, item.compute_dtype)
        start = 0
        while start < n:
            bucket = open_.setdefault(key, fresh(key))
            room = chunk - bucket["used"]
            if room <= 0:
                done.append(bucket)
                bucket = open_[key] = fresh(key)
                room = chunk
            stop = min(n, start + room)
            size = stop - start
            padded = -(-size // BLOCK) * BLOCK
            bucket["p"].append(item.p[start:stop])
            bucket["m"].append(item.m[start:stop])  # type: ignore[index]
            bucket["v"].append(item.v[start:stop])  # type: ignore[index]
            bucket["item"].append(j)
            bucket["range"].append((start, stop))
            offset = bucket["offset"]
            if padded > size:
                bucket["pads"].append((offset + size, offset + padded))
            bucket["offset"] = offset + padded
            bucket["sizes"] += [size, padded - size]
            bucket["whole"].append(size == n)
            bucket["blocks"] += [j] * (padded // BLOCK)
            bucket["used"] += size
            start = stop
    done.extend(b for b in open_.values() if b["p"])
    out = []
    for b in done:
        device, dtype, compute = b["key"]
        out.append(
            PackedBucket(
                device=device,
                dtype=dtype,
                compute_dtype=compute,
                p=b["p"],
                m=b["m"],
                v=b["v"],
                piece_item=b["item"],
                piece_range=b["range"],
                split_sizes=b["sizes"],
                padded_numel=sum(b["sizes"]),
                block_item_index=_to_device(b["blocks"], device),
                pad_flat_index=_pad_index(b["pads"], device),
                pad_numel=sum(b["sizes"][1::2]),
                piece_whole=b["whole"],
                screen=8 * sum(b["sizes"][1::2]) <= sum(b["sizes"]),
            )
        )
    return out


def _per_block(value: float | Tensor, bucket: PackedBucket) -> float | Tensor:
    """A scalar, or a per-item vector gathered to one value per block (a column to broadcast over a block)."""
    if isinstance(value, Tensor):
        return value.index_select(0, bucket.block_item_index).to(bucket.compute_dtype).unsqueeze(1)
    return value


@dataclass
class Buffers:
    """A bucket's three scratch buffers (flat, ``padded_numel`` elements of its compute dtype) and their views of
    its pieces. ``ready()`` gives them with 0 in the padding."""

    x: Tensor
    d: Tensor
    t: Tensor
    xs: list[Tensor]
    ds: list[Tensor]
    ts: list[Tensor]
    #: ``3 x padded_numel`` view of all three
    all: Tensor
    #: whether other buckets use the same memory (then their data may be where this bucket has its padding)
    shared: bool
    pad_flat_index: Tensor | None

    @staticmethod
    def of(bucket: PackedBucket, scratch: Tensor | None = None, shared: bool = False) -> Buffers:
        """Views of ``scratch`` (``3 x >= padded_numel``, zeros when new), or new zeroed buffers."""
        if scratch is None:
            scratch = torch.zeros(3, bucket.padded_numel, dtype=bucket.compute_dtype, device=bucket.device)
        both = scratch[:, : bucket.padded_numel]
        x, d, t = both.unbind(0)
        xs, ds, ts = (list(b.split(bucket.split_sizes)[0::2]) for b in (x, d, t))
        return Buffers(x, d, t, xs, ds, ts, both, shared, bucket.pad_flat_index)

    def ready(self) -> Buffers:
        # (a bucket that has its memory to itself finds the 0 it left in its padding at the last call)
        if self.shared and self.pad_flat_index is not None:
            self.all.index_fill_(1, self.pad_flat_index, 0.0)
        return self


def adamw_item_sums(
    bucket: PackedBucket,
    eps_scaled: float | Tensor,
    scale: float | Tensor,
    decay: float | Tensor,
    grads: Sequence[Tensor],
    out: Tensor,
    buffers: Buffers | None = None,
) -> None:
    r"""Add this bucket's sums per item into ``out`` (``num_items x 7``, in place), in the order of
    ``SUM_COLUMNS["adamw"]``: ``[sum w^2, sum X^2, sum w*X, sum (w + s*X)^2, sum g^2, R, RD]``.

    ``B`` and ``E`` still need the factors :math:`s^2` and :math:`s`, ``G`` the division by a ``GradScaler``'s
    scale; ``R`` and ``RD`` are final (the contract's rounded-away count and squares of
    :math:`\Delta = c\,w + (1 + c)\,sX`). ``X = m / (sqrt(v) + c_2*eps)``. ``eps_scaled`` (``c_2*eps``), ``scale``
    (``s``) and ``decay`` (``c``) are floats when every item shares them, else vectors with one value per item on
    the bucket's device. ``grads``: the current flat gradient of every item of the request. ``buffers``: the
    plan's scratch buffers for this bucket (:class:`Buffers`, left with 0 in the padding); ``None``: new ones.

    Three flat buffers hold the pieces at the same padded offsets: ``x`` = :math:`X`, ``t`` = :math:`w`, ``d``
    the quantity of the moment. Only the gathering of the inputs goes piece by piece (multi-tensor copies);
    everything else is one kernel on a whole buffer, seen as ``blocks x BLOCK``.
    """
    buf = buffers.ready() if buffers is not None else Buffers.of(bucket)
    x, d, t = buf.x, buf.d, buf.t
    x_blocks, d_blocks, t_blocks = x.view(-1, BLOCK), d.view(-1, BLOCK), t.view(-1, BLOCK)
    acc = out.dtype
    torch._foreach_copy_(buf.xs, bucket.m)  # (converts half-precision state to the compute dtype on the way)
    torch._foreach_copy_(buf.ds, bucket.v)
    d.sqrt_()
    # the padding is 0: in d it becomes c*eps > 0, so x / d stays 0 there and a block sums only its own piece
    # (without eps, d's padding is set to 1)
    d_blocks.add_(_per_block(eps_scaled, bucket))
    if bucket.pad_flat_index is not None and not (isinstance(eps_scaled, float) and eps_scaled > 0.0):
        d.index_fill_(0, bucket.pad_flat_index, 1.0)
    x.div_(d)  # X (0 in the padding)
    sq = torch.linalg.vector_norm(x_blocks, dim=1).to(acc).square_()
    torch._foreach_copy_(buf.ts, bucket.p)  # w
    weight = torch.linalg.vector_norm(t_blocks, dim=1).to(acc).square_()
    torch.mul(x, t, out=d)
    dot = d_blocks.sum(dim=1).to(acc)
    # w_new + s*X: the update torch subtracted, added back (padding: 0)
    if isinstance(scale, Tensor):
        torch.addcmul(t_blocks, x_blocks, _per_block(scale, bucket), out=d_blocks)  # type: ignore[arg-type]
    else:
        torch.add(t, x, alpha=scale, out=d)
    before = torch.linalg.vector_norm(d_blocks, dim=1).to(acc).square_()
    # The computed change delta = c*w + (1 + c)*s*X, times k = 2/eps of the storage dtype (a power of two, so
    # exact): k*|delta| compares with the power of two 2^floor(log2|w|) = k * half_ulp(w), read from w's bits.
    k = scale_k(bucket.dtype)
    torch.mul(x_blocks, _per_block(scale * (1.0 + decay) * k, bucket), out=d_blocks)
    if isinstance(decay, Tensor):
        d_blocks.addcmul_(t_blocks, _per_block(decay * k, bucket))  # type: ignore[arg-type]
    elif decay != 0.0:
        d.add_(t, alpha=decay * k)
    d.abs_()
    lost, lost_sq = _rounded_away(bucket, x, d, t, acc)  # (x is scratch from here on)
    # the gradient, cut like the weights (x's padding is 0 again)
    pieces = zip(bucket.piece_item, bucket.piece_range, bucket.piece_whole, strict=True)
    torch._foreach_copy_(buf.xs, [grads[j] if whole else grads[j][a:b] for j, (a, b), whole in pieces])
    grad_sq = torch.linalg.vector_norm(x_blocks, dim=1).to(acc).square_()
    out.index_add_(
        0, bucket.block_item_index, torch.stack([weight, sq, dot, before, grad_sq, lost, lost_sq], dim=1)
    )


#: a bucket tests its flagged blocks one by one up to this share of its blocks, else all its blocks
_FLAGGED_SHARE = 16


def _rounded_away(
    bucket: PackedBucket, x: Tensor, d: Tensor, t: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    r"""Per block, ``R`` and ``RD`` (in ``acc``) from ``d`` = :math:`k|\Delta|` and ``t`` = :math:`w` (whole
    buffers, 0 in the padding), with ``x`` as scratch. Afterwards all three hold garbage, with 0 in the padding.

    On a CPU the blocks are first screened (:mod:`~lightning_adamw.update_split.backends.rounded_away`: three
    passes) and the exact test runs on copies of the flagged blocks only; when more than one block in
    ``_FLAGGED_SHARE`` is flagged (bf16 weights, float32 at a tiny learning rate) it runs on every block, and
    the next calls skip the screen until one finds few blocks with a rounded-away coordinate. On other devices
    (the flags would have to reach the host) and in buckets that are mostly padding (small tensors: the screen
    would cost as much as the test) every block takes the exact test."""
    d_blocks, t_blocks = d.view(-1, BLOCK), t.view(-1, BLOCK)
    num_blocks = d_blocks.shape[0]
    few = max(1, num_blocks // _FLAGGED_SHARE)
    cpu = bucket.device.type == "cpu"
    if cpu and bucket.screen:
        torch.sub(t.abs_(), d, out=x)  # |w| - k|delta| (|w| has w's exponent bits)
        pad = bucket.pad_flat_index
        if pad is not None:  # (the padding, w = delta = 0, is no reason to flag)
            x.index_fill_(0, pad, -math.inf)
        top = x.view(-1, BLOCK).amax(dim=1)
        if pad is not None:
            x.index_fill_(0, pad, 0.0)
        flagged = (top <= safe_bound(bucket.dtype)).logical_not_().nonzero().flatten()
        if flagged.numel() <= few:
            lost = torch.zeros(num_blocks, dtype=acc, device=d.device)
            lost_sq = torch.zeros(num_blocks, dtype=acc, device=d.device)
            if flagged.numel() > 0:
                some_lost, some_sq = exact_sums(
                    t_blocks.index_select(0, flagged), d_blocks.index_select(0, flagged), bucket.dtype, acc
                )
                lost.index_copy_(0, flagged, some_lost)
                lost_sq.index_copy_(0, flagged, some_sq)
            return lost, lost_sq
        bucket.screen = False
    lost, lost_sq = exact_sums(t_blocks, d_blocks, bucket.dtype, acc)
    if cpu and 8 * bucket.pad_numel <= bucket.padded_numel:  # few blocks lost something: screening pays again
        bucket.screen = int(torch.count_nonzero(lost)) <= few
    return lost, lost_sq


@dataclass
class PackedLayout:
    """What the packed backend keeps for a plan: the buckets, and per device the rows and replica weights."""

    buckets: list[PackedBucket]
    num_items: int
    #: per device: the row of each item (items of other devices add zeros) and the weights column (or None)
    rows: dict[torch.device, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    #: per bucket, its scratch buffers during a call: views of one ``3 x`` (largest bucket) tensor per device and
    #: compute dtype, shared by the buckets, dropped at the end of the call (see ``add_sums``).
    buffers: list[Buffers] = field(default_factory=list)

    def all_buffers(self) -> list[Buffers]:
        if not self.buffers:
            scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
            keys = [(b.device, b.compute_dtype) for b in self.buckets]
            for b, key in zip(self.buckets, keys, strict=True):
                if key not in scratch:
                    size = max(o.padded_numel for o, k in zip(self.buckets, keys, strict=True) if k == key)
                    scratch[key] = torch.zeros(3, size, dtype=b.compute_dtype, device=b.device)
            self.buffers = [
                Buffers.of(b, scratch[key], shared=keys.count(key) > 1)
                for b, key in zip(self.buckets, keys, strict=True)
            ]
        return self.buffers


class PackedBackend:
    name = "packed"
    kinds = frozenset({"adamw"})
    partial_terms = BLOCK
    fallible = False

    def accepts(self, item: TensorWork) -> bool:
        return True

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> PackedLayout:
        if chunk_numel is not None:
            chunk = max(1, int(chunk_numel))
        else:
            # Three float32 scratch buffers of `chunk` elements: 1/16 of the parameters' bytes in all, but at
            # least 1 MiB each (fewer, larger kernels for a small model, whose extra megabytes do not matter).
            total = sum(it.p.numel() * it.p.element_size() for it in items)
            chunk = int(min(max(total // 192, _MIN_CHUNK), _MAX_CHUNK))
        layout = PackedLayout(buckets=build_layout(items, chunk), num_items=len(items))
        weights = [it.weight for it in items]
        for device in dict.fromkeys(b.device for b in layout.buckets):
            rows = host_to([it.row for it in items], torch.int64, device)
            column = (
                host_to(weights, acc_dtype(device), device).unsqueeze(1)
                if any(w != 1.0 for w in weights)
                else None
            )
            layout.rows[device] = (rows, column)
        return layout

    def add_sums(self, prepared: PackedLayout, request: SumsRequest, tables: Tables) -> None:
        per_device: dict[torch.device, tuple[Tensor, Any, Any, Any]] = {}
        try:
            self._add_buckets(prepared, request, per_device)
        except BaseException:
            prepared.buffers = []  # (their padding may not be 0 any more)
            raise
        # Not kept between calls: held, they would add their size to every training step's peak memory (measured
        # +6 % of the parameters' bytes on a CPU), for about a tenth of a call saved.
        prepared.buffers = []
        for dev, (out, _, scale, _) in per_device.items():
            out[:, _B].mul_(scale).mul_(scale)  # B = s^2 sum X^2, E = s sum w X
            out[:, _E].mul_(scale)
            if request.grad_scale is not None:  # fused optimizer + GradScaler: p.grad is still scaled
                out[:, _G].div_(request.grad_scale.to(device=dev, dtype=out.dtype).square())
            rows, weights = prepared.rows[dev]
            tables.add(dev, rows, _COLUMNS, out if weights is None else out * weights)

    @staticmethod
    def _add_buckets(
        prepared: PackedLayout,
        request: SumsRequest,
        per_device: dict[torch.device, tuple[Tensor, Any, Any, Any]],
    ) -> None:
        """Every bucket's unscaled sums into ``per_device[device][0]`` (made here, with the device's scalars)."""
        shared = request.shared_eps_and_scale()
        decay_shared = request.shared_decay_coefficient()
        grads = [g for part in request.parts for g in (part.grads or ())]
        for bucket, buffers in zip(prepared.buckets, prepared.all_buffers(), strict=True):
            dev = bucket.device
            if dev not in per_device:
                eps, scale = shared if shared is not None else request.eps_and_scale_vectors(dev)
                decay: Any = decay_shared
                if decay is None:
                    decay = host_to(request.decay_coefficients(), acc_dtype(dev), dev)
                per_device[dev] = (
                    torch.zeros(prepared.num_items, len(_COLUMNS), dtype=acc_dtype(dev), device=dev),
                    eps,
                    scale,
                    decay,
                )
            out, eps, scale, decay = per_device[dev]
            if isinstance(decay, Tensor):
                # a bucket holds tensors of one dtype, mostly of one group (decay and no_decay groups differ):
                # a host float then, which is cheaper than a vector broadcast per block
                coefficients = request.decay_coefficients()
                in_bucket = {coefficients[j] for j in bucket.piece_item}
                if len(in_bucket) == 1:
                    decay = in_bucket.pop()
            adamw_item_sums(bucket, eps, scale, decay, grads, out, buffers)


BACKEND = PackedBackend()
