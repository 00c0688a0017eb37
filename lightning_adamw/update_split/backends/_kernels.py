"""What the two compiled-kernel backends (``triton``, ``numba``) share: whether their compiler is installed,
their environment switch, and the one rule for gradients they cannot read in place."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["KNOWN_DTYPES", "installed", "readable_grads", "switched_off"]

#: the element types both kernels read (half precision widened exactly)
KNOWN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a fact of the installation, looked up once:
    ``find_spec`` scans ``sys.path``)."""
    return importlib.util.find_spec(module) is not None


def switched_off(env: str) -> bool:
    """Whether the environment variable ``env`` is ``0``, ``false``, ``no`` or ``off`` (any case)."""
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")


def readable_grads(grads: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """``grads`` as a kernel can read them through one pointer type: as they are when they share one dtype of
    :data:`KNOWN_DTYPES`, are contiguous and on ``device``; else every one copied to a contiguous float32 tensor
    on ``device`` (a rare layout; exact for every half-precision gradient)."""
    dtypes = {g.dtype for g in grads}
    if (
        len(dtypes) <= 1
        and dtypes <= set(KNOWN_DTYPES)
        and all(g.is_contiguous() and g.device == device for g in grads)
    ):
        return list(grads)
    return [g.to(device=device, dtype=torch.float32).contiguous() for g in grads]
