"""Grouping on real third-party architectures (Hugging Face transformers, built from tiny configs, no download).

For every family the expectation is written out independently of the rules: in these architectures every
parameter with ``ndim >= 2`` is a matrix/conv/embedding to decay and every parameter with ``ndim <= 1`` is a
norm weight/bias, a bias or a layer-scale gain, and we also check *which* rule claimed the norm tensors, so a
norm recognised only by accident (through the 1-D rule) fails the test.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters
from lightning_adamw.param_groups import DECAY, NO_DECAY

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev extra: pip install -e '.[dev]'"
)


def _tiny_models() -> dict[str, tuple[nn.Module, dict[str, int]]]:
    """model, and the number of norm-owned tensors each norm class should claim."""
    t = transformers
    warnings.filterwarnings("ignore")
    return {
        "llama (RMSNorm LLM, tied)": (
            t.LlamaForCausalLM(
                t.LlamaConfig(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    tie_word_embeddings=True,
                )
            ),
            {"norm:LlamaRMSNorm": 5},
        ),
        "bert (encoder)": (
            t.BertForMaskedLM(
                t.BertConfig(
                    vocab_size=64,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                )
            ),
            {"norm:LayerNorm": 12},
        ),
        "t5 (encoder-decoder, T5LayerNorm)": (
            t.T5ForConditionalGeneration(
                t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
            ),
            {"norm:T5LayerNorm": 12},
        ),
        "bart (encoder-decoder)": (
            t.BartForConditionalGeneration(
                t.BartConfig(
                    vocab_size=64,
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                )
            ),
            {"norm:LayerNorm": 14},
        ),
        "gpt2 (Conv1D, tied)": (
            t.GPT2LMHeadModel(
                t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
            ),
            {"norm:LayerNorm": 10},
        ),
        "vit (vision transformer)": (
            t.ViTForImageClassification(
                t.ViTConfig(
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                    image_size=32,
                    patch_size=8,
                )
            ),
            {"norm:LayerNorm": 10},
        ),
        "convnext (custom LayerNorm, layer scale)": (
            t.ConvNextForImageClassification(
                t.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
            ),
            {"norm:ConvNextLayerNorm": 16, "norm:LayerNorm": 2},
        ),
        "resnet (CNN with BatchNorm)": (
            t.ResNetForImageClassification(
                t.ResNetConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], embedding_size=8)
            ),
            {"norm:BatchNorm2d": 32},
        ),
    }


MODELS = _tiny_models()


@pytest.mark.parametrize("family", list(MODELS))
def test_no_tensor_in_the_wrong_group(family: str) -> None:
    model, norm_counts = MODELS[family]
    decisions = classify_parameters(model)
    wrong = [
        (d.name, d.shape, d.group, d.reason) for d in decisions if (d.group == DECAY) != (len(d.shape) >= 2)
    ]
    assert wrong == []
    claimed = Counter(d.reason for d in decisions if d.reason.startswith("norm:"))
    assert dict(claimed) == norm_counts
    # Every trainable tensor in exactly one group, tied ones once.
    groups = build_param_groups(model, 0.1)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters() if p.requires_grad})


def test_tied_head_of_llama_and_gpt2_is_grouped_once_as_embedding() -> None:
    for family in ("llama (RMSNorm LLM, tied)", "gpt2 (Conv1D, tied)"):
        model, _ = MODELS[family]
        decisions = {d.name: d for d in classify_parameters(model)}
        embed = next(d for d in decisions.values() if "lm_head.weight" in d.aliases)
        assert embed.reason == "embedding" and embed.group == DECAY
        excluded = {d.name: d for d in classify_parameters(model, exclude_embeddings=True)}
        assert excluded[embed.name].group == NO_DECAY


def test_convnext_layer_scale_is_not_decayed() -> None:
    model, _ = MODELS["convnext (custom LayerNorm, layer scale)"]
    scales = [d for d in classify_parameters(model) if "layer_scale" in d.name]
    assert scales and all(d.group == NO_DECAY and d.reason == "1-D" for d in scales)
