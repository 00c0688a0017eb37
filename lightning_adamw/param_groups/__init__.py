"""Decay / no-decay parameter groups for decoupled weight decay (AdamW).

Pure torch, no Lightning import: everything here takes an ``nn.Module`` and returns plain data, so it can be
tested directly and used from any training loop. Stages, one module each: :mod:`.names` (names from the module
tree, wrappers left out), :mod:`.rules` (what a tensor is), :mod:`.classify` (one decision per tensor),
:mod:`.overrides` (``group_overrides``), :mod:`.depth` (layer depths for ``layer_decay``), :mod:`.groups`
(optimizer groups, ``apply_lr_scales``), :mod:`.report` (the table).

The decay / no-decay classification below is the first axis. ``layer_decay`` (one group per depth, lr scaled by
``layer_decay ** (L + 1 - depth)``), ``group_overrides`` (first matching pattern: its own lr scale and weight
decay) and per-tensor ``param._optim`` hyperparameters split each class further, into groups named
``decay/layer_3``, ``no_decay/embed/<override>``, ``decay/declared_0``.

The rules, in the order they are tried for each parameter (the first that matches wins):

1. ``decay_patterns``      -> decay     (user override, forced decay)
2. ``no_decay_patterns``   -> no_decay  (user override)
3. model-declared          -> no_decay  (names the model lists in ``no_weight_decay()`` / substrings from
   ``no_weight_decay_keywords()``, the timm convention, each module's for its own tensors (names relative to
   it); then tensors flagged ``param._no_weight_decay = True`` (Mamba) or ``param._optim = {"weight_decay": 0.0,
   ...}``; a non-zero ``_optim`` weight decay puts the tensor in decay with that value)
4. normalization module    -> no_decay  (torch's norm types and ``extra_norm_types``: every tensor they own
   directly; a class whose name matches ``norm_class_pattern``: its vector-shaped tensors only, a tensor with two
   or more dimensions larger than 1 there is a matrix (adaLN modulation) and goes on to the next rules, reason
   ``matrix-in-norm:<Class>`` when it ends decayed)
5. bias                    -> no_decay  (``bias`` / ``biases`` is a word of the leaf name: ``bias``,
   ``in_proj_bias``, ``bias_k``, ``relative_position_bias_table``, ``attention_biases``; and embedding tables
   held under a bias name, T5's ``relative_attention_bias``)
6. embedding               -> decay, or no_decay with ``exclude_embeddings=True`` (``nn.Embedding`` /
   ``nn.EmbeddingBag`` weights; learned tokens and arrays whatever their shape, by the last word of the leaf name:
   ``pos_embed``, ``class_embedding``, ``masked_spec_embed``, ``cls_token``, ``register_tokens``, ``latents``;
   tables held by an embeddings module that are not a layer's weight: Perceiver's ``embeddings.latents``,
   Reformer's ``position_embeddings.weights.0``)
7. vector-shaped           -> no_decay  (``ndim <= 1``: reason ``1-D``; at most one dimension larger than 1 and
   not the weight of a Linear/Conv/Embedding-like layer, e.g. GRN's (1, 1, 1, C) gain: reason ``vector-shaped``)
8. everything else         -> decay

A pattern that matches no parameter is an error (a typo must not pass silently), and a parameter that a
forced-decay and a no-decay pattern both match is an error naming it.
"""

from __future__ import annotations

# Internals of the former single-file module, kept importable from here (``x as x`` marks a re-export).
from lightning_adamw.param_groups.classify import _attached_wrapper as _attached_wrapper
from lightning_adamw.param_groups.classify import _is_flat_parameter as _is_flat_parameter
from lightning_adamw.param_groups.classify import classify_parameters, fsdp_original_shapes
from lightning_adamw.param_groups.depth import BLOCK_CONTAINERS, DepthPlan, find_depths, matcher_layer_ids
from lightning_adamw.param_groups.groups import (
    apply_lr_scales,
    build_param_groups,
    check_lr_scales,
    check_unique_group_names,
    group_hparams,
    group_sizes,
    group_weight_decay,
    groups_from_decisions,
)
from lightning_adamw.param_groups.names import WRAPPER_PREFIXES, clean_param_name, parameter_names
from lightning_adamw.param_groups.overrides import GroupOverride, check_group_overrides
from lightning_adamw.param_groups.report import describe_param_groups
from lightning_adamw.param_groups.rules import (
    DECAY,
    DEFAULT_MATRIX_CLASS_PATTERN,
    DEFAULT_NORM_CLASS_PATTERN,
    MATRIX_TYPES,
    NO_DECAY,
    NORM_TYPES,
    ParamDecision,
)

__all__ = [
    "BLOCK_CONTAINERS",
    "DECAY",
    "DEFAULT_MATRIX_CLASS_PATTERN",
    "DEFAULT_NORM_CLASS_PATTERN",
    "MATRIX_TYPES",
    "NORM_TYPES",
    "NO_DECAY",
    "WRAPPER_PREFIXES",
    "DepthPlan",
    "GroupOverride",
    "ParamDecision",
    "apply_lr_scales",
    "build_param_groups",
    "check_group_overrides",
    "check_lr_scales",
    "check_unique_group_names",
    "classify_parameters",
    "clean_param_name",
    "describe_param_groups",
    "find_depths",
    "fsdp_original_shapes",
    "group_hparams",
    "group_sizes",
    "group_weight_decay",
    "groups_from_decisions",
    "matcher_layer_ids",
    "parameter_names",
]
