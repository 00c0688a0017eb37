"""The norm rule claims a norm layer's gains and shifts, not every tensor of a class that is merely named *Norm.

torch's norm types and ``extra_norm_types`` are trusted with every tensor they own (``LayerNorm((C, H, W))`` has a
(C, H, W) elementwise gain). A class recognised only by its name (``norm_class_pattern``) is trusted with
vector-shaped tensors (at most one dimension larger than 1); a tensor with two or more is a matrix the class holds
(an adaLN modulation projection, a spectrally normalised weight) and goes on to the later rules, which decay it
with the reason ``matrix-in-norm:<Class>``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import DECAY, NO_DECAY


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


class AdaLayerNorm(nn.Module):
    """DiT / adaLN-Zero style, matrix held as a raw parameter: scale and shift = W @ cond + b."""

    def __init__(self, dim: int = 16, cond: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False)
        self.weight = nn.Parameter(torch.randn(2 * dim, cond) * 0.02)
        self.bias = nn.Parameter(torch.zeros(2 * dim))


class SpectralNorm(nn.Module):
    """A spectrally normalised projection layer that happens to be called *Norm."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim))


class MyRMSNorm(nn.Module):
    """A norm layer defined outside torch: (C,) gain; a channels-first variant stores it as (1, C, 1, 1)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.gain_chw = nn.Parameter(torch.ones(1, dim, 1, 1))


class ElementwiseLayerNorm(nn.Module):
    """A third-party LayerNorm over (C, H, W) with an elementwise (C, H, W) gain: a real norm gain of matrix shape."""

    def __init__(self, shape: tuple[int, ...] = (4, 3, 3)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))


def test_matrices_held_by_norm_named_classes_are_decayed_with_a_telling_reason() -> None:
    block = nn.ModuleDict({"adaln": AdaLayerNorm(), "fc": nn.Linear(16, 16), "sn": SpectralNorm()})
    r = reasons(block)
    assert r["adaln.weight"] == (DECAY, "matrix-in-norm:AdaLayerNorm")
    assert r["adaln.bias"] == (NO_DECAY, "norm:AdaLayerNorm")  # (2C,): the shift the norm applies
    assert r["sn.weight"] == (DECAY, "matrix-in-norm:SpectralNorm")
    assert r["fc.weight"] == (DECAY, "weight")
    table = describe_param_groups(block, 0.1)
    assert any(
        "matrix-in-norm:AdaLayerNorm" in line and "adaln.weight" in line for line in table.splitlines()
    )


def test_vector_shaped_tensors_of_norm_named_classes_stay_norm_gains() -> None:
    assert reasons(MyRMSNorm()) == {
        "weight": (NO_DECAY, "norm:MyRMSNorm"),
        "gain_chw": (NO_DECAY, "norm:MyRMSNorm"),
    }


@pytest.mark.parametrize(
    "norm",
    [
        nn.LayerNorm((4, 3, 3)),  # weight and bias (4, 3, 3): elementwise, not a matrix
        nn.LayerNorm((3, 5)),
        nn.GroupNorm(2, 4),
        nn.BatchNorm2d(4),
        nn.RMSNorm((3, 5)),
    ],
    ids=lambda m: repr(m),
)
def test_torch_norm_types_are_trusted_whatever_the_shape(norm: nn.Module) -> None:
    got = reasons(norm)
    assert got and set(got.values()) == {(NO_DECAY, f"norm:{type(norm).__name__}")}


def test_extra_norm_types_are_trusted_with_every_tensor_and_settle_a_matrix_shaped_gain() -> None:
    # By name only, the (4, 3, 3) elementwise gain is indistinguishable from a matrix: decayed, and the reason says
    # why; the layer's author names the class to settle it.
    r = reasons(ElementwiseLayerNorm())
    assert r["weight"] == (DECAY, "matrix-in-norm:ElementwiseLayerNorm")
    assert r["bias"] == (NO_DECAY, "bias")
    r = reasons(ElementwiseLayerNorm(), extra_norm_types=[ElementwiseLayerNorm])
    assert set(r.values()) == {(NO_DECAY, "norm:ElementwiseLayerNorm")}
    # Explicit: the user says every tensor of the class is a gain.
    r = reasons(AdaLayerNorm(), extra_norm_types=AdaLayerNorm)
    assert r["weight"] == (NO_DECAY, "norm:AdaLayerNorm")


def test_without_the_class_name_rule_the_matrix_is_a_plain_weight() -> None:
    assert reasons(AdaLayerNorm(), norm_class_pattern=None)["weight"] == (DECAY, "weight")
    assert reasons(AdaLayerNorm(), norm_class_pattern=None)["bias"] == (NO_DECAY, "bias")


def test_adamw_decays_the_modulation_matrix_and_not_the_gains() -> None:
    """With zero gradients AdamW's step is the decay alone: w <- w (1 - lr wd) for decayed tensors, w otherwise
    (one float32 multiply per element: exact to one rounding, rtol 2**-23)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"adaln": AdaLayerNorm(), "rms": MyRMSNorm(), "ln": nn.LayerNorm((4, 3, 3))})
    for p in model.parameters():
        nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.5
    optimizer = torch.optim.AdamW(build_param_groups(model, wd), lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - lr * wd if name == "adaln.weight" else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=2**-23, atol=0, msg=name)
