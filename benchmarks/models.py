"""Models the benchmarks run: a small GPT, Llama-shaped skeletons, and their Lightning wrappers.

The plain ``nn.Module`` models need only torch (the GPU script builds them on CUDA); the Lightning wrappers
use :class:`~lightning_adamw.DecoupledWeightDecayMixin`, so the optimizer in every fit benchmark is exactly
the one a user of the package gets: foreach AdamW over the decay / no-decay groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "GPT",
    "LLAMA_SHAPES",
    "GPTConfig",
    "LlamaConfig",
    "LlamaSkeleton",
    "build_meta",
    "count_params",
    "gpt_loader",
    "lightning_gpt",
    "synthetic_tokens",
]


# ----------------------------------------------------------------------------------------------- small GPT


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-2-style decoder: embeddings, pre-LN blocks with biases, tied head. 12 tensors per block."""

    vocab: int = 128
    seq: int = 64
    dim: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    @property
    def n_tensors(self) -> int:
        # wte, wpe, 12 per block, final LayerNorm weight and bias (the head is tied to wte)
        return 2 + 12 * self.layers + 2


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Small decoder-only transformer; ``forward(tokens)`` returns logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2: the grouping must list it once

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def synthetic_tokens(cfg: GPTConfig, n: int, seed: int = 0) -> torch.Tensor:
    """``(n, seq + 1)`` token ids from a fixed order-2 rule plus noise: learnable and deterministic."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, cfg.seq + 1, dtype=torch.long)
    tokens[:, :2] = torch.randint(0, cfg.vocab, (n, 2), generator=g)
    noise = torch.randint(0, cfg.vocab, (n, cfg.seq + 1), generator=g)
    keep = torch.rand(n, cfg.seq + 1, generator=g) < 0.8
    for t in range(2, cfg.seq + 1):
        nxt = (tokens[:, t - 1] * 7 + tokens[:, t - 2] * 3 + 1) % cfg.vocab
        tokens[:, t] = torch.where(keep[:, t], nxt, noise[:, t])
    return tokens


# ----------------------------------------------------------------------------------------------- Llama
# skeletons


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama-style model (RMSNorm, SwiGLU, grouped-query attention, untied head).

    9 tensors per layer, 3 more outside the layers.
    """

    name: str
    dim: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def n_params(self) -> int:
        kv = self.dim // self.heads * self.kv_heads
        per_layer = 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * self.ffn + 2 * self.dim
        return self.layers * per_layer + 2 * self.vocab * self.dim + self.dim

    @property
    def n_tensors(self) -> int:
        return 9 * self.layers + 3


#: From GPT-2-small size to Llama-2-70B (published shapes for 7B/13B/70B, Code Llama 34B).
LLAMA_SHAPES: tuple[LlamaConfig, ...] = (
    LlamaConfig("125M", dim=768, layers=12, ffn=2048, heads=12, kv_heads=12),
    LlamaConfig("1.3B", dim=2048, layers=24, ffn=5504, heads=16, kv_heads=16),
    LlamaConfig("7B", dim=4096, layers=32, ffn=11008, heads=32, kv_heads=32),
    LlamaConfig("13B", dim=5120, layers=40, ffn=13824, heads=40, kv_heads=40),
    LlamaConfig("34B", dim=8192, layers=48, ffn=22016, heads=64, kv_heads=8),
    LlamaConfig("70B", dim=8192, layers=80, ffn=28672, heads=64, kv_heads=8),
)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        kv = cfg.dim // cfg.heads * cfg.kv_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim)
        self.mlp = LlamaMLP(cfg)


class LlamaSkeleton(nn.Module):
    """The parameters of a Llama-style model and nothing else (no forward).

    That is all the grouping and the optimizer see. Build it under ``torch.device("meta")`` for shapes only,
    or on CUDA for the GPU optimizer benchmark.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)


def count_params(module: nn.Module) -> tuple[int, int]:
    """``(number of tensors, number of elements)`` of the distinct trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    return len(params), sum(p.numel() for p in params)


def build_meta(cfg: LlamaConfig) -> LlamaSkeleton:
    """The skeleton on the meta device: shapes and dtypes only, no memory, built in milliseconds."""
    with torch.device("meta"):
        return LlamaSkeleton(cfg)


# ----------------------------------------------------------------------------------------------- Lightning


def lightning_gpt(cfg: GPTConfig, **hparams: Any) -> Any:
    """A ``LightningModule`` (with the package's mixin) training :class:`GPT` on next-token prediction."""
    import lightning as L

    from lightning_adamw.mixin import DecoupledWeightDecayMixin

    class GPTModule(DecoupledWeightDecayMixin, L.LightningModule):
        def __init__(
            self, lr: float = 1e-3, weight_decay: float = 0.1, print_param_groups: bool = False
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = GPT(cfg)

        def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (tokens,) = batch
            logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            self.log("train_loss", loss)
            return loss

    return GPTModule(**hparams)


def gpt_loader(cfg: GPTConfig, batch_size: int, n_samples: int, seed: int = 0) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(synthetic_tokens(cfg, n_samples, seed))
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
