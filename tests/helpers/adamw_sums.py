r"""Float64 references and derived error bounds for the four per-tensor AdamW sums of the monitor.

Both X-form backends (:mod:`lightning_adamw.update_split.backends.packed`, torch kernels; ``backends.triton``, one
fused Triton kernel) compute, per tensor, with :math:`X = m / (\sqrt v + c\epsilon)`:

=======  ===========================  ==============================================
column   sum                          terms whose absolute values bound the error
=======  ===========================  ==============================================
``xx``   :math:`\sum X^2`             :math:`X^2`
``wx``   :math:`\sum w X`             :math:`|w X|` (mixed signs: the sum may cancel)
``s``    :math:`\sum (w + sX)^2`      :math:`(|w| + |sX|)^2` (the error of :math:`w + sX` is relative to that)
``ww``   :math:`\sum w^2`             :math:`w^2`
=======  ===========================  ==============================================

in a compute dtype (float32 for float32 / bfloat16 / float16 tensors, whose values convert to float32 exactly;
float64 for float64 tensors and for the entries marked ``exact``), then add the partial sums in float64. The
bounds below count, per term, the roundings of the elementwise arithmetic and the additions each term goes
through (:mod:`tests.helpers.tolerance`), relative to the sum of the absolute terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.helpers.tolerance import SAFETY, two_level_sum_bound

__all__ = [
    "COLUMNS",
    "FUSED",
    "PACKED",
    "Arithmetic",
    "SumsReference",
    "bounds",
    "reference",
    "without_largest",
]

#: Column order of :func:`reference`, :func:`bounds` and :func:`without_largest`.
COLUMNS = ("xx", "wx", "s", "ww")


@dataclass(frozen=True)
class Arithmetic:
    """Roundings per term and summation depth of one implementation (see the module docstring)."""

    #: roundings of ``X``: ``c*eps`` cast to the compute dtype, ``sqrt``, ``+``, ``/``
    x: int
    #: roundings of one sqrt / one division (1 when correctly rounded; 4 covers CUDA's 2-ulp approximations)
    sqrt_div: int
    #: extra roundings of a squared norm read back from ``vector_norm`` (its final sqrt, squared again)
    norm_sqrt: int

    def per_term(self, column: str) -> int:
        x = self.x + 2 * (self.sqrt_div - 1)  # sqrt and div each count sqrt_div roundings
        if column == "xx":
            return 2 * x + 1 + self.norm_sqrt  # X carries x roundings, X*X doubles them, + the square
        if column == "wx":
            return x + 1  # + the product
        if column == "s":
            # s*X: X, the cast of s, the product; + w: one more; |y'^2 - y^2| <= 2 gamma_k a^2 + ..., + the square
            return 2 * (x + 3) + 1 + self.norm_sqrt
        return 1 + self.norm_sqrt  # w*w


#: torch kernels (correctly rounded), squared norms from ``vector_norm`` (sqrt then square: 2 roundings)
PACKED = Arithmetic(x=4, sqrt_div=1, norm_sqrt=2)
#: the Triton kernel: plain products accumulated, but sqrt / division may be CUDA's approximations (≤ 2 ulp)
FUSED = Arithmetic(x=4, sqrt_div=4, norm_sqrt=0)


@dataclass
class SumsReference:
    """Float64 sums and the sums of their absolute terms, per column (``COLUMNS``), and the terms themselves."""

    sums: list[float]
    abs_sums: list[float]
    terms: list[torch.Tensor]
    numel: int


def reference(
    p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, eps_scaled: float, scale: float
) -> SumsReference:
    """The four sums in float64 from the very inputs the kernel read (converted exactly)."""
    p, m, v = (t.detach().cpu().double().reshape(-1) for t in (p, m, v))
    x = m / (v.sqrt() + eps_scaled)
    terms = [x * x, p * x, (p + scale * x) ** 2, p * p]
    abs_terms = [x * x, (p * x).abs(), (p.abs() + (scale * x).abs()) ** 2, p * p]
    return SumsReference(
        sums=[float(t.sum()) for t in terms],
        abs_sums=[float(t.sum()) for t in abs_terms],
        terms=terms,
        numel=p.numel(),
    )


def bounds(
    ref: SumsReference,
    arithmetic: Arithmetic,
    compute_dtype: torch.dtype,
    *,
    inner_terms: int,
    outer_terms: int,
) -> list[float]:
    """Absolute error bounds per column: ``inner_terms`` terms at most are added in ``compute_dtype`` (any order)
    before their partial sum goes to float64, where at most ``outer_terms`` additions / scalings follow.
    Times :data:`~tests.helpers.tolerance.SAFETY`."""
    depth = max(min(inner_terms, ref.numel) - 1, 0)
    return [
        SAFETY
        * two_level_sum_bound(
            abs_sum,
            inner_depth=depth,
            inner_dtype=compute_dtype,
            outer_terms=outer_terms,
            per_term=arithmetic.per_term(column),
        )
        for column, abs_sum in zip(COLUMNS, ref.abs_sums, strict=True)
    ]


def without_largest(ref: SumsReference) -> list[float]:
    """Each column's float64 sum with its largest term (in absolute value) left out: a wrong result that a
    meaningful bound must reject (NaN for an empty tensor)."""
    out = []
    for t in ref.terms:
        if t.numel() == 0:
            out.append(math.nan)
            continue
        out.append(float(t.sum() - t[t.abs().argmax()]))
    return out
