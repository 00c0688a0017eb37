"""The backends that compute the sums of the contract (:mod:`~lightning_adamw.update_split.contract`), and the
one dispatch table that chooses among them.

============  ===========================  ==============================================================
backend       kinds                        what it is
============  ===========================  ==============================================================
reference     adamw, adam_l2, generic      a float64 loop over the tensors: the oracle and the baseline
foreach       adamw, adam_l2, generic      torch multi-tensor kernels over buckets of slices
packed        adamw                        all tensors in a few large torch kernels (CPU without Numba)
numba         adamw                        one compiled pass over the optimizer's tensors (the CPU path)
triton        adamw                        one fused Triton kernel per dtype combination (the CUDA path)
============  ===========================  ==============================================================

:data:`DISPATCH` lists, per kind of group, the backends the automatic choice tries in order: each takes the
tensors it accepts (``triton``: contiguous float tensors on CUDA), the next the rest. ``update_split(...,
backend=name)`` forces one backend for every group instead (an error when it cannot take a group or tensor).
The choice is made when a plan is built (:mod:`~lightning_adamw.update_split.plan`), nowhere else.

Adding a backend: a module here with an object that has the attributes and methods of
:class:`~lightning_adamw.update_split.contract.Backend`, an entry in :data:`BACKENDS`, its place in
:data:`DISPATCH`, and its roundings in ``tests/helpers/backend_bounds.py`` (``ARITHMETIC``):
``tests/test_backends.py`` then runs it against the reference. See ``docs/update_split.md``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_adamw.update_split.backends import foreach, numba, packed, reference, triton
from lightning_adamw.update_split.contract import Backend, TensorWork
from lightning_adamw.update_split.labels import Kind
from lightning_adamw.update_split.state import GroupWork

__all__ = ["BACKENDS", "DISPATCH", "Assignment", "assign"]

#: Every backend, by name.
BACKENDS: dict[str, Backend] = {
    b.name: b for b in (reference.BACKEND, foreach.BACKEND, packed.BACKEND, numba.BACKEND, triton.BACKEND)
}

#: The automatic choice: per kind of group, the backends to try in order of preference.
DISPATCH: dict[str, tuple[str, ...]] = {
    "adamw": ("triton", "numba", "packed"),
    "adam_l2": ("foreach",),
    "generic": ("foreach",),
}


@dataclass(frozen=True)
class Assignment:
    """The tensors one backend sums in a plan, by group, and what it prepared for them."""

    backend: str
    kind: Kind
    #: ``(group index, items of that group)`` for each group with items here
    parts: tuple[tuple[int, tuple[TensorWork, ...]], ...]
    prepared: Any

    @property
    def items(self) -> list[TensorWork]:
        return [it for _, items in self.parts for it in items]


def assign(
    works: Sequence[GroupWork],
    *,
    forced: str | None = None,
    exclude: Collection[str] = (),
    chunk_numel: int | None = None,
) -> list[Assignment]:
    """Which backend sums which tensors: :data:`DISPATCH` minus ``exclude`` (``triton=False``, a backend that
    failed), or ``forced`` for everything. Raises ``ValueError`` naming the backend and the group or tensor when
    a forced backend cannot take it (or an unknown name)."""
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"backend={forced!r}: unknown backend; choose one of {sorted(BACKENDS)}")
    out: list[Assignment] = []
    for kind in ("adamw", "adam_l2", "generic"):
        groups = [w for w in works if w.kind == kind and w.items]
        if not groups:
            continue
        chain = (forced,) if forced is not None else tuple(n for n in DISPATCH[kind] if n not in exclude)
        remaining = {w.index: list(w.items) for w in groups}
        for name in chain:
            backend = BACKENDS[name]
            if kind not in backend.kinds:
                raise ValueError(
                    f"backend={name!r} sums only {sorted(backend.kinds)} groups; group '{groups[0].label}' is"
                    f" {kind!r}"
                )
            parts = []
            for w in groups:
                flags = [backend.accepts(it) for it in remaining[w.index]]
                taken = tuple(it for it, ok in zip(remaining[w.index], flags, strict=True) if ok)
                if taken:
                    parts.append((w.index, taken))
                    remaining[w.index] = [
                        it for it, ok in zip(remaining[w.index], flags, strict=True) if not ok
                    ]
            if parts:
                items = [it for _, its in parts for it in its]
                out.append(Assignment(name, kind, tuple(parts), backend.prepare(items, chunk_numel)))
        left = [(w, it) for w in groups for it in remaining[w.index]]
        if left:
            w, it = left[0]
            raise ValueError(
                f"no backend of {list(chain)} takes tensor '{w.names[w.rows.index(it.row)]}' of group"
                f" '{w.label}' ({it.p.dtype}, {it.p.device}, contiguous={it.p.is_contiguous()})"
            )
    return out
