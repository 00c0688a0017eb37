r"""The ``numba`` backend: the AdamW sums in one compiled pass over the optimizer's tensors (the CPU path).

The ``packed`` backend (:mod:`~lightning_adamw.update_split.backends.packed`) does this work in about thirty
whole-buffer torch kernels per bucket: each reads and writes a scratch buffer, and the rounded-away test and the
gradient norm alone add a dozen of them. Here one loop, compiled by Numba for this machine's vector instructions
(:mod:`~lightning_adamw.update_split.backends._numba_kernel`), reads :math:`w`, :math:`m`, :math:`v` and :math:`g`
of each element once, straight from the optimizer's tensors, and keeps all seven sums of the contract in float64
registers: no scratch memory, every product and sum in float64 (more exact than the dtype rule asks), and about a
third of a foreach AdamW step's time on a CPU (``benchmarks/RESULTS.md``).

Layout (:func:`build_layout`, once per plan): per dtype combination of ``(w, m, v)``, tables of element addresses,
sizes, items, rows and replica weights, one entry per *piece* (at most ``SPAN`` elements of one tensor, so that the
pieces can be shared out among threads). The gradients are new tensors after every ``zero_grad``: their addresses
are read at every call. The pieces are summed by ``torch.get_num_threads()`` threads (the kernel releases the GIL),
or in the calling thread for a small model.

Numba is imported only when this backend first runs, or by :func:`warm_up` in a background thread (the monitor
starts it when a single-process fit starts). Compiling the kernel takes a few seconds the first time on a
machine; Numba caches it on disk (next to the package, or in the user's cache directory), and a later process
loads it in about half a second (``benchmarks/RESULTS.md``). Without Numba installed, or with
``LIGHTNING_ADAMW_NUMBA=0``, ``packed`` sums these tensors instead. A failure to compile or run is a backend
failure: the plan is rebuilt without it (same numbers).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_adamw.update_split.backends._kernels import KNOWN_DTYPES, installed, readable_grads
from lightning_adamw.update_split.backends._kernels import switched_off as env_switched_off
from lightning_adamw.update_split.contract import (
    SUM_COLUMNS,
    Col,
    SumsRequest,
    Tables,
    TensorWork,
    storage_spacing,
)

__all__ = ["BACKEND", "ENV", "SPAN", "NumbaGroup", "available", "build_layout", "warm_up"]

#: ``LIGHTNING_ADAMW_NUMBA=0`` (or ``false``, ``no``, ``off``) keeps this backend out of the automatic choice
ENV = "LIGHTNING_ADAMW_NUMBA"
#: Most elements of one piece (a quarter of a million: large enough that a piece's call overhead is negligible)
SPAN = 1 << 18
#: A thread takes at least this many elements (fewer are summed faster than a thread is woken)
_MIN_PER_THREAD = 1 << 19
_KNOWN = KNOWN_DTYPES
_COLUMNS = SUM_COLUMNS["adamw"]
assert _COLUMNS == (Col.N, Col.B, Col.E, Col.S, Col.G, Col.R, Col.RD)
_G = _COLUMNS.index(Col.G)


def switched_off() -> bool:
    """Whether ``LIGHTNING_ADAMW_NUMBA`` turns this backend off."""
    return env_switched_off(ENV)


def available() -> bool:
    """Whether this backend can run: Numba installed and not switched off. Does not import Numba."""
    return installed("numba") and not switched_off()


def _supported(item: TensorWork) -> bool:
    # (the kernel reads raw addresses: every tensor must be in this process's memory)
    tensors = (item.p, item.m, item.v)
    return all(
        t is not None and t.device.type == "cpu" and t.is_contiguous() and t.dtype in _KNOWN for t in tensors
    )


@dataclass
class NumbaGroup:
    """Pieces of one dtype combination ``(w, m, v)``: the kernel's tables (numpy, one entry per piece)."""

    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]
    p_addr: np.ndarray
    m_addr: np.ndarray
    v_addr: np.ndarray
    numel: np.ndarray
    #: per piece: its item (index into the request's items: scalars, gradients) and first element in it
    piece_item: np.ndarray
    piece_start: np.ndarray
    #: per piece: row of the table, and replica weight (``None``: all 1)
    rows: Tensor
    weights: Tensor | None
    #: cumulative elements after each piece (to share the pieces out among threads)
    cumulative: np.ndarray
    #: the tensors behind the addresses, kept alive with the layout
    items: list[TensorWork] = field(default_factory=list, repr=False)

    @property
    def num_pieces(self) -> int:
        return int(self.numel.shape[0])


def build_layout(items: Sequence[TensorWork], span: int = SPAN) -> list[NumbaGroup]:
    """Cut ``items`` into pieces of at most ``span`` elements and group them by dtype combination. An item's
    scalars and gradient are at its position in ``items``. Raises ``ValueError`` for an item it cannot take."""
    grouped: dict[tuple[torch.dtype, ...], list[tuple[int, int, int]]] = {}
    for j, item in enumerate(items):
        if not _supported(item):
            raise ValueError(
                f"item {j} (row {item.row}): the numba backend needs contiguous float CPU tensors"
            )
        n = item.p.numel()
        key = (item.p.dtype, item.m.dtype, item.v.dtype)  # type: ignore[union-attr]
        for start in range(0, n, span):
            grouped.setdefault(key, []).append((j, start, min(n, start + span) - start))
    out = []
    for dtypes, pieces in grouped.items():
        js = np.array([j for j, _, _ in pieces], dtype=np.int64)
        starts = np.array([s for _, s, _ in pieces], dtype=np.int64)
        sizes = np.array([n for _, _, n in pieces], dtype=np.int64)

        def addresses(name: str, js: np.ndarray = js, starts: np.ndarray = starts) -> np.ndarray:
            base = np.array([getattr(items[j], name).data_ptr() for j in js.tolist()], dtype=np.int64)
            return base + starts * getattr(items[int(js[0])], name).element_size()

        weights = [float(items[j].weight) for j in js.tolist()]
        out.append(
            NumbaGroup(
                dtypes=dtypes,
                p_addr=addresses("p"),
                m_addr=addresses("m"),
                v_addr=addresses("v"),
                numel=sizes,
                piece_item=js,
                piece_start=starts,
                rows=torch.tensor([items[j].row for j in js.tolist()], dtype=torch.int64),
                weights=torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
                if any(w != 1.0 for w in weights)
                else None,
                cumulative=np.cumsum(sizes),
                items=list(items),
            )
        )
    return out


_WARMED: set[tuple[torch.dtype, ...]] = set()
_WARM_UP_THREADS: list[threading.Thread] = []


def _wait_for_warm_up() -> None:
    """Let a running :func:`warm_up` finish before this thread uses Numba: never two threads of a process in
    Numba's compiler and LLVM at once."""
    while _WARM_UP_THREADS:
        _WARM_UP_THREADS.pop().join()


def warm_up(dtypes: Sequence[torch.dtype]) -> threading.Thread | None:
    """Import Numba and compile (or load from Numba's cache) the kernel for parameters, state and gradients of
    each of ``dtypes``, in a background thread, so that the first call of a process need not (Numba's import and
    a cached kernel's load take about half a second). The process waits for the thread when it exits. Returns
    the thread, or ``None`` when there is nothing to do (not available, or done before). A call that comes
    while it runs first waits for it (:func:`_wait_for_warm_up`); an error there is left to that call, which
    reports it as a backend failure."""
    keys = [(d,) * 4 for d in dict.fromkeys(dtypes) if d in _KNOWN]
    todo = [k for k in keys if k not in _WARMED]
    if not todo or not available():
        return None
    _WARMED.update(todo)

    def job() -> None:
        try:
            from lightning_adamw.update_split.backends import _numba_kernel as kernel

            index, values = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
            for key in todo:
                likes = [kernel.element_type(d) for d in key]
                out = np.zeros((0, len(_COLUMNS)), dtype=np.float64)
                kernel.adamw_piece_sums(
                    index,
                    index,
                    index,
                    index,
                    index,
                    index,
                    values,
                    values,
                    values,
                    *likes,
                    2.0,
                    0,
                    0,
                    0,
                    out,
                )
        except Exception:
            pass

    # Not a daemon: a process that ends while LLVM is still loading the kernel must wait for it (a daemon thread
    # stopped inside LLVM's C++ aborts the process: "terminate called without an active exception", seen in a
    # 4-step DDP rank).
    thread = threading.Thread(target=job, name="lightning-adamw-numba-warm-up", daemon=False)
    thread.start()
    _WARM_UP_THREADS.append(thread)
    return thread


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    # a forked child has none of the parent's threads: a pool inherited from it would never run a task
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lightning-adamw")
        return _POOL


def _ranges(group: NumbaGroup) -> list[tuple[int, int]]:
    """Consecutive ranges of pieces with about equal numbers of elements, one per thread."""
    total = int(group.cumulative[-1]) if group.num_pieces else 0
    threads = max(1, min(torch.get_num_threads(), total // _MIN_PER_THREAD, group.num_pieces))
    if threads == 1:
        return [(0, group.num_pieces)]
    cuts = np.searchsorted(group.cumulative, [total * t / threads for t in range(1, threads)], side="left")
    bounds = [0, *(int(c) + 1 for c in cuts), group.num_pieces]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _grad_addresses(group: NumbaGroup, grads: Sequence[Tensor]) -> tuple[np.ndarray, Tensor, list[Tensor]]:
    """The element addresses of each piece's gradient, an empty tensor of their dtype, and the tensors behind
    them (to keep alive while the kernel runs), read as :func:`readable_grads` gives them."""
    used = sorted(set(group.piece_item.tolist()))
    kept = readable_grads([grads[j] for j in used], torch.device("cpu"))
    base = np.zeros(max(used) + 1 if used else 0, dtype=np.int64)
    for j, g in zip(used, kept, strict=True):
        base[j] = g.data_ptr()
    like = kept[0] if kept else torch.empty(0)
    return base[group.piece_item] + group.piece_start * like.element_size(), like, kept


class NumbaBackend:
    name = "numba"
    kinds = frozenset({"adamw"})
    partial_terms = None  # float64 throughout; a piece is one vectorised float64 sum
    fallible = True

    def accepts(self, item: TensorWork) -> bool:
        return available() and _supported(item)

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> list[NumbaGroup]:
        return build_layout(items, SPAN if chunk_numel is None else max(1, min(int(chunk_numel), SPAN)))

    def add_sums(self, prepared: list[NumbaGroup], request: SumsRequest, tables: Tables) -> None:
        _wait_for_warm_up()
        from lightning_adamw.update_split.backends import _numba_kernel as kernel  # imports Numba

        num_items = len(request.items)
        shared = request.shared_eps_and_scale()
        if shared is not None:
            eps = np.full(num_items, shared[0])
            scale = np.full(num_items, shared[1])
        else:
            eps_t, scale_t = request.eps_and_scale_vectors(torch.device("cpu"))
            eps = eps_t.to(torch.float64).numpy()
            scale = scale_t.to(torch.float64).numpy()
        decay = np.asarray(request.decay_coefficients(), dtype=np.float64)
        grads = [g for part in request.parts for g in (part.grads or ())]
        table = tables.on(torch.device("cpu"))
        for group in prepared:
            if not group.num_pieces:
                continue
            g_addr, g_like, kept = _grad_addresses(group, grads)
            eps_s, tiny_s = storage_spacing(group.dtypes[0])
            out = np.zeros((group.num_pieces, len(_COLUMNS)), dtype=np.float64)
            args = (
                group.p_addr,
                group.m_addr,
                group.v_addr,
                g_addr,
                group.numel,
                group.piece_item,
                eps,
                scale,
                decay,
                *(kernel.element_type(d) for d in (*group.dtypes, g_like.dtype)),
                2.0 / eps_s,
                int(np.float64(tiny_s).view(np.int64)),
            )
            ranges = _ranges(group)
            if len(ranges) == 1:
                kernel.adamw_piece_sums(*args, *ranges[0], out)
            else:
                futures = [_pool().submit(kernel.adamw_piece_sums, *args, a, b, out) for a, b in ranges[1:]]
                kernel.adamw_piece_sums(*args, *ranges[0], out)
                for f in futures:
                    f.result()
            del kept  # (the kernel has run: the gradients may go)
            sums = torch.from_numpy(out)
            if request.grad_scale is not None:  # fused optimizer + GradScaler: p.grad is still scaled
                sums[:, _G].div_(float(request.grad_scale) ** 2)
            if group.weights is not None:
                sums.mul_(group.weights)
            tables.add(table.device, group.rows, _COLUMNS, sums)


BACKEND = NumbaBackend()
