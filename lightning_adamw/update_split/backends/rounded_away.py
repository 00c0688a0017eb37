r"""The rounded-away sums ``R`` and ``RD`` of the contract, in float arithmetic, for the torch backends.

A coordinate is rounded away when :math:`0 < k|\Delta| < P`, with :math:`k = 2/\epsilon_s` of the storage dtype
(a power of two) and :math:`P = k\,h = \max(2^{\lfloor\log_2|w|\rfloor}, t_s)`, :math:`t_s` the storage dtype's
smallest normal number (:func:`~lightning_adamw.update_split.contract.half_ulp`). :func:`exact_sums` applies the
test itself: about ten passes over the data. Almost no coordinate of a float32 model is near the threshold, so
:func:`safe_bound` gives an exact, cheap *screen*: :math:`P \le |w| + t_s`, so a coordinate with
:math:`k|\Delta| > |w| + t_s` is not rounded away; rounding to nearest is monotone and :math:`-2t_s` is
representable, so ``fl(|w| - k|Δ|) <= -2 t_s`` implies :math:`|w| - k|\Delta| < -t_s`. A block (``packed``) or
a piece (``foreach``) whose largest ``fl(|w| - k|Δ|)`` is at most ``safe_bound`` has ``R = RD = 0``, exactly what
the test gives (a NaN fails the comparison; :math:`\Delta = 0` or a coordinate within about a factor of two of
the threshold flags its block or piece: only the speed depends on that). The screen needs its flags on the host,
so only CPU tensors are screened.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_adamw.update_split.contract import EXPONENT_BITS, storage_spacing

__all__ = ["exact_sums", "safe_bound", "scale_k"]


def scale_k(storage: torch.dtype) -> float:
    """:math:`k = 2/\\epsilon_s`: ``k * |delta|`` compares with the power of two ``k * half_ulp(w)``."""
    return 2.0 / storage_spacing(storage)[0]


def safe_bound(storage: torch.dtype) -> float:
    """``-2 t_s``: where the largest ``fl(|w| - k|delta|)`` of a block is at most this, nothing in it is rounded
    away (see the module docstring)."""
    return -2.0 * storage_spacing(storage)[1]


def exact_sums(w: Tensor, k_delta: Tensor, storage: torch.dtype, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Per row of the 2-D tensors ``w`` (:math:`w` or :math:`|w|`) and ``k_delta`` (:math:`k|\Delta|`), both in
    a compute dtype (float32 or float64) and 0 in any padding: ``R``, the count of :math:`0 < k|\Delta| < P`, and
    ``RD``, :math:`\sum\Delta^2` over them, as ``acc`` vectors. :math:`P` is read from ``w``'s exponent bits
    (exact). In place: both hold garbage afterwards, with 0 where both were 0.

    Float arithmetic only: comparisons into bool tensors and back measured several times slower on a CPU."""
    eps_s, tiny_s = storage_spacing(storage)
    int_dtype, mask = EXPONENT_BITS[w.dtype]
    w.view(int_dtype).bitwise_and_(mask)  # 2^floor(log2|w|); 0 below the compute dtype's normal range
    w.clamp_min_(tiny_s)  # k * half the subnormal spacing (also at w = 0)
    w.sub_(k_delta).sign_().clamp_min_(0.0)  # 1 where k*|delta| < P, else 0 (a tie is kept)
    k_delta.mul_(w)  # k*|delta| where storage rounds it away (or delta = 0), else 0
    lost_sq = torch.linalg.vector_norm(k_delta, dim=1).to(acc).square_().mul_((0.5 * eps_s) ** 2)
    torch.sign(k_delta, out=w)  # 1 where rounded away and delta != 0
    return w.sum(dim=1).to(acc), lost_sq
