r"""
Weight Decay Monitor
====================

Shows, while training runs, how every AdamW step splits into its decoupled-decay part and its gradient part.
The numbers are computed by :mod:`lightning_adamw.update_split`; this module is the Lightning shell around it.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_adamw.monitor_loggers import (
    define_wandb_metrics,
    figure_dir,
    log_figure,
    log_histograms,
    prepare_figure,
)
from lightning_adamw.monitor_messages import (
    COUNTER_PREFIX,
    duplicate_names_messages,
    generic_optimizer_message,
    timescale_facts,
    w_old_unknown_message,
)
from lightning_adamw.monitor_plot import FigureWriter
from lightning_adamw.monitor_trainer import distribution_mode, steps_per_epoch, total_steps
from lightning_adamw.optim_checks import is_adam_family
from lightning_adamw.update_split import (
    KIND_PREFIX,
    GroupSplit,
    PlanCache,
    ShardReduce,
    UpdateSplit,
    take_snapshot,
    update_split,
)
from lightning_adamw.update_split.backends import numba as numba_backend

__all__ = ["WeightDecayMonitor"]

# Metrics kept (per group) for the summary figure and restored from checkpoints.
# ("lr": the group's learning rate, so that the figure can shade the schedule's cooldown)
_PLOTTED: dict[str, tuple[str, ...]] = {
    "adamw": ("decay_norm", "grad_update_norm", "decay_to_grad_ratio", "grad_to_weight", "lr"),
    "adam_l2": (
        "eff_decay_rate_min",
        "eff_decay_rate_median",
        "eff_decay_rate_max",
        "uniform_decay_rate",
        "l2_grad_share",
        "grad_to_weight",
        "lr",
    ),
    "generic": ("update_norm", "weight_norm", "grad_to_weight", "equilibrium_grad_to_weight", "lr"),
}
# Per-layer quantity whose distribution over the layers of a group is logged as a histogram.
_HISTOGRAM_METRIC: dict[str, str] = {
    "adamw": "decay_to_grad_ratio",
    "adam_l2": "l2_grad_share",
    "generic": "update_to_weight",
}
_FIGURE_TITLE = "WeightDecayMonitor: decay vs gradient update"


class WeightDecayMonitor(Callback):
    r"""Log the exact split of every AdamW update into its decoupled-decay part and its gradient part.

    One AdamW step is :math:`w_{new} = w_{old}(1 - \eta\lambda) - \eta u` with
    :math:`u = \hat m / (\sqrt{\hat v} + \epsilon)`. On logging steps the monitor reconstructs both parts from the
    optimizer's *post-step* state, so the numbers are the ones the optimizer applied: after gradient accumulation
    and clipping, with that step's learning rate, and never for a step the ``GradScaler`` skipped. No parameter is
    copied for Adam/AdamW; all math runs on the parameters' device in chunks, with one host transfer per logging
    step. The parts are exact to floating-point error: they are the decay and gradient steps the optimizer
    computed (its bias corrections replayed in the precision it used them), while the stored float32/bfloat16
    weights additionally carry their own rounding of each update.

    Args:
        log_every_n_steps: log every this many optimizer steps (at steps ``n-1, 2n-1, ...`` like Lightning's own
            logging). ``None`` follows ``Trainer(log_every_n_steps=...)`` (50 where that is 0).
        per_layer: also log every metric per parameter tensor under ``<prefix>_layer/<param>/<metric>`` (see
            "Names" below for ``<param>``).
        histogram_every_n_steps: how often to log, per group, the histogram over its tensors of the
            decay-to-gradient ratio (W&B ``wandb.Histogram`` and TensorBoard histograms). ``None`` means every
            ten logging intervals, ``0`` disables.
        plot: at the end of ``fit``, save ``plot_filename`` (PNG) with decay vs gradient update norms per group
            over training beside the logs and send it to W&B / TensorBoard.
        plot_filename: file of the summary figure: a relative path (``"plots/wd.png"`` too) goes under the
            first logger's log directory (``default_root_dir`` without a logger), an absolute one is used as
            given; missing folders are created. Raises ``ValueError`` when empty.
        chunk_numel: elements processed per chunk (bounds the extra memory); ``None`` picks about 1/16 of the
            parameters, between 65k and 16M elements.

    Names: ``<group>`` is the parameter group's ``"name"``, else ``group{i}``; a name that an earlier group of
    the same optimizer already has gets the first free suffix ``_1``, ``_2``, ... (two ``build_param_groups``
    calls give ``decay``, ``no_decay``, ``decay_1``, ``no_decay_1``). ``<param>`` is the tensor's name (from
    the group's ``"param_names"``, else ``<group>.param{j}``) while no other group of the optimizer has a
    tensor of that name; a name found in several groups is logged as ``<group>/<name>`` in every one of them
    (``decay/0.weight`` and ``decay_1/0.weight`` for a backbone's and a head's first Linear). With several
    optimizers both are prefixed ``opt{k}.``. Histograms and the summary figure use the same group labels. The
    monitor warns once when an optimizer has groups with the same name: Lightning's ``LearningRateMonitor``
    refuses them, so give the groups names of their own (``build_param_groups(..., group_prefix=...)``).

    Metrics. For AdamW groups, under ``adamw/<group>/``:

    ==================================  ===================================================================
    ``decay_norm``                      :math:`\|\eta\lambda w_{old}\|` (exactly 0 in a ``weight_decay=0`` group)
    ``grad_update_norm``                :math:`\|\eta u\|`
    ``decay_to_grad_ratio``             ``decay_norm / grad_update_norm``
    ``update_norm``                     :math:`\|w_{new} - w_{old}\|`
    ``weight_norm``                     :math:`\|w_{new}\|`
    ``update_to_weight``                :math:`\|w_{new} - w_{old}\| / \|w_{old}\|`
    ``cos_grad_update_weight``          cosine of :math:`-\eta u` and :math:`w_{old}` (< 0: the gradient
                                        shrinks the weights too, > 0: it grows them against the decay)
    ``angular_update``                  angle between :math:`w_{old}` and :math:`w_{new}` (radians)
    ``equilibrium_angular_update``      :math:`\sqrt{2\eta\lambda(1-\beta_1)/(1+\beta_1)}`, the expected angular
                                        update in rotational equilibrium (Kosson et al., 2023; =
                                        :math:`\sqrt{2\eta\lambda}` without momentum)
    ``equilibrium_weight_norm``         :math:`\sqrt{\eta C / (2\lambda)}`, C = number of elements (same paper)
    ``ema_timescale_steps``             :math:`1/(\eta\lambda)` (Wang & Aitchison, 2024)
    ``ema_timescale_epochs``            ``ema_timescale_steps`` / optimizer steps per epoch
    ``ema_timescale_fraction``          :math:`1/(\eta_{peak}\lambda)` / planned optimizer steps: the timescale at
                                        the group's peak lr as a share of the run (what the mixin's
                                        ``ema_timescale_fraction`` sets); with a warning once when above 1 or
                                        below one epoch
    ``base_weight_decay``               λ of a group a ``WeightDecayScheduler`` follows (``weight_decay`` is
                                        then the value of the step)
    ==================================  ===================================================================

    The last six are left out when ``weight_decay == 0``. Groups, and tensors, sum their squared norms and dot
    products before the roots are taken, so a group's norm is the norm of all its tensors together.
    With ``per_layer=True`` the same metrics (except the equilibrium angle and timescales, which depend only on
    the group's ``lr`` and ``weight_decay``) are logged per tensor under ``adamw_layer/<param>/``.

    For ``torch.optim.Adam`` with coupled L2 (``weight_decay > 0``, not decoupled), under ``adam_l2/<group>/``:
    ``l2_grad_share`` (:math:`\|\lambda w\| / \|g + \lambda w\|`, the share of the gradient that is the L2 term),
    ``eff_decay_rate_min`` / ``_median`` / ``_max`` (of the per-coordinate decay rate
    :math:`\eta\lambda / (\sqrt{\hat v} + \epsilon)` that L2 inside Adam really applies), ``uniform_decay_rate``
    (:math:`\eta\lambda`, what AdamW would apply to every coordinate), ``update_norm``, ``weight_norm``,
    ``update_to_weight``, ``angular_update``; per tensor ``adam_l2_layer/<param>/{l2_grad_share, update_norm,
    weight_norm, update_to_weight, angular_update}``. Adam with ``weight_decay == 0`` is AdamW and is reported as
    such.

    Any other optimizer (SGD, Lion, ...) gets one warning and ``optim/<group>/{update_norm, weight_norm,
    update_to_weight, angular_update}`` (and ``optim_layer/<param>/...``). For these the weights are copied by a
    step *pre*-hook on logging steps only and freed right after the step, so that step costs one extra copy of
    the parameters.

    Weights before the step: AdamW stored :math:`w_{old}(1 - \eta\lambda) - \eta u`, so :math:`w_{old}` comes
    back with a relative error of about eps / :math:`|1 - \eta\lambda|` (eps: machine epsilon of the
    parameters). When that exceeds 1/64 (:func:`~lightning_adamw.update_split.w_old_reconstructible`; float32:
    :math:`|1 - \eta\lambda| < 7.6 \cdot 10^{-6}`, e.g. ``lr * weight_decay == 1``, where the weights were
    multiplied by 0) the metrics that need :math:`w_{old}` (``decay_norm``, ``decay_to_grad_ratio``,
    ``update_norm``, ``update_to_weight``, ``cos_grad_update_weight``, ``angular_update``) are left out for
    that group, never logged as 0; ``grad_update_norm``, ``weight_norm`` and the rates are still logged. One
    warning names the group, ``lr`` and ``weight_decay``; ``adamw/w_old_unknown_steps`` counts such logging
    steps (cumulative).

    Always: ``adamw/nonfinite_tensors`` (tensors with NaN/inf weights or update at this logging step; their
    metrics and their group's are left out rather than logged as NaN), ``adamw/nonfinite_steps`` (logging
    steps with any, cumulative) and ``adamw/w_old_unknown_steps``. Histograms:
    ``<prefix>_hist/<group>/<metric>`` with the metric ``decay_to_grad_ratio`` (AdamW), ``l2_grad_share``
    (Adam+L2) or ``update_to_weight`` (other). Summary image: ``adamw/summary``.

    How it hooks in: ``optimizer.register_step_post_hook`` runs inside ``optimizer.step()`` right after the
    update, when ``lr`` and ``weight_decay`` are still the ones used (a step-interval scheduler moves them later)
    and the gradients are final (accumulated, unscaled, clipped). A step *pre*-hook would run before Lightning's
    closure computes the last backward, and ``on_train_batch_end`` after the scheduler moved ``lr``; neither is
    used for the numbers. The metric step is ``trainer.global_step`` before the increment (with manual
    optimization: Lightning's batch counter, so that several optimizers stepping in one batch log together), so
    the values line up with the loss logged for the same batch.

    Several fits with one monitor: :attr:`history` (the summary figure's data) keeps every fit. Steps restart at
    0 in a new fit, so a fit that is not resumed from a checkpoint is recorded after the end of the previous one
    (:attr:`step_offset`; where each began is in :attr:`fit_starts` and drawn as a dashed line); the metrics
    sent to the loggers keep the trainer's own step. A fit resumed from a checkpoint restores the history and
    the offset and continues the same curves.

    Distributed: under DDP the parameters are identical on every rank, so only rank zero computes and logs. With
    sharded parameters (``FSDPStrategy``, ``ModelParallelStrategy``, DTensor) every rank computes local sums,
    which are all-reduced before any square root; every rank issues the same collectives on the same steps.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_adamw.monitor import WeightDecayMonitor
        >>> monitor = WeightDecayMonitor(log_every_n_steps=10, per_layer=True)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
        >>> monitor.log_every_n_steps
        10
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        histogram_every_n_steps: int | None = None,
        plot: bool = True,
        plot_filename: str = "weight_decay_monitor.png",
        chunk_numel: int | None = None,
    ) -> None:
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        if histogram_every_n_steps is not None and (
            not isinstance(histogram_every_n_steps, int) or histogram_every_n_steps < 0
        ):
            raise ValueError(
                f"histogram_every_n_steps must be a non-negative int or None, got {histogram_every_n_steps!r}"
            )
        if chunk_numel is not None and (not isinstance(chunk_numel, int) or chunk_numel < 1):
            raise ValueError(f"chunk_numel must be a positive int or None, got {chunk_numel!r}")
        if not isinstance(plot_filename, (str, os.PathLike)) or not os.fspath(plot_filename).strip():
            raise ValueError(f"plot_filename must be a non-empty file name or path, got {plot_filename!r}")
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.histogram_every_n_steps = histogram_every_n_steps
        self.plot = plot
        self.plot_filename = os.fspath(plot_filename)
        self.chunk_numel = chunk_numel

        #: ``{"adamw/decay": {"decay_norm": [[step, value], ...]}}`` over the whole run (survives resume). The
        #: step is the optimizer step plus :attr:`step_offset`, so that several fits stay apart.
        self.history: dict[str, dict[str, list[list[float]]]] = {}
        #: Added to the optimizer step in :attr:`history`: 0 in the first fit of this monitor; a later fit that
        #: is not resumed from a checkpoint starts after the end of the previous one (see the class docstring).
        self.step_offset = 0
        #: Where in :attr:`history` each fit after the first started (its :attr:`step_offset`).
        self.fit_starts: list[int] = []
        #: Logging steps that had NaN/inf weights or updates (cumulative, survives resume).
        self.nonfinite_steps = 0
        #: Logging steps at which some group's weights before the step could not be reconstructed
        #: (``lr * weight_decay`` at or too close to 1; cumulative, survives resume).
        self.w_old_unknown_steps = 0
        #: Steps a fused optimizer reported as skipped (GradScaler overflow) on logging steps.
        self.skipped_steps = 0
        #: The metrics of the last logging step (also when no logger is attached).
        self.last_metrics: dict[str, float] = {}
        #: Where the summary figure was written, once it was.
        self.figure_path: str | None = None

        self._trainer: pl.Trainer | None = None
        self._handles: list[RemovableHandle] = []
        self._snapshots: dict[int, dict[torch.Tensor, torch.Tensor]] = {}
        self._interval = 1
        self._hist_interval = 0
        self._mode = "single"
        self._reduce: ShardReduce | None = None
        self._steps_per_epoch: float | None = None
        self._num_optimizers = 1
        self._manual = False
        self._last_nonfinite_step = -1
        self._last_unknown_step = -1
        self._warned: set[str] = set()
        self._timescale_metrics: dict[int, dict[str, float]] = {}
        self._last_metrics_step = -1
        self._disabled = False
        #: the plans of this monitor's optimizers (layouts reused from one logging step to the next), and the
        #: backends that failed at run time (a Triton that cannot compile here)
        self._plans = PlanCache()
        #: draws the summary figure off the training thread; ``_history_version`` counts the points recorded,
        #: so a figure drawn early is known to be final; ``_total_steps``: the optimizer steps this fit will take
        #: (``None`` when not known in advance)
        self._figure = FigureWriter()
        self._history_version = 0
        self._total_steps: int | None = None
        self._figure_step = 0
        #: ``step_offset`` + steps taken, at the end of the last fit
        self._fit_end = 0
        #: set by ``load_state_dict`` (a resumed fit), consumed by ``on_train_start``
        self._restored = False

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, per_layer=self.per_layer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self._disabled = False
        self._last_nonfinite_step = self._last_unknown_step = self._last_metrics_step = -1
        self._start_fit(self._step_index(trainer))
        # Trainer(log_every_n_steps=0) switches Lightning's own logging off; the monitor then keeps its default.
        self._interval = self.log_every_n_steps or int(trainer.log_every_n_steps) or 50
        if self.histogram_every_n_steps is None:
            self._hist_interval = 10 * self._interval
        else:
            self._hist_interval = self.histogram_every_n_steps
        self._steps_per_epoch = steps_per_epoch(trainer, pl_module)
        self._manual = not pl_module.automatic_optimization
        self._total_steps = None
        self._figure = FigureWriter()  # (a figure of an interrupted fit, never sent, is not this fit's)
        if self.plot and trainer.is_global_zero:
            # matplotlib's import and fonts cost more than a short fit's monitoring: done while it trains
            self._figure.warm_up()
            self._total_steps = total_steps(trainer, self._manual)
        self._mode, self._reduce = distribution_mode(trainer)
        if not trainer.loggers:
            self._warn_once(
                "no-logger",
                "WeightDecayMonitor: the Trainer has no logger, so nothing is logged; the metrics stay in"
                " `monitor.last_metrics` and the summary figure goes to `default_root_dir`.",
            )
        optimizers = list(trainer.optimizers)
        self._num_optimizers = len(optimizers)
        for k, optimizer in enumerate(optimizers):
            for key, message in duplicate_names_messages(k, optimizer, len(optimizers), self.per_layer):
                self._warn_once(key, message)
            if not is_adam_family(optimizer):
                name = type(optimizer).__name__
                self._warn_once(f"generic-{name}", generic_optimizer_message(optimizer))
                self._handles.append(optimizer.register_step_pre_hook(self._make_pre_hook(k)))
            self._handles.append(optimizer.register_step_post_hook(self._make_post_hook(k)))
        # Numba's import and the CPU kernel's load (about half a second, once per process): done while it trains,
        # but not beside the collectives of a multi-process run (two ranks of short gloo DDP runs aborted there,
        # "terminate called without an active exception"; the first logging step then loads it itself)
        if self._mode == "single":
            numba_backend.warm_up(
                {p.dtype for o in optimizers if is_adam_family(o) for g in o.param_groups for p in g["params"]
                 if p.device.type == "cpu"}
            )  # fmt: skip
        self._timescale_metrics, messages = timescale_facts(
            optimizers, total_steps(trainer, self._manual), self._steps_per_epoch
        )
        for key, message in messages if trainer.is_global_zero else []:
            self._warn_once(key, message)
        if trainer.is_global_zero:
            define_wandb_metrics(trainer.loggers, KIND_PREFIX.values())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the last step this fit records, the figure's data is final: draw it now, in the background,
        # while the training thread runs the remaining steps.
        total = self._total_steps
        if total is None or self._figure.submitted == self._history_version or not self.history:
            return
        done = trainer.global_step
        intervals = [i for i in (self._interval, self._hist_interval) if i > 0]
        if all(total // i == done // i for i in intervals):
            self._submit_figure(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._fit_end = self.step_offset + self._step_index(trainer)
        if self.plot and trainer.is_global_zero and self.history:
            self._figure_step = trainer.global_step
            if self._figure.submitted != self._history_version:
                self._submit_figure(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        # (before Lightning finalizes the loggers, which comes right after the callbacks' teardown)
        self._log_figure(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "history": {
                k: {m: [list(p) for p in pts] for m, pts in v.items()} for k, v in self.history.items()
            },
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_steps": self.skipped_steps,
            "w_old_unknown_steps": self.w_old_unknown_steps,
            "step_offset": self.step_offset,
            "fit_starts": list(self.fit_starts),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history", {})
        self.history = {k: {m: [list(p) for p in pts] for m, pts in v.items()} for k, v in history.items()}
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.w_old_unknown_steps = int(state_dict.get("w_old_unknown_steps", 0))
        # (version 1 checkpoints: one fit, no offset)
        self.step_offset = int(state_dict.get("step_offset", 0))
        self.fit_starts = [int(x) for x in state_dict.get("fit_starts", [])]
        self._restored = True  # the coming fit resumes this state: it continues the same curves

    def _start_fit(self, first_step: int) -> None:
        """Keep the curves of an earlier fit of this monitor apart from this one's, whose steps restart at 0
        (``first_step`` is this fit's first step: 0 for a new Trainer, more when a Trainer fits again)."""
        if self._restored:  # resumed from a checkpoint: same curves, same offset
            self._restored = False
            return
        last = max((p[-1][0] for series in self.history.values() for p in series.values() if p), default=-1.0)
        if last < 0 and self._fit_end == 0:
            return  # the first fit of this monitor
        start = max(self._fit_end, int(last) + 1)
        self.step_offset = max(start - first_step, 0)
        self.fit_starts.append(first_step + self.step_offset)

    # ----------------------------------------------------------------------------------------------------------
    # Optimizer hooks
    # ----------------------------------------------------------------------------------------------------------
    def _due(self, step: int) -> tuple[bool, bool]:
        log = (step + 1) % self._interval == 0
        hist = self._hist_interval > 0 and (step + 1) % self._hist_interval == 0
        return log, hist

    def _step_index(self, trainer: pl.Trainer) -> int:
        """Index of the current optimizer step, read inside the step (before Lightning increments it).

        Automatic optimization: ``trainer.global_step``. Manual optimization: ``global_step`` counts the steps of
        every optimizer, so two optimizers stepping in each batch would alternate between logging steps; the
        batch counter Lightning itself logs with (``_batches_that_stepped``) keeps them together instead.
        """
        if self._manual:
            batches = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
            if isinstance(batches, int):
                return batches
        return trainer.global_step

    def _computes_here(self) -> bool:
        # DDP: parameters are identical everywhere, so rank zero alone does the work. Sharded: every rank must
        # take part in the collectives.
        trainer = self._trainer
        return trainer is not None and (self._mode == "sharded" or trainer.is_global_zero)

    def _make_pre_hook(self, k: int) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            trainer = self._trainer
            if trainer is None or self._disabled or not any(self._due(self._step_index(trainer))):
                return
            if self._computes_here():
                # Weights do not change between this hook and the update (the closure only runs backward), so
                # this copy is w_old. Freed in the post hook of the same step.
                self._snapshots[k] = take_snapshot(optimizer)

        return hook

    def _make_post_hook(self, k: int) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            trainer = self._trainer
            if trainer is None or self._disabled:
                return
            step = self._step_index(trainer)  # not yet incremented for this step
            log, hist = self._due(step)
            if not (log or hist) or not self._computes_here():
                return
            snapshot = self._snapshots.pop(k, None)
            try:
                split = update_split(
                    optimizer,
                    snapshot=snapshot,
                    steps_per_epoch=self._steps_per_epoch,
                    chunk_numel=self.chunk_numel,
                    reduce=self._reduce,
                    cache=self._plans,
                )
            except Exception as err:
                if self._mode == "sharded":
                    raise  # other ranks are inside collectives; failing loudly beats a hang
                self._disabled = True
                self._warn_once(
                    "error", f"WeightDecayMonitor: disabled after an error at step {step}: {err!r}"
                )
                return
            finally:
                del snapshot
            self._report(k, step, split, log, hist)

        return hook

    # ----------------------------------------------------------------------------------------------------------
    # Reporting
    # ----------------------------------------------------------------------------------------------------------
    def _report(self, k: int, step: int, split: UpdateSplit, log: bool, hist: bool) -> None:
        trainer = self._trainer
        assert trainer is not None
        if split.skipped:
            self.skipped_steps += 1
            return
        label = f"opt{k}." if self._num_optimizers > 1 else ""
        nonfinite = split.nonfinite_tensors
        if nonfinite:
            if step != self._last_nonfinite_step:  # several optimizers stepping in one batch count once
                self.nonfinite_steps += 1
                self._last_nonfinite_step = step
            self._warn_once(
                "nonfinite",
                f"WeightDecayMonitor: NaN/inf weights or updates in {len(nonfinite)} tensor(s) at step {step}"
                f" (first: {nonfinite[0]}); their metrics are left out and counted in"
                f" {COUNTER_PREFIX}/nonfinite_steps.",
            )
        unknown = split.w_old_unknown
        if unknown:
            if step != self._last_unknown_step:
                self.w_old_unknown_steps += 1
                self._last_unknown_step = step
            for group in unknown:
                self._warn_once(*w_old_unknown_message(f"{label}{group.name}", group, step))
        metrics = split.metrics(per_layer=self.per_layer, label_prefix=label)
        metrics[f"{COUNTER_PREFIX}/nonfinite_tensors"] = float(len(nonfinite))
        metrics[f"{COUNTER_PREFIX}/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics[f"{COUNTER_PREFIX}/w_old_unknown_steps"] = float(self.w_old_unknown_steps)
        for group in split.groups:
            self._record(f"{group.prefix}/{label}{group.name}", group, step)
        if not log:
            metrics = {}
        else:
            metrics.update(self._timescale_metrics.get(k, {}))
            # several optimizers stepping in one batch log at one step: keep all of theirs
            if step == self._last_metrics_step:
                self.last_metrics.update(metrics)
            else:
                self.last_metrics = dict(metrics)
            self._last_metrics_step = step
        if not trainer.is_global_zero:
            return
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if hist:
            self._log_histograms(trainer, split, label, step)

    def _record(self, key: str, group: GroupSplit, step: int) -> None:
        series = self.history.setdefault(key, {})
        x = float(step + self.step_offset)
        values = {**group.metrics, "lr": group.lr} if group.metrics else {}  # (a non-finite step: no points)
        for name in _PLOTTED[group.kind]:
            if name in values:
                points = series.setdefault(name, [])
                if points and points[-1][0] >= x:
                    continue  # a hook that fired twice for one step (e.g. LBFGS-style step) records it once
                points.append([x, values[name]])
                self._history_version += 1

    def _log_histograms(self, trainer: pl.Trainer, split: UpdateSplit, label: str, step: int) -> None:
        values: dict[str, list[float]] = {}
        for group in split.groups:
            name = _HISTOGRAM_METRIC[group.kind]
            data = [t.metrics[name] for t in group.tensors if name in t.metrics]
            if data:
                values[f"{KIND_PREFIX[group.kind]}_hist/{label}{group.name}/{name}"] = data
        if values:
            log_histograms(trainer.loggers, values, step)

    def _submit_figure(self, trainer: pl.Trainer) -> None:
        """Draw the summary figure of the history so far in the background (see :class:`FigureWriter`)."""
        # a relative plot_filename (also "plots/wd.png") goes under the log directory, an absolute one as given
        path = os.path.join(figure_dir(trainer), os.path.expanduser(self.plot_filename))
        history = {k: {m: [list(p) for p in pts] for m, pts in v.items()} for k, v in self.history.items()}
        self._figure.submit(
            history,
            path,
            version=self._history_version,
            title=_FIGURE_TITLE,
            fit_starts=list(self.fit_starts),
            prepare=prepare_figure(trainer.loggers),
        )

    def _log_figure(self, trainer: pl.Trainer) -> None:
        """Wait for the figure being drawn, if any, and send it to the loggers."""
        try:
            figure = self._figure.result()
        except Exception as err:
            self._warn_once("figure", f"WeightDecayMonitor: could not write the summary figure: {err!r}")
            return
        finally:
            self._figure.submitted = None
        if figure is not None:
            self.figure_path = figure.path
            log_figure(trainer.loggers, figure, self._figure_step, self._warn_once)

    # ----------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._snapshots = {}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)
