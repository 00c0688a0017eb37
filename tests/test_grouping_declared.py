"""Tensors the model marks itself: ``param._no_weight_decay = True`` and ``param._optim = {...}``.

State-space models (Mamba's reference code) flag tensors such as the 2-D ``A_log`` with ``_no_weight_decay``;
other codebases attach per-tensor optimizer settings as ``param._optim``. Both are model-declared rules: they
come after the user's patterns and before every shape or class rule, and the reason report names them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import DECAY, NO_DECAY


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


class MambaLikeMixer(nn.Module):
    def __init__(self, d_inner: int = 8, d_state: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(4, 2 * d_inner, bias=False)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.dt_bias = nn.Parameter(torch.zeros(d_inner))
        self.out_proj = nn.Linear(d_inner, 4, bias=False)


def test_no_weight_decay_flag_on_2d_and_1d_tensors() -> None:
    got = reasons(nn.Sequential(MambaLikeMixer(), MambaLikeMixer()))
    for i in (0, 1):
        assert got[f"{i}.A_log"] == (NO_DECAY, "param._no_weight_decay")
        assert got[f"{i}.D"] == (NO_DECAY, "param._no_weight_decay")
        assert got[f"{i}.dt_bias"] == (NO_DECAY, "bias")
        assert got[f"{i}.in_proj.weight"] == got[f"{i}.out_proj.weight"] == (DECAY, "weight")
    assert "param._no_weight_decay" in describe_param_groups(MambaLikeMixer(), 0.1)


def test_flag_false_changes_nothing_and_patterns_still_win() -> None:
    mixer = MambaLikeMixer()
    mixer.A_log._no_weight_decay = False
    assert reasons(mixer)["A_log"] == (DECAY, "weight")
    mixer.A_log._no_weight_decay = True
    assert reasons(mixer, decay_patterns="A_log")["A_log"] == (DECAY, "pattern:A_log")


def test_flag_on_a_tied_tensor() -> None:
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    model.b.weight = model.a.weight
    model.a.weight._no_weight_decay = True
    decisions = classify_parameters(model)
    tied = next(d for d in decisions if d.name == "a.weight")
    assert (tied.group, tied.reason, tied.aliases) == (NO_DECAY, "param._no_weight_decay", ("b.weight",))


def test_optim_weight_decay_zero_is_honoured_without_warning() -> None:
    layer = nn.Linear(4, 4)
    layer.weight._optim = {"weight_decay": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reasons(layer)["weight"] == (NO_DECAY, "param._optim")
    layer.weight._optim = {"weight_decay": 0}  # an int zero too
    assert reasons(layer)["weight"] == (NO_DECAY, "param._optim")


def test_optim_hyperparameters_give_their_own_groups_without_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight._optim = {"weight_decay": 0.3, "lr": 1e-3}
    model[1].weight._optim = {"weight_decay": 0.0, "lr": 1e-3, "betas": (0.9, 0.9)}
    model[1].bias._optim = {"weight_decay": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = build_param_groups(model, 0.1)
    got = {
        g["name"]: ([n for n, _ in g["params"]], g["weight_decay"], g.get("lr"), g.get("betas"))
        for g in groups
    }
    # 0.weight: its own decay 0.3 and absolute lr; 1.weight: no decay, its own lr and betas; 1.bias: plain flag.
    assert got["decay/declared_0"] == (["0.weight"], 0.3, 1e-3, None)
    assert got["no_decay/declared_1"] == (["1.weight"], 0.0, 1e-3, (0.9, 0.9))
    assert got["no_decay"] == (["0.bias", "1.bias"], 0.0, None, None)
    assert "decay" not in got  # every decayed tensor declares its own settings
    assert [g["name"] for g in groups] == ["no_decay", "decay/declared_0", "no_decay/declared_1"]
    decisions = {d.name: d for d in classify_parameters(model)}
    assert (decisions["0.weight"].group, decisions["0.weight"].reason) == (DECAY, "param._optim")
    assert decisions["1.weight"].declared == (("lr", 1e-3), ("betas", (0.9, 0.9)))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([("weight_decay", 0.0)], TypeError, "parameter `weight` has `_optim` of type list"),
        (0.0, TypeError, "parameter `weight` has `_optim` of type float"),
        ({"weight_decay": "0"}, TypeError, r"`_optim\['weight_decay'\]`='0': it must be a number"),
        ({"weight_decay": None}, TypeError, r"`_optim\['weight_decay'\]`=None"),
        ({"weight_decay": True}, TypeError, r"`_optim\['weight_decay'\]`=True"),
        ({"weight_decay": -1.0}, ValueError, "must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, ValueError, "must be a finite number >= 0"),
    ],
)
def test_bad_optim_names_the_tensor(value: object, error: type[Exception], message: str) -> None:
    layer = nn.Linear(4, 4)
    layer.weight._optim = value
    with pytest.raises(error, match=message):
        build_param_groups(layer, 0.1)


def test_bad_no_weight_decay_flag_names_the_tensor() -> None:
    layer = nn.Linear(4, 4)
    layer.bias._no_weight_decay = "yes"
    with pytest.raises(TypeError, match="parameter `bias` has `_no_weight_decay`='yes'"):
        build_param_groups(layer, 0.1)


def test_model_hooks_come_before_tensor_flags_and_both_before_shape_rules() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.zeros(4, 4))
            self.table._no_weight_decay = True
            self.norm = nn.LayerNorm(4)
            self.norm.weight._optim = {"weight_decay": 0.0}

        def no_weight_decay(self) -> set[str]:
            return {"table"}

    got = reasons(Model())
    assert got["table"] == (NO_DECAY, "no_weight_decay()")
    assert got["norm.weight"] == (NO_DECAY, "param._optim")
    assert reasons(Model(), use_model_hooks=False)["table"] == (NO_DECAY, "param._no_weight_decay")


def test_flagged_tensor_is_not_decayed_by_a_real_adamw_step() -> None:
    mixer = MambaLikeMixer()
    nn.init.normal_(mixer.A_log)
    before = mixer.A_log.detach().clone()
    optimizer = torch.optim.AdamW(build_param_groups(mixer, 0.5), lr=0.1)
    for p in mixer.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(mixer.A_log.detach(), before)  # zero gradient and no decay: not a bit changes
