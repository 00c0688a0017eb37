r"""Per-tensor sums of an AdamW step in a few large kernels: the fast path of :mod:`lightning_adamw.update_split`.

For a decoupled (AdamW) group, every metric of the monitor is a closed-form function of four sums per tensor
(see :func:`lightning_adamw.update_split.derive_metrics`), with

.. math::

    N = \|w_{new}\|^2, \qquad B = \|\eta u\|^2, \qquad E = \langle w_{new}, \eta u\rangle, \qquad
    \eta u = \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
           = s\,\frac{m}{\sqrt{v} + c\,\epsilon}, \quad c = \sqrt{1-\beta_2^t},\ s = \frac{\eta c}{1-\beta_1^t}

and :math:`S = \|w_{new} + \eta u\|^2` (that is :math:`N + 2E + B`, but formed elementwise: from the sums it
would cancel to rounding noise for a weight that was zero before the step). Written per tensor, that is a dozen
small kernels per parameter and, on an accelerator, one launch each: a model with many small tensors is then
launch-bound and the monitor costs many optimizer steps. Here the work is laid out once per optimizer
(:func:`build_layout`, cached by the caller) and then done with about twenty kernels per bucket of ``chunk``
elements, whatever the number of tensors in it:

* tensors are cut into *pieces* (flat views) that never cross a bucket; a bucket owns two flat buffers ``x``
  and ``d`` in which each piece starts on a multiple of ``BLOCK`` elements, the rest of its last block being
  padding, so ``x.view(-1, BLOCK)`` has whole blocks of one piece;
* gathering ``m`` into ``x`` and ``v`` into ``d`` and the products with the weights are multi-tensor
  ``torch._foreach_*`` kernels over the pieces; ``sqrt``, ``+ c*eps``, ``x / d``, ``s * x`` are single kernels
  on the whole buffer (when all pieces share their step count, the usual case);
* per-block sums (``vector_norm`` / ``sum`` over dimension 1) then go to per-tensor rows with one
  ``index_add_`` on an index tensor built once: a segmented sum without host synchronisation and without a
  kernel per tensor.

Block sums are short (``BLOCK`` elements) and the sums over blocks are float64 (float32 on MPS), so the result is
as exact as a float64 reduction of the float32 products, without a float64 copy of anything. Pieces marked
``exact`` go to float64 buckets, where the products themselves are exact: the caller marks 1-D tensors (biases,
norm gains), where an update nearly parallel to the weight (grown from zero by updates of one sign) makes the
angle's :math:`B - E^2/N` cancel; they are a small share of any model.

Extra memory: the two buffers, ``2 * chunk`` elements of the compute dtype (float32 for half-precision
parameters, whose state is converted while it is gathered), plus ``4 * chunk / BLOCK`` block sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK", "PackedBucket", "PieceSource", "adamw_item_sums", "build_layout"]

#: Elements per block of the scratch buffer: the length of the float32 partial sums.
BLOCK = 512


@dataclass
class PieceSource:
    """The flat tensors of one updated parameter: weights, ``exp_avg``, the denominator's ``v`` (local shards)."""

    item: int
    p: Tensor
    m: Tensor
    v: Tensor
    #: form the products in float64 (1-D tensors, small models; see the module docstring)
    exact: bool = False
    #: row of the result table the fused kernel adds into (``item`` when negative) and the replica weight it
    #: multiplies by (:mod:`lightning_adamw.triton_sums`; the torch path leaves both to its caller)
    row: int = -1
    weight: float = 1.0


@dataclass
class PackedBucket:
    """One bucket: which slices of which tensors it holds and where they sit in the scratch buffer."""

    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype
    p: list[Tensor]
    m: list[Tensor]
    v: list[Tensor]
    piece_item: list[int]
    split_sizes: list[int]
    padded_numel: int
    #: item of each ``BLOCK`` of the buffers
    block_item_index: Tensor
    #: positions of the padding in the buffers (``None`` when every piece fills its blocks)
    pad_flat_index: Tensor | None


def _compute_dtype(dtype: torch.dtype, exact: bool) -> torch.dtype:
    if exact:
        return torch.float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _exact(src: PieceSource) -> bool:
    # MPS has no float64; float64 parameters are exact already.
    return src.exact and src.p.device.type != "mps" and src.p.dtype != torch.float64


def _to_device(values: Sequence[int], device: torch.device) -> Tensor:
    t = torch.tensor(list(values), dtype=torch.int64)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _pad_index(spans: list[tuple[int, int]], device: torch.device) -> Tensor | None:
    if not spans:
        return None
    positions = torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in spans])
    return positions if device.type == "cpu" else positions.to(device, non_blocking=True)


def build_layout(sources: Sequence[PieceSource], chunk: int) -> list[PackedBucket]:
    """Cut ``sources`` into buckets of at most ``chunk`` elements (plus padding), per device and dtype."""
    chunk = max(1, int(chunk))
    open_: dict[tuple[torch.device, torch.dtype, bool], dict[str, list]] = {}
    done: list[dict[str, list]] = []

    def fresh(key: tuple[torch.device, torch.dtype, bool]) -> dict[str, Any]:
        return {
            "p": [],
            "m": [],
            "v": [],
            "item": [],
            "sizes": [],
            "pads": [],
            "blocks": [],
            "used": [0],
            "offset": [0],
            "key": key,
        }

    for src in sources:
        n = src.p.numel()
        if n == 0:
            continue
        key = (src.p.device, src.p.dtype, _exact(src))
        start = 0
        while start < n:
            bucket = open_.setdefault(key, fresh(key))
            room = chunk - bucket["used"][0]
            if room <= 0:
                done.append(bucket)
                bucket = open_[key] = fresh(key)
                room = chunk
            stop = min(n, start + room)
            size = stop - start
            padded = -(-size // BLOCK) * BLOCK
            bucket["p"].append(src.p[start:stop])
            bucket["m"].append(src.m[start:stop])
            bucket["v"].append(src.v[start:stop])
            bucket["item"].append(src.item)
            offset = bucket["offset"][0]
            if padded > size:
                bucket["pads"].append((offset + size, offset + padded))
            bucket["offset"][0] = offset + padded
            bucket["sizes"] += [size, padded - size]
            bucket["blocks"] += [src.item] * (padded // BLOCK)
            bucket["used"][0] += size
            start = stop
    done.extend(b for b in open_.values() if b["p"])
    out = []
    for b in done:
        device, dtype, exact = b["key"]
        out.append(
            PackedBucket(
                device=device,
                dtype=dtype,
                compute_dtype=_compute_dtype(dtype, exact),
                p=b["p"],
                m=b["m"],
                v=b["v"],
                piece_item=b["item"],
                split_sizes=b["sizes"],
                padded_numel=sum(b["sizes"]),
                block_item_index=_to_device(b["blocks"], device),
                pad_flat_index=_pad_index(b["pads"], device),
            )
        )
    return out


def _per_block(value: float | Tensor, bucket: PackedBucket) -> float | Tensor:
    """A scalar, or a per-item vector gathered to one value per block (a column to broadcast over a block)."""
    if isinstance(value, Tensor):
        return value.index_select(0, bucket.block_item_index).to(bucket.compute_dtype).unsqueeze(1)
    return value


def adamw_item_sums(
    bucket: PackedBucket, eps_scaled: float | Tensor, scale: float | Tensor, out: Tensor
) -> None:
    r"""Add this bucket's ``[sum X^2, sum w*X, sum (w + s*X)^2, sum w^2]`` per item into ``out`` (in place).

    ``X = m / (sqrt(v) + c*eps)``. ``eps_scaled`` (``c*eps``) and ``scale`` (``s``) are floats when every item
    shares them (the same ``step``), else vectors with one value per item on the bucket's device (steps that
    differ, or capturable/fused optimizers that computed their corrections on the device). ``out`` is
    ``num_items x 4``. The third sum is :math:`\|w_{new} + \eta u\|^2` computed elementwise: from the others it
    would cancel to rounding noise exactly where it matters, for a weight that was zero before the step.

    Two flat buffers ``x`` and ``d`` hold the pieces at the same padded offsets. Only gathering the inputs and
    the products with the weights go piece by piece (multi-tensor kernels); everything else is one kernel on the
    whole buffer, seen as ``blocks x BLOCK``.
    """
    cdt = bucket.compute_dtype
    p = bucket.p
    # One zeroed allocation for both buffers: the padding must be 0 in x, and in d it becomes c*eps > 0 below,
    # so x / d stays 0 there and a block sums only its own piece (without eps, d's padding is set to 1).
    both = torch.zeros(2, bucket.padded_numel, dtype=cdt, device=bucket.device)
    x, d = both[0], both[1]
    xs = list(x.split(bucket.split_sizes)[0::2])
    ds = list(d.split(bucket.split_sizes)[0::2])
    x_blocks, d_blocks = x.view(-1, BLOCK), d.view(-1, BLOCK)
    torch._foreach_copy_(xs, bucket.m)  # (converts half-precision state to the compute dtype on the way)
    torch._foreach_copy_(ds, bucket.v)
    d.sqrt_()
    d_blocks.add_(_per_block(eps_scaled, bucket))
    if bucket.pad_flat_index is not None and not (isinstance(eps_scaled, float) and eps_scaled > 0.0):
        d.index_fill_(0, bucket.pad_flat_index, 1.0)
    x.div_(d)  # X (0 in the padding); d is free again
    acc = out.dtype
    sq = torch.linalg.vector_norm(x_blocks, dim=1).to(acc).square_()
    # w_new + s*X: the update torch subtracted, added back (padding stays 0 from here on)
    torch.mul(x_blocks, _per_block(scale, bucket), out=d_blocks)
    torch._foreach_add_(ds, p)
    before = torch.linalg.vector_norm(d_blocks, dim=1).to(acc).square_()
    torch._foreach_copy_(ds, p)
    weight = torch.linalg.vector_norm(d_blocks, dim=1).to(acc).square_()
    torch._foreach_mul_(xs, p)
    dot = x_blocks.sum(dim=1).to(acc)
    out.index_add_(0, bucket.block_item_index, torch.stack([sq, dot, before, weight], dim=1))
