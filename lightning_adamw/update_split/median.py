r"""Stage 3b (Adam + coupled L2 only): min, max and median of the per-coordinate denominators
:math:`\sqrt{\hat v} + \epsilon` of each group, for the ``eff_decay_rate_*`` metrics.

With L2 inside Adam the decay of coordinate :math:`i` is :math:`\eta\lambda / (\sqrt{\hat v_i} + \epsilon)`, so
its spread is the spread of the denominators (Loshchilov & Hutter, 2019, why AdamW decouples the decay). The
denominators are rebuilt bucket by bucket exactly as torch computes them
(:func:`~lightning_adamw.update_split.backends.foreach.denominators`); the memory stays bounded by one chunk, and
the counts can be summed across shards.

The median is found by iterative histogram refinement in log space: each pass bins :math:`\log d` of every
coordinate into ``_HIST_BINS`` bins between ``lo`` and ``hi`` (device tensors, no host sync), finds the bin that
holds the wanted rank and narrows ``[lo, hi]`` to it. Three passes of 1024 bins narrow the range by 1e9, i.e.
to float rounding. The rank is the one ``torch.median`` returns for the decay *rates* (the lower median of the
rates is the upper median of the denominators).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_adamw.update_split.backends.foreach import buckets, denominators
from lightning_adamw.update_split.contract import StepScalars, acc_dtype, auto_chunk
from lightning_adamw.update_split.reduce import ShardReduce
from lightning_adamw.update_split.state import GroupWork

__all__ = ["denominator_stats"]

_HIST_BINS = 1024
_HIST_PASSES = 3


def _entries(values: Sequence[object] | Tensor) -> list[object]:
    return list(values.unbind(0)) if isinstance(values, Tensor) else list(values)


def denominator_stats(
    works: Sequence[GroupWork],
    scalars: Sequence[StepScalars],
    device: torch.device,
    reduce: ShardReduce | None,
    chunk_numel: int | None = None,
) -> Tensor | None:
    """``(min, max, median)`` of the denominators of every coupled-L2 group (rows in ``coupled_index`` order),
    on ``device`` in :func:`~lightning_adamw.update_split.contract.acc_dtype`; ``None`` when there is none."""
    coupled = [
        (w, _entries(sc.bc2_sqrt), [sc.eps] * len(w.items))
        for w, sc in zip(works, scalars, strict=True)
        if w.kind == "adam_l2"
    ]
    if not coupled:
        return None
    adt = acc_dtype(device)
    chunk = auto_chunk(
        [it.p.numel() for w, _, _ in coupled for it in w.items],
        chunk_numel,
        lo=1 << 16,
        hi=1 << 24,
        divisor=16,
    )
    # (-min, max) per group: one MAX all-reduce for both
    minmax = torch.full((len(coupled), 2), -math.inf, dtype=adt, device=device)
    for w, bc2, eps in coupled:
        for bucket in buckets(w.items, chunk):
            nonempty = [d for d in denominators(bucket, bc2, eps) if d.numel() > 0]
            if nonempty:
                lo = torch.stack([d.amin() for d in nonempty]).min()
                hi = torch.stack([d.amax() for d in nonempty]).max()
                minmax[w.coupled_index] = torch.maximum(
                    minmax[w.coupled_index], torch.stack([-lo, hi]).to(minmax)
                )
    if reduce is not None:
        reduce.all_reduce(minmax, "max")
    lo, hi = torch.log(-minmax[:, 0]), torch.log(minmax[:, 1])
    for _ in range(_HIST_PASSES):
        counts = torch.zeros(len(coupled), _HIST_BINS + 2, dtype=adt, device=device)
        width = (hi - lo).clamp_min(1e-300) / _HIST_BINS
        for w, bc2, eps in coupled:
            ci = w.coupled_index
            for bucket in buckets(w.items, chunk):
                bdev = bucket[0].p.device
                lo_d, width_d = lo[ci].to(bdev), width[ci].to(bdev)
                row = torch.zeros(_HIST_BINS + 2, dtype=adt, device=bdev)
                for piece, x in zip(bucket, denominators(bucket, bc2, eps), strict=True):
                    if x.numel() == 0:
                        continue
                    # In place on the chunk buffer: bin = floor((log d - lo) / width) in [-1, B], shifted by one
                    # so that 0 counts "below lo" and B+1 "above hi"; NaN goes above (and shows in min/max).
                    x.log_().nan_to_num_(nan=math.inf).sub_(lo_d).div_(width_d).floor_().clamp_(
                        -1, _HIST_BINS
                    )
                    idx = x.add_(1).long()
                    src = torch.full((), piece.item.weight, dtype=adt, device=bdev).expand(idx.numel())
                    row.scatter_add_(0, idx, src)
                counts[ci] += row.to(device)
        if reduce is not None:
            reduce.all_reduce(counts, "sum")
        total = counts.sum(dim=1)
        rank = (total - 1.0) - torch.floor((total - 1.0) / 2.0)
        cum = counts.cumsum(dim=1)
        # first position whose cumulative count exceeds the rank; position 0 is "below lo"
        pos = (cum <= rank.unsqueeze(1)).sum(dim=1)
        b = (pos - 1).clamp(0, _HIST_BINS - 1).to(adt)
        lo = lo + b * width
        hi = lo + width
    return torch.stack([-minmax[:, 0], minmax[:, 1], torch.exp((lo + hi) / 2.0)], dim=1)
