"""The ``numba`` backend (the CPU path for AdamW groups) beyond the shared oracle test of ``test_backends.py``:
threads, gradients it must copy, a ``GradScaler``'s scale, its switch, and its fallback when it fails."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups
from lightning_adamw.update_split import PlanCache, update_split
from lightning_adamw.update_split.backends import numba as numba_backend
from lightning_adamw.update_split.contract import Col
from lightning_adamw.update_split.plan import plan_for
from lightning_adamw.update_split.scalars import step_scalars
from lightning_adamw.update_split.sums import sums_table

pytest.importorskip("numba")


def _trained(
    widths: tuple[int, ...] = (8, 64, 300, 3), dtype: torch.dtype = torch.float32
) -> torch.optim.AdamW:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(16, widths[0], generator=gen).to(dtype)).float().square().mean().backward()
        opt.step()
    return opt


def _table(opt: torch.optim.Optimizer, backend: str, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    plan = plan_for(
        opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=None,
        triton=False, backend=backend, cache=None, key=None,
    )  # fmt: skip
    assert {a.backend for a in plan.assignments} == {backend}
    return sums_table(plan, step_scalars(plan.works, opt.param_groups), None, grad_scale)


def test_threads_share_the_pieces_and_give_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model large enough for two threads (two million elements) gives bit for bit the table of one thread:
    each piece is summed by the same code whichever thread takes it."""
    opt = _trained((1000, 1000, 1000, 10))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) > 2 * numba_backend._MIN_PER_THREAD
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _table(opt, "numba")
        torch.set_num_threads(2)
        plan = plan_for(
            opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=None,
            triton=False, backend="numba", cache=None, key=None,
        )  # fmt: skip
        assert max(len(numba_backend._ranges(g)) for g in plan.assignments[0].prepared) == 2
        two = _table(opt, "numba")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    reference = _table(opt, "reference")
    cols = [Col.N, Col.B, Col.S, Col.G]
    # every product and sum in float64 (a million terms at most per sum): far inside 1e-12 relative
    torch.testing.assert_close(one[:, cols], reference[:, cols], rtol=1e-12, atol=0.0)


def test_gradients_of_another_dtype_are_copied() -> None:
    """A gradient whose dtype differs from the others' is read from a float32 copy: ``G`` is still the
    reference's (to float32's rounding of that one gradient)."""
    opt = _trained()
    params = [p for g in opt.param_groups for p in g["params"]]
    params[0].grad_dtype = None  # (torch refuses a gradient of another dtype unless told)
    params[0].grad = params[0].grad.double()  # one float64 gradient among float32 ones
    got, want = _table(opt, "numba"), _table(opt, "reference")
    torch.testing.assert_close(got[:, Col.G], want[:, Col.G], rtol=1e-6, atol=0.0)


def test_a_grad_scaler_s_scale_divides_g_only() -> None:
    opt = _trained()
    plain = _table(opt, "numba")
    scaled = _table(opt, "numba", grad_scale=torch.tensor(8.0))
    torch.testing.assert_close(scaled[:, Col.G] * 64.0, plain[:, Col.G], rtol=1e-15, atol=0.0)
    others = [c for c in range(plain.shape[1]) if c != Col.G]
    assert torch.equal(scaled[:, others], plain[:, others])


def _auto_backends(opt: torch.optim.Optimizer, cache: PlanCache | None = None) -> set[str]:
    plan = plan_for(
        opt.param_groups, opt.state, adam_family=True, snapshot=None, reduce=None, chunk_numel=None,
        triton=False, backend=None, cache=cache, key=opt,
    )  # fmt: skip
    return {a.backend for a in plan.assignments}


def test_it_is_the_cpu_choice_and_its_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = _trained()
    assert _auto_backends(opt) == {"numba"}
    monkeypatch.setenv(numba_backend.ENV, "0")
    assert _auto_backends(opt) == {"packed"}


def test_a_kernel_failure_falls_back_to_packed_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that cannot compile or run is a backend failure: one warning, the plan rebuilt on ``packed``,
    the same metrics (within the packed backend's float32 arithmetic)."""
    opt = _trained()
    want = update_split(opt, cache=PlanCache())
    from lightning_adamw.update_split.backends import _numba_kernel

    def broken(*args: Any) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_numba_kernel, "adamw_piece_sums", broken)
    cache = PlanCache()
    with pytest.warns(RuntimeWarning, match="the numba backend failed"):
        got = update_split(opt, cache=cache)
    assert "numba" in cache.failed and _auto_backends(opt, cache) == {"packed"}
    expected, metrics = want.metrics(), got.metrics()
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-12), name


def test_warm_up_compiles_in_the_background_once_per_dtype() -> None:
    """``warm_up`` loads (or compiles) the kernel for a dtype in a background thread, once per process; the first
    real call then finds it ready."""
    from lightning_adamw.update_split.backends import _numba_kernel

    dtype = torch.float16  # (the other tests of this process sum float32, bfloat16 and float64 tensors)
    numba_backend._WARMED.discard((dtype,) * 4)
    thread = numba_backend.warm_up([dtype, torch.int64])  # (an integer dtype is not a parameter dtype here)
    assert (
        thread is not None and not thread.daemon
    )  # (the process waits for it: no abort inside LLVM at exit)
    thread.join(timeout=120)
    like = _numba_kernel.element_type(dtype)
    assert any(sig[9:13] == (numba_typeof(like),) * 4 for sig in _numba_kernel.adamw_piece_sums.signatures)
    assert numba_backend.warm_up([dtype]) is None  # once


def numba_typeof(value: Any) -> Any:
    import numba

    return numba.typeof(value)


def _pool_runs_a_task() -> None:
    assert numba_backend._pool().submit(lambda: 7).result(timeout=30) == 7


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork: POSIX only")
def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    """A child forked after the pool started (a DataLoader worker, ``ddp_fork``) has none of its threads: it
    must start its own instead of waiting forever on the parent's."""
    import multiprocessing

    _pool_runs_a_task()  # the parent's pool exists and has a thread
    child = multiprocessing.get_context("fork").Process(target=_pool_runs_a_task)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0


def test_a_read_only_installation_compiles_without_the_disk_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Numba finds no writable place for its cache it refuses ``cache=True``: the kernel is then compiled
    in each process instead of failing."""
    import numba

    from lightning_adamw.update_split.backends import _numba_kernel

    real = numba.njit

    def njit(*args: Any, cache: bool = False, **kwargs: Any) -> Any:
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file '/usr/lib/f.py'")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    compiled = _numba_kernel._compiled(lambda x: x + 1.0)
    assert compiled(1.0) == 2.0
