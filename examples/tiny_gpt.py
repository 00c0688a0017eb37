"""A tiny decoder-only transformer on Python's own source code, with decoupled weight decay done right.

Character-level GPT (pre-norm blocks with RMSNorm or LayerNorm, causal self-attention, tied input / output
embeddings) trained on the source of a few standard-library modules, read from the Python installation that runs
the script (no download). It shows the three places where weight-decay grouping goes wrong in transformers:

* **embeddings**: decayed by default (as in GPT-2 / nanoGPT); ``--model.exclude_embeddings true`` moves the token
  and position tables to the no-decay group;
* **the tied head**: ``head.weight`` *is* ``tok_emb.weight``; it must be one tensor in one group, once;
* **norms and biases**: RMSNorm / LayerNorm gains and all biases are never decayed.

Before training it prints the grouping table (every tensor, its group, the rule, tied aliases); during training
:class:`~lightning_adamw.WeightDecayMonitor` logs every tensor's decay and gradient update
(``adamw_layer/<param>/...``); at the end it prints the per-layer monitor table, validation loss in bits per
character against the unigram baseline, and a generated sample.

Run it::

    python examples/tiny_gpt.py                                    # ~2-3 min on 2 CPU cores
    python examples/tiny_gpt.py --model.exclude_embeddings true    # embeddings in the no-decay group
    python examples/tiny_gpt.py --config examples/configs/tiny_gpt.yaml
    python examples/tiny_gpt.py --help

Outputs in ``lightning_logs/tiny_gpt/version_N/``: ``metrics.csv``, ``config.yaml``, ``weight_decay_monitor.png``,
``per_layer_decay.png`` and ``summary.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_adamw import (
    AdamWCLI,
    DecoupledWeightDecayMixin,
    WeightDecayMonitor,
    classify_parameters,
    describe_param_groups,
)

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

#: Standard-library modules whose source is the corpus (about 250 kB of Python and English docstrings).
DEFAULT_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "string", "difflib", "shlex")


# ================================================================================================ data


def load_stdlib_source(modules: Sequence[str]) -> str:
    """The source text of ``modules`` from this Python's standard library, concatenated."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if origin is None or not origin.endswith(".py"):
            raise ValueError(
                f"module {name!r} has no Python source file (built-in or compiled): pick another one"
            )
        parts.append(Path(origin).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


class CharWindows(Dataset):
    """``(x, y)`` windows of ``block_size`` characters, ``y`` shifted by one, starting every ``stride`` chars."""

    def __init__(self, data: torch.Tensor, block_size: int, stride: int) -> None:
        if len(data) <= block_size + 1:
            raise ValueError(f"text of {len(data)} characters is too short for block_size={block_size}")
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.data) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.stride
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class StdlibTextDataModule(L.LightningDataModule):
    """Character-level language modelling on standard-library source code.

    Args:
        modules: standard-library modules whose ``.py`` source is the corpus.
        block_size: context length in characters.
        stride: distance between training windows (``None``: half a block, so windows overlap).
        batch_size: windows per batch.
        val_fraction: the last part of the text, held out for validation (and test).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        block_size: int = 128,
        stride: int | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 0.5:
            raise ValueError(f"`val_fraction` must be in (0, 0.5), got {val_fraction}")
        self.save_hyperparameters()
        self.modules = list(modules or DEFAULT_MODULES)
        self.text = load_stdlib_source(self.modules)
        # The vocabulary is known at construction, so LightningCLI can link it to the model's vocab_size.
        self.chars = sorted(set(self.text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in self.text], dtype=torch.long)
        split = int(len(data) * (1 - val_fraction))
        self.train_data, self.val_data = data[:split], data[split:]
        self.block_size = block_size
        self.stride = stride or max(block_size // 2, 1)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text if c in self.stoi]

    def unigram_bits_per_char(self) -> float:
        """Entropy of the training text's character distribution: what a model that ignores context gets."""
        counts = Counter(self.train_data.tolist())
        total = sum(counts.values())
        return -sum(c / total * math.log2(c / total) for c in counts.values())

    def train_dataloader(self) -> DataLoader:
        windows = CharWindows(self.train_data, self.block_size, self.stride)
        return DataLoader(windows, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        # Non-overlapping windows: every validation character is scored once.
        windows = CharWindows(self.val_data, self.block_size, self.block_size)
        return DataLoader(windows, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ================================================================================================ model


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"`norm` must be 'rmsnorm' or 'layernorm', got {kind!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `n_heads` ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, dim = x.shape
        q, k, v = (
            t.view(batch, time, self.n_heads, dim // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(dim, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, time, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, norm: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, bias, dropout)
        self.norm2 = make_norm(norm, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=bias),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(DecoupledWeightDecayMixin, L.LightningModule):
    """Character-level GPT with tied embeddings and the decay / no-decay groups of the mixin.

    Args:
        vocab_size: number of characters (linked from the data module by the CLI).
        block_size: context length (linked from the data module).
        d_model: width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        bias: biases in the linear layers (they go to the no-decay group).
        dropout: dropout in attention and MLP.
        tie_embeddings: share the token embedding with the output head (one tensor, one group).
        lr: peak learning rate of AdamW (linear warm-up, then cosine to ``min_lr_ratio``).
        weight_decay: decoupled weight decay of the ``decay`` group.
        betas: AdamW betas (0.95 is the usual second-moment beta for transformers).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        exclude_embeddings: put the token and position embeddings (and so the tied head) in the no-decay group.
        print_param_groups: let the mixin print its group table at fit start (the script prints a fuller
            one itself, so off by default).
    """

    def __init__(
        self,
        vocab_size: int = 128,
        block_size: int = 128,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        norm: str = "rmsnorm",
        bias: bool = True,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.1,
        exclude_embeddings: bool = False,
        print_param_groups: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr_schedule = "cosine"
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, norm, bias, dropout) for _ in range(n_layers))
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_embeddings:
            # After init: the head *is* the embedding table (one Parameter, two names).
            self.head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                # GPT-2: scale the residual projections by 1/sqrt(2 * layers) so the residual stream stays O(1).
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_bpc", loss / math.log(2), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("test_loss", loss)
        self.log("test_bpc", loss / math.log(2))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, new_tokens: int, temperature: float = 0.8, seed: int = 0
    ) -> torch.Tensor:
        """Sample ``new_tokens`` characters after ``idx`` (shape ``(1, T)``)."""
        generator = torch.Generator(device=idx.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        for _ in range(new_tokens):
            logits = self(idx[:, -self.hparams.block_size :])[:, -1] / max(temperature, 1e-6)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx


# ================================================================================================ CLI


class TinyGPTCLI(AdamWCLI):
    """:class:`~lightning_adamw.AdamWCLI` for :class:`TinyGPT` on :class:`StdlibTextDataModule`, with the monitor."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(WeightDecayMonitor, "monitor")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size", apply_on="instantiate")
        parser.add_argument("--sample_chars", type=int, default=300, help="characters to generate at the end")
        parser.add_argument(
            "--sample_prompt", type=str, default="def ", help="prompt of the generated sample"
        )
        parser.set_defaults(
            {
                "monitor.per_layer": True,
                "trainer.max_steps": 600,
                "trainer.val_check_interval": 200,
                "trainer.check_val_every_n_epoch": None,
                "trainer.log_every_n_steps": 20,
                "trainer.gradient_clip_val": 1.0,
                "trainer.logger": {
                    "class_path": f"{CSVLogger.__module__}.CSVLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "tiny_gpt"},
                },
            }
        )


def grouping_table(model: TinyGPT) -> str:
    """The package's group summary plus one line per tensor: group, rule, shape, tied aliases."""
    options = model.grouping_options()
    decisions = classify_parameters(model, **options)
    lines = [describe_param_groups(decisions=decisions, weight_decay=model.hparams.weight_decay), ""]
    lines.append(f"{'tensor':<32} {'group':<9} {'rule':<16} {'shape':<14} tied to")
    for d in decisions:
        lines.append(
            f"{d.name:<32} {d.group:<9} {d.reason:<16} {'x'.join(map(str, d.shape)):<14} {', '.join(d.aliases)}"
        )
    return "\n".join(lines)


def per_layer_table(metrics: dict[str, float]) -> tuple[str, list[dict[str, Any]]]:
    """Rows of the monitor's last per-tensor metrics (``adamw_layer/<param>/<metric>``), as text and dicts."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        if not key.startswith("adamw_layer/"):
            continue
        name, metric = key[len("adamw_layer/") :].rsplit("/", 1)
        rows.setdefault(name, {"tensor": name})[metric] = value
    cols = ("weight_norm", "decay_norm", "grad_update_norm", "decay_to_grad_ratio", "angular_update")
    header = f"{'tensor':<32} " + " ".join(f"{c:>19}" for c in cols)
    lines = [header, "-" * len(header)]
    for row in rows.values():
        lines.append(f"{row['tensor']:<32} " + " ".join(f"{row.get(c, math.nan):>19.3e}" for c in cols))
    return "\n".join(lines), list(rows.values())


def plot_per_layer(rows: list[dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(10.0, 0.28 * max(len(rows), 8) + 1.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names = [r["tensor"] for r in rows]
    ys = range(len(rows))
    ax.barh(
        [y - 0.2 for y in ys], [r.get("decay_norm", 0.0) for r in rows], height=0.4, label="decay ‖lr·λ·w‖"
    )
    ax.barh(
        [y + 0.2 for y in ys],
        [r.get("grad_update_norm", 0.0) for r in rows],
        height=0.4,
        label="gradient ‖lr·u‖",
    )
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1e-8)
    ax.set_xlabel("norm of this step's part (last logged step)")
    ax.set_title("WeightDecayMonitor per layer: no-decay tensors have no red bar")
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Print the grouping, train, print the per-layer monitor, the validation bits per char and a sample."""
    cli = TinyGPTCLI(
        TinyGPT,
        StdlibTextDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        run=False,
        args=list(args) if args is not None else None,
        parser_kwargs={"prog": "tiny_gpt.py"},
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    assert isinstance(model, TinyGPT) and isinstance(data, StdlibTextDataModule)
    print(
        f"\ntiny_gpt: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {data.vocab_size} chars, "
        f"{len(data.train_data):,} training chars from {', '.join(data.modules)}"
    )
    print(
        f"exclude_embeddings={model.hparams.exclude_embeddings}; parameter groups:\n{grouping_table(model)}\n"
    )

    trainer.fit(model, datamodule=data)
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, WeightDecayMonitor))
    table, rows = per_layer_table(monitor.last_metrics)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_per_layer(rows, log_dir / "per_layer_decay.png") if rows else None

    config = cli.config
    prompt = config.get("sample_prompt", "def ")
    ids = torch.tensor([data.encode(prompt) or [0]], device=model.device)
    sample = data.decode(model.generate(ids, int(config.get("sample_chars", 300)))[0].tolist())

    unigram = data.unigram_bits_per_char()
    summary = {
        "log_dir": str(log_dir),
        "steps": trainer.global_step,
        "exclude_embeddings": model.hparams.exclude_embeddings,
        "norm": model.hparams.norm,
        "vocab_size": data.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "groups": {
            g: [d.name for d in classify_parameters(model, **model.grouping_options()) if d.group == g]
            for g in ("decay", "no_decay")
        },
        "test_loss": float(tested["test_loss"]),
        "test_bpc": float(tested["test_bpc"]),
        "unigram_bpc": unigram,
        "per_layer": rows,
        "monitor_group": {k: v for k, v in monitor.last_metrics.items() if k.startswith("adamw/")},
        "sample": sample,
        "plots": {"per_layer": str(plot) if plot else None, "monitor": monitor.figure_path},
    }
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nWeightDecayMonitor, per layer (step {trainer.global_step - 1}):\n{table}")
    print(
        f"\nsample ({len(sample) - len(prompt)} generated characters after {prompt!r}):\n{'-' * 60}\n{sample}\n{'-' * 60}"
    )
    print(
        f"tiny_gpt: held-out {summary['test_bpc']:.3f} bits/char (unigram baseline {unigram:.3f}) after "
        f"{trainer.global_step} steps; exclude_embeddings={summary['exclude_embeddings']}; logs and plots: {log_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
