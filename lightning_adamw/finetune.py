"""``ViTFineTuner``: a Vision Transformer classifier with layer-wise learning-rate decay, for the CLI and the docs.

The recipe of BEiT / MAE / DeiT-III fine-tuning: AdamW, warm-up + cosine, weight decay on matrices only, and each
block's learning rate ``layer_decay`` times the next one's (``configs/finetune_layer_decay.yaml``)::

    lightning-adamw fit --config configs/finetune_layer_decay.yaml
    lightning-adamw fit --config configs/finetune_layer_decay.yaml --model.layer_decay 0.75

The network is Hugging Face ``transformers``' ``ViTForImageClassification``, built from a ``ViTConfig`` (random
weights, no download: small enough to train on the 8x8 scikit-learn digits on a CPU), or loaded with
``pretrained="google/vit-base-patch16-224-in21k"``-style names when you have the weights. ``transformers`` is a
dev extra (``pip install -e '.[dev]'``); it is imported only when the model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_adamw.demo import DigitsTask
from lightning_adamw.mixin import DecoupledWeightDecayMixin

__all__ = ["ViTFineTuner"]


def _vit(
    pretrained: str | None,
    num_classes: int,
    image_size: int,
    patch_size: int,
    num_channels: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
) -> nn.Module:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is installed with the dev extra
        raise ImportError(
            "ViTFineTuner needs Hugging Face transformers: pip install transformers (or the dev extra)"
        ) from err
    if pretrained is not None:
        return transformers.ViTForImageClassification.from_pretrained(
            pretrained, num_labels=num_classes, ignore_mismatched_sizes=True
        )
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        num_labels=num_classes,
    )
    return transformers.ViTForImageClassification(config)


class ViTFineTuner(DecoupledWeightDecayMixin, DigitsTask):
    """ViT image classifier trained with per-depth learning rates (see :func:`lightning_adamw.build_param_groups`).

    Args:
        lr: learning rate of the head (depth L + 1); block ``k`` gets ``lr * layer_decay ** (L + 1 - k)``, the
            embeddings ``lr * layer_decay ** (L + 1)``.
        weight_decay: decoupled weight decay of the decay groups (norms, biases, gains: none, at every depth).
        betas, eps: AdamW's.
        layer_decay: layer-wise lr decay in (0, 1]; ``None`` turns it off (one lr, groups ``decay`` / ``no_decay``).
        layer_id: callable ``name -> depth`` instead of the block index in the names (``vit.layers.<N>``).
        num_layers: ``L`` for the formula (default: the number of blocks).
        group_overrides: list of ``{pattern, name, lr_scale, weight_decay | weight_decay_scale}`` (first match
            wins; scales multiply the layer decay).
        no_decay_patterns, decay_patterns, exclude_embeddings: the grouping options.
        lr_schedule, warmup_steps, min_lr_ratio: the built-in warm-up + cosine schedule (per step).
        pretrained: a Hugging Face model name or path to load (needs the weights); ``None`` builds the network
            below from a config with random weights.
        num_classes, image_size, patch_size, num_channels, hidden_size, depth, num_heads: the network built
            when ``pretrained`` is ``None`` (defaults fit the 8x8 one-channel digits).
        weight_decay_schedule, ema_timescale_epochs, ema_timescale_fraction: weight decay over time and set by
            its EMA timescale (see :class:`~lightning_adamw.demo.DigitsClassifier`).
        optimizer, lr_scheduler: callables injected by LightningCLI (``--model.optimizer``): they receive the
            groups, and the lr scales are applied to whatever optimizer they build.

    Data: without a data module the ``*_dataloader`` methods serve :class:`~lightning_adamw.demo.DigitsDataModule`.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        layer_decay: float | None = 0.65,
        layer_id: Callable[[str], int] | None = None,
        num_layers: int | None = None,
        group_overrides: list[dict[str, Any]] | None = None,
        no_decay_patterns: list[str] | None = None,
        decay_patterns: list[str] | None = None,
        exclude_embeddings: bool = False,
        lr_schedule: str = "cosine",
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.01,
        pretrained: str | None = None,
        num_classes: int = 10,
        image_size: int = 8,
        patch_size: int = 2,
        num_channels: int = 1,
        hidden_size: int = 32,
        depth: int = 4,
        num_heads: int = 4,
        weight_decay_schedule: dict[str, Any] | str | None = None,
        ema_timescale_epochs: float | None = None,
        ema_timescale_fraction: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "layer_id"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.layer_id = (
            layer_id  # a callable: read by the mixin from the instance, not saved as a hyperparameter
        )
        self.model = _vit(
            pretrained, num_classes, image_size, patch_size, num_channels, hidden_size, depth, num_heads
        )
        self._init_digits_task(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits
