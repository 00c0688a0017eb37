r"""The CPU kernel of the ``numba`` backend (imported only when that backend runs: it imports Numba).

One compiled loop reads :math:`w`, :math:`m`, :math:`v` and :math:`g` of each element once, straight from the
optimizer's tensors (addresses in a table, no copies), and adds the seven AdamW sums of the contract
(:data:`~lightning_adamw.update_split.contract.SUM_COLUMNS`) of each *piece* (a slice of one tensor) into its row of
``out``, everything in float64:

.. math::

    X = \frac{m}{\sqrt v + c_2\epsilon},\quad b = sX,\quad \Delta = c\,w + (1+c)\,sX,\qquad
    N = \sum w^2,\ B = \sum b^2,\ E = \sum w b,\ S = \sum (w+b)^2,\ G = \sum g^2,

and ``R``, ``RD``: the count and :math:`\sum\Delta^2` of the coordinates with :math:`0 < k|\Delta| < P`,
:math:`P = \max(2^{\lfloor\log_2|w|\rfloor}, t_s)` read from the exponent bits of :math:`w` (exact: every float32,
bfloat16 and float16 value is a normal float64) and compared as bit patterns (positive floats order as their bits;
a NaN is never counted). Half-precision elements are widened bit-exactly in the loop (``bfloat16``: the 16 bits
shifted into a float32; ``float16``: LLVM's ``fpext``).

Why the flags: Numba's default error model checks every division for zero (Python raises there), and a loop with
a branch is not vectorised; ``error_model="numpy"`` gives IEEE results instead (inf, NaN), as torch does.
``fastmath={"reassoc", "nsz"}`` lets LLVM keep the seven sums in vector accumulators (their order of addition is
then by lanes, whose error bound is that of any order of a float64 sum); it does not allow approximate division,
square roots or reciprocals, nor assume that no NaN or infinity occurs.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["adamw_piece_sums", "element_type"]

_EXPONENT = 0x7FF0000000000000


@intrinsic
def _pointer(typingctx: Any, address: Any, like: Any) -> Any:
    """``address`` (an int64) as a pointer to elements of the dtype of the array ``like``."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(like.dtype).as_pointer())

    return sig, codegen


@intrinsic
def _widen(typingctx: Any, x: Any) -> Any:
    """One element as a float64, bit-exactly: float32, float64, bfloat16 (its bits as int16), float16 (its bits
    as uint16)."""
    if x not in (types.float32, types.float64, types.int16, types.uint16):
        return None
    sig = types.float64(x)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        (value,) = args
        double = ir.DoubleType()
        if x == types.float64:
            return value
        if x == types.float32:
            return builder.fpext(value, double)
        if x == types.int16:  # bfloat16: the high half of a float32
            wide = builder.shl(builder.zext(value, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.fpext(builder.bitcast(wide, ir.FloatType()), double)
        return builder.fpext(builder.bitcast(value, ir.HalfType()), double)

    return sig, codegen


@intrinsic
def _bits(typingctx: Any, x: Any) -> Any:
    """The bit pattern of a float64 as an int64."""
    if x != types.float64:
        return None
    sig = types.int64(x)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


def _compiled(function: Any) -> Any:
    """``function`` compiled with the flags above (and the GIL released), cached on disk where Numba finds a
    writable place (next to this file, else the user's cache directory), else compiled once per process."""
    flags = {"nogil": True, "fastmath": {"reassoc", "nsz"}, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **flags)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available" (a read-only installation)
        return numba.njit(**flags)(function)


@_compiled
def adamw_piece_sums(
    p_addr: Any,
    m_addr: Any,
    v_addr: Any,
    g_addr: Any,
    numel: Any,
    piece_item: Any,
    eps_scaled: Any,
    scale: Any,
    decay: Any,
    p_like: Any,
    m_like: Any,
    v_like: Any,
    g_like: Any,
    k: float,
    threshold_floor_bits: int,
    first: int,
    stop: int,
    out: Any,
) -> None:
    """Pieces ``first .. stop - 1``: add the sums ``[N, B, E, S, G, R, RD]`` of piece ``j`` to ``out[j]``.

    Per piece: the element addresses of ``w``, ``m``, ``v``, ``g`` (int64 arrays), ``numel``, and the index of its
    item into the per-item float64 scalars ``eps_scaled`` (:math:`c_2\\epsilon`), ``scale`` (:math:`s`) and
    ``decay`` (:math:`c`). ``*_like``: empty arrays of each tensor's element type (float32, float64, or the bits of
    bfloat16 as int16 and of float16 as uint16). ``k = 2/eps`` of the storage dtype; ``threshold_floor_bits``: the
    bits of its smallest normal number as a float64. ``out``: float64, ``pieces x 7``.
    """
    for j in range(first, stop):
        n = numel[j]
        w = numba.carray(_pointer(p_addr[j], p_like), n)
        m = numba.carray(_pointer(m_addr[j], m_like), n)
        v = numba.carray(_pointer(v_addr[j], v_like), n)
        g = numba.carray(_pointer(g_addr[j], g_like), n)
        item = piece_item[j]
        e = eps_scaled[item]
        s = scale[item]
        c = decay[item]
        cs = (1.0 + c) * s
        inv_k = 1.0 / k  # (a power of two: exact)
        sum_w = sum_b = sum_wb = sum_y = sum_g = lost_count = lost_sq = 0.0
        for i in range(n):
            wi = _widen(w[i])
            x = _widen(m[i]) / (math.sqrt(_widen(v[i])) + e)
            b = s * x
            y = wi + b
            gi = _widen(g[i])
            sum_w += wi * wi
            sum_b += b * b
            sum_wb += wi * b
            sum_y += y * y
            sum_g += gi * gi
            kd = abs(c * wi + cs * x) * k
            threshold = max(_bits(wi) & _EXPONENT, threshold_floor_bits)
            lost = (kd > 0.0) & (_bits(kd) < threshold)
            lost_count += lost
            # (a select, not d*d*lost: that is NaN where d is infinite)
            lost_delta = kd * inv_k if lost else 0.0
            lost_sq += lost_delta * lost_delta
        row = out[j]
        row[0] += sum_w
        row[1] += sum_b
        row[2] += sum_wb
        row[3] += sum_y
        row[4] += sum_g
        row[5] += lost_count
        row[6] += lost_sq


def element_type(dtype: Any) -> np.ndarray:
    """The empty ``*_like`` array of a torch dtype's elements (see :func:`adamw_piece_sums`)."""
    import torch

    kinds = {
        torch.float32: np.float32,
        torch.float64: np.float64,
        torch.bfloat16: np.int16,
        torch.float16: np.uint16,
    }
    return np.empty(0, dtype=kinds[dtype])
