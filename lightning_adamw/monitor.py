r"""
Weight Decay Monitor
====================

Shows, while training runs, how every AdamW step splits into its decoupled-decay part and its gradient part.
The numbers are computed by :mod:`lightning_adamw.update_split`; this module is the Lightning shell around it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_adamw.optim_checks import is_adam_family
from lightning_adamw.update_split import (
    KIND_PREFIX,
    W_OLD_MAX_RELATIVE_ERROR,
    GroupSplit,
    ShardReduce,
    UpdateSplit,
    dtensor_weight,
    group_label,
    group_labels,
    layer_labels,
    param_labels,
    take_snapshot,
    update_split,
)

__all__ = ["WeightDecayMonitor"]

# Metrics kept (per group) for the summary figure and restored from checkpoints.
_PLOTTED: dict[str, tuple[str, ...]] = {
    "adamw": ("decay_norm", "grad_update_norm", "decay_to_grad_ratio"),
    "adam_l2": (
        "eff_decay_rate_min",
        "eff_decay_rate_median",
        "eff_decay_rate_max",
        "uniform_decay_rate",
        "l2_grad_share",
    ),
    "generic": ("update_norm", "weight_norm"),
}
# Per-layer quantity whose distribution over the layers of a group is logged as a histogram.
_HISTOGRAM_METRIC: dict[str, str] = {
    "adamw": "decay_to_grad_ratio",
    "adam_l2": "l2_grad_share",
    "generic": "update_to_weight",
}
_COUNTER_PREFIX = "adamw"
_IMAGE_KEY = "adamw/summary"


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
    ==================================  ===================================================================

    The last four are left out when ``weight_decay == 0``. Groups, and tensors, sum their squared norms and dot
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
        self._disabled = False
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
        self._last_nonfinite_step = self._last_unknown_step = -1
        self._start_fit(self._step_index(trainer))
        # Trainer(log_every_n_steps=0) switches Lightning's own logging off; the monitor then keeps its default.
        self._interval = self.log_every_n_steps or int(trainer.log_every_n_steps) or 50
        if self.histogram_every_n_steps is None:
            self._hist_interval = 10 * self._interval
        else:
            self._hist_interval = self.histogram_every_n_steps
        self._steps_per_epoch = _steps_per_epoch(trainer, pl_module)
        self._manual = not pl_module.automatic_optimization
        self._mode, self._reduce = _distribution_mode(trainer)
        if not trainer.loggers:
            self._warn_once(
                "no-logger",
                "WeightDecayMonitor: the Trainer has no logger, so nothing is logged; the metrics stay in"
                " `monitor.last_metrics` and the summary figure goes to `default_root_dir`.",
            )
        optimizers = list(trainer.optimizers)
        self._num_optimizers = len(optimizers)
        for k, optimizer in enumerate(optimizers):
            self._warn_duplicate_names(k, optimizer)
            if not is_adam_family(optimizer):
                name = type(optimizer).__name__
                self._warn_once(
                    f"generic-{name}",
                    f"WeightDecayMonitor: {name} has no Adam state (exp_avg/exp_avg_sq) to split into decay and"
                    " gradient parts; logging only optim/<group>/{update_norm, weight_norm, update_to_weight,"
                    " angular_update}, measured from a copy of the weights taken on logging steps.",
                )
                self._handles.append(optimizer.register_step_pre_hook(self._make_pre_hook(k)))
            self._handles.append(optimizer.register_step_post_hook(self._make_post_hook(k)))
        if trainer.is_global_zero:
            self._define_wandb_metrics(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._fit_end = self.step_offset + self._step_index(trainer)
        if self.plot and trainer.is_global_zero and self.history:
            self._write_figure(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

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
                f" {_COUNTER_PREFIX}/nonfinite_steps.",
            )
        unknown = split.w_old_unknown
        if unknown:
            if step != self._last_unknown_step:
                self.w_old_unknown_steps += 1
                self._last_unknown_step = step
            for group in unknown:
                self._warn_w_old_unknown(f"{label}{group.name}", group, step)
        metrics = split.metrics(per_layer=self.per_layer, label_prefix=label)
        metrics[f"{_COUNTER_PREFIX}/nonfinite_tensors"] = float(len(nonfinite))
        metrics[f"{_COUNTER_PREFIX}/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics[f"{_COUNTER_PREFIX}/w_old_unknown_steps"] = float(self.w_old_unknown_steps)
        for group in split.groups:
            self._record(f"{group.prefix}/{label}{group.name}", group, step)
        if not log:
            metrics = {}
        else:
            self.last_metrics = metrics
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
        for name in _PLOTTED[group.kind]:
            if name in group.metrics:
                points = series.setdefault(name, [])
                if points and points[-1][0] >= x:
                    continue  # a hook that fired twice for one step (e.g. LBFGS-style step) records it once
                points.append([x, group.metrics[name]])

    def _log_histograms(self, trainer: pl.Trainer, split: UpdateSplit, label: str, step: int) -> None:
        values: dict[str, list[float]] = {}
        for group in split.groups:
            name = _HISTOGRAM_METRIC[group.kind]
            data = [t.metrics[name] for t in group.tensors if name in t.metrics]
            if data:
                values[f"{KIND_PREFIX[group.kind]}_hist/{label}{group.name}/{name}"] = data
        if not values:
            return
        for logger in trainer.loggers:
            if _is_wandb(logger):
                import wandb

                logger.experiment.log(
                    {
                        **{key: wandb.Histogram(data) for key, data in values.items()},
                        "trainer/global_step": step,
                    }
                )
            elif _is_tensorboard(logger):
                import numpy as np

                for key, data in values.items():
                    logger.experiment.add_histogram(key, np.asarray(data, dtype=np.float64), global_step=step)

    def _define_wandb_metrics(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            if not _is_wandb(logger):
                continue
            define = getattr(logger.experiment, "define_metric", None)
            if define is None:
                continue
            # Charts of these metrics use the trainer step as x axis (not W&B's internal call counter).
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""
            define("trainer/global_step")
            for kind_prefix in sorted({*KIND_PREFIX.values()}):
                for suffix in ("", "_layer", "_hist"):
                    define(f"{prefix}{kind_prefix}{suffix}/*", step_metric="trainer/global_step")

    def _write_figure(self, trainer: pl.Trainer) -> None:
        from lightning_adamw.monitor_plot import plot_history

        # a relative plot_filename (also "plots/wd.png") goes under the log directory, an absolute one as given
        path = os.path.join(_figure_dir(trainer), os.path.expanduser(self.plot_filename))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig = plot_history(
            self.history, title="WeightDecayMonitor: decay vs gradient update", fit_starts=self.fit_starts
        )
        fig.savefig(path, dpi=100)
        self.figure_path = path
        last_step = trainer.global_step
        for logger in trainer.loggers:
            try:
                if _is_wandb(logger):
                    logger.log_image(key=_IMAGE_KEY, images=[path], step=last_step)
                elif _is_tensorboard(logger):
                    logger.experiment.add_figure(_IMAGE_KEY, fig, global_step=last_step, close=False)
            except Exception as err:  # a logger refusing an image must not fail the end of training
                self._warn_once(
                    f"image-{type(logger).__name__}", f"WeightDecayMonitor: could not log figure: {err!r}"
                )

    # ----------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._snapshots = {}

    def _warn_duplicate_names(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Say in plain words how groups and tensors with the same names are told apart in the metric keys."""
        groups = optimizer.param_groups
        where = (
            f"optimizer {k} ({type(optimizer).__name__})"
            if self._num_optimizers > 1
            else type(optimizer).__name__
        )
        prefix = f"opt{k}." if self._num_optimizers > 1 else ""
        raw = [group_label(g, i) for i, g in enumerate(groups)]
        labels = group_labels(groups)
        if raw != labels:
            renamed = ", ".join(
                f"group {i} '{r}' as '{prefix}{u}'"
                for i, (r, u) in enumerate(zip(raw, labels, strict=True))
                if raw.count(r) > 1
            )
            self._warn_once(
                f"duplicate-groups-{k}",
                f"WeightDecayMonitor: {where} has several parameter groups with the same name"
                f" ({sorted({r for r in raw if raw.count(r) > 1})}); they are logged apart, {renamed}"
                " (e.g. adamw/<label>/decay_norm). Lightning's LearningRateMonitor refuses duplicate group"
                " names: give each group its own 'name', e.g. build the groups of each part with"
                ' `build_param_groups(self.backbone, weight_decay, group_prefix="backbone")`.',
            )
        if not self.per_layer:
            return
        names = [param_labels(g, i, label=labels[i]) for i, g in enumerate(groups)]
        pairs = [
            (n, key)
            for ns, ks in zip(names, layer_labels(groups), strict=True)
            for n, key in zip(ns, ks, strict=True)
            if key != n
        ]
        if pairs:
            qualified = sorted({n for n, _ in pairs})
            shown = ", ".join(qualified[:5]) + (
                f" and {len(qualified) - 5} more" if len(qualified) > 5 else ""
            )
            self._warn_once(
                f"duplicate-tensors-{k}",
                f"WeightDecayMonitor: tensor names {shown} appear in more than one parameter group of {where};"
                " their per-layer metrics are logged under the group's label,"
                f" <prefix>_layer/{prefix}<group>/<name>/<metric> (e.g. adamw_layer/{prefix}{pairs[0][1]}"
                "/decay_norm).",
            )

    def _warn_w_old_unknown(self, label: str, group: GroupSplit, step: int) -> None:
        q = 1.0 - group.lr * group.weight_decay
        self._warn_once(
            f"w-old-{label}",
            f"WeightDecayMonitor: group '{label}' has lr = {group.lr:g} and weight_decay = {group.weight_decay:g}"
            f" at step {step}, so AdamW multiplied its weights by 1 - lr*weight_decay = {q:.3g}: the weights"
            " before the step cannot be recovered from the optimizer state to better than"
            f" {W_OLD_MAX_RELATIVE_ERROR:.1%} in the parameters' precision. decay_norm, decay_to_grad_ratio,"
            " update_norm, update_to_weight, cos_grad_update_weight and angular_update are left out for this"
            f" group while this lasts (logging steps counted in {_COUNTER_PREFIX}/w_old_unknown_steps);"
            " grad_update_norm, weight_norm and uniform_decay_rate are still logged. lr*weight_decay near 1"
            " wipes out the weights at every step: check the learning rate and weight_decay.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


def _is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def _is_tensorboard(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def _figure_dir(trainer: pl.Trainer) -> str:
    # Same choice as `trainer.log_dir`, without its broadcast (this runs on rank zero only).
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (CSVLogger, TensorBoardLogger)) else logger.save_dir
        if directory:
            return str(directory)
    return str(trainer.default_root_dir)


def _steps_per_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    batches = trainer.num_training_batches
    if not pl_module.automatic_optimization or not math.isfinite(batches) or batches <= 0:
        return None  # manual optimization steps whenever it likes; iterable datasets have no epoch length
    return float(math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1)))


def _distribution_mode(trainer: pl.Trainer) -> tuple[str, ShardReduce | None]:
    if trainer.world_size <= 1:
        return "single", None
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    sharded = isinstance(strategy, ModelParallelStrategy)
    weight = dtensor_weight
    if isinstance(strategy, FSDPStrategy):
        mode = str(getattr(strategy, "sharding_strategy", "FULL_SHARD")).upper()
        sharded = "NO_SHARD" not in mode
        if "HYBRID" in mode:
            # hybrid sharding: shards within a node, replicas across nodes -> count each replica once
            replicas = max(trainer.world_size // max(trainer.num_devices, 1), 1)
            weight = lambda p: 1.0 / replicas  # noqa: E731
    if not sharded:
        sharded = any(
            _is_dtensor(p)
            for opt in trainer.optimizers
            for group in opt.param_groups
            for p in group["params"]
        )
    if sharded:
        return "sharded", ShardReduce.torch_distributed(weight=weight)
    return "replicated", None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)
