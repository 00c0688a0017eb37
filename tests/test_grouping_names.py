"""Names that identify tensors, group names that identify groups, and frozen tensors grouped for later.

Names come from the module tree: a wrapper's attribute (DDP/DataParallel ``module``, ``torch.compile``'s
``_orig_mod``, activation checkpointing's ``_checkpoint_wrapped_module``, Fabric's ``_forward_module``) is left
out only where the module holding it is that wrapper; a user's own attribute with the same name keeps it.
"""

from __future__ import annotations

import tempfile

import lightning as L
import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper, offload_wrapper
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import (
    DecoupledWeightDecayMixin,
    build_param_groups,
    classify_parameters,
    describe_param_groups,
)
from lightning_adamw.param_groups import (
    DECAY,
    NO_DECAY,
    check_unique_group_names,
    groups_from_decisions,
    parameter_names,
)


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


def wd_by_tensor(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, list[float]]:
    """name -> weight decay of every group the tensor is in (one entry per occurrence)."""
    seen: dict[int, list[float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), []).append(float(group["weight_decay"]))
    return {n: seen.get(id(p), []) for n, p in module.named_parameters()}


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 8)  # the pretrained network's own last layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.relu(self.conv(x))))


class Finetuner(nn.Module):
    """Keeps its network in an attribute called ``module`` and has a head ``fc`` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.module = Backbone()
        self.fc = nn.Linear(8, 8)


# ----------------------------------------------------------------------------------------------- user attributes


@pytest.mark.parametrize("attr", ["module", "_orig_mod", "_forward_module", "_checkpoint_wrapped_module"])
def test_user_attribute_named_like_a_wrapper_keeps_its_name(attr: str) -> None:
    model = nn.Module()
    model.add_module(attr, Backbone())
    model.fc = nn.Linear(8, 8)
    names = [d.name for d in classify_parameters(model)]
    assert names == [n for n, _ in model.named_parameters()]
    assert f"{attr}.fc.weight" in names and "fc.weight" in names


def test_module_attribute_collision_every_tensor_once_and_patterns_use_printed_names() -> None:
    model = Finetuner()
    groups = build_param_groups(model, 0.05, no_decay_patterns="module.fc.weight")
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    wd = wd_by_tensor(optimizer, model)
    assert all(len(v) == 1 for v in wd.values()), wd
    assert wd["module.fc.weight"] == [0.0] and wd["fc.weight"] == [0.05]
    recorded = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert sorted(recorded) == sorted(n for n, _ in model.named_parameters())


class LitFinetuner(DecoupledWeightDecayMixin, L.LightningModule):
    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.module = Backbone()
        self.fc = nn.Linear(8, 8)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.fc(self.module(x)), y)


def test_lightning_module_with_a_module_attribute_trains_every_tensor_every_step() -> None:
    steps = 4
    torch.manual_seed(0)
    model = LitFinetuner()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 8, generator=g)), batch_size=8
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0]
    wd = wd_by_tensor(optimizer, model)
    assert all(len(v) == 1 for v in wd.values()), wd
    # Each tensor stepped exactly once per optimizer step (a tensor put in twice would count 2 per step).
    assert {n: int(optimizer.state[p]["step"]) for n, p in model.named_parameters()} == dict.fromkeys(
        wd, steps
    )


# ----------------------------------------------------------------------------------------------- real wrappers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.gain = nn.Parameter(torch.ones(1, 1, 8))
        self.head = nn.Linear(8, 1)

    def no_weight_decay(self) -> set[str]:
        return {"embed.weight"}


def test_torch_compile_at_the_root_and_inside() -> None:
    model = Net()
    assert reasons(torch.compile(model)) == reasons(model)  # OptimizedModule compiles only at the first call
    outer = nn.Module()
    outer.net = torch.compile(Net())
    assert reasons(outer) == {f"net.{n}": r for n, r in reasons(model).items()}


def test_data_parallel_on_cpu_root_and_nested() -> None:
    model = Net()
    assert reasons(nn.DataParallel(model)) == reasons(model)
    outer = nn.Module()
    outer.net = nn.DataParallel(Net())
    assert reasons(outer, no_decay_patterns="net.head.weight")["net.head.weight"] == (
        NO_DECAY,
        "pattern:net.head.weight",
    )


def test_activation_checkpoint_and_offload_wrappers() -> None:
    model = nn.Sequential(checkpoint_wrapper(Net()), offload_wrapper(nn.Linear(8, 8)))
    names = [d.name for d in classify_parameters(model)]
    assert "0.block.0.weight" in names and "1.weight" in names
    assert not any("_checkpoint_wrapped_module" in n for n in names)
    assert reasons(model)["0.embed.weight"] == (
        NO_DECAY,
        "no_weight_decay()",
    )  # hook prefix is the clean path


def test_fabric_module_names_are_the_original_ones() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = Net()
    wrapped = fabric.setup_module(model)
    assert type(wrapped).__name__ == "_FabricModule"
    assert reasons(wrapped) == reasons(model)
    groups = build_param_groups(wrapped, 0.1)
    assert sorted(n for g in groups for n, _ in g["params"]) == sorted(n for n, _ in model.named_parameters())


def test_two_tensors_that_would_share_a_name_are_an_error() -> None:
    wrapper = nn.DataParallel(Net())
    wrapper.head = nn.Linear(8, 1)  # a tensor of the wrapper itself, named like one of the wrapped model
    with pytest.raises(
        ValueError, match=r"get the name `head\.weight`: `module\.head\.weight` and `head\.weight`"
    ):
        build_param_groups(wrapper, 0.1)


def test_parameter_names_gives_first_name_and_aliases() -> None:
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = nn.Linear(4, 4)
    model.b.weight = model.a.weight
    model.frozen = nn.Linear(4, 4).requires_grad_(False)
    dp = nn.DataParallel(model)
    names = parameter_names(dp)
    assert names[id(model.a.weight)] == ("a.weight", "b.weight")
    assert names[id(model.frozen.weight)] == ("frozen.weight",)
    assert len(names) == len({id(p) for p in model.parameters()})


def test_groups_from_decisions_finds_tensors_by_structural_name_and_refuses_foreign_decisions() -> None:
    model = Finetuner()
    decisions = classify_parameters(model)
    groups = groups_from_decisions(model, decisions, 0.1)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ValueError, match="names no parameter of Linear"):
        groups_from_decisions(nn.Linear(2, 2), decisions, 0.1)


# ----------------------------------------------------------------------------------------------- group names


def test_group_prefix_names_groups_and_keeps_separate_calls_apart() -> None:
    backbone, head = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), nn.Linear(8, 1)
    groups = build_param_groups(backbone, 0.1, group_prefix="backbone") + build_param_groups(
        head, 0.1, group_prefix="head"
    )
    assert [g["name"] for g in groups] == [
        "backbone/decay",
        "backbone/no_decay",
        "head/decay",
        "head/no_decay",
    ]
    check_unique_group_names(groups)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    check_unique_group_names(optimizer)
    unprefixed = build_param_groups(backbone, 0.1) + build_param_groups(head, 0.1)
    with pytest.raises(ValueError, match=r"share the names \['decay', 'no_decay'\].*`group_prefix=`"):
        check_unique_group_names(unprefixed)
    with pytest.raises(ValueError, match="share the names"):
        check_unique_group_names(torch.optim.AdamW(unprefixed, lr=1e-3))
    check_unique_group_names([{"params": []}, {"params": []}])  # unnamed groups are not checked


def test_group_prefix_in_decisions_and_report() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    groups = groups_from_decisions(model, classify_parameters(model), 0.1, group_prefix="enc.0")
    assert [g["name"] for g in groups] == ["enc.0/decay", "enc.0/no_decay"]
    table = describe_param_groups(model, 0.1, group_prefix="encoder")
    assert any(line.startswith("encoder/decay ") for line in table.splitlines())
    assert any(
        line.startswith("encoder/no_decay ") and "norm:LayerNorm" in line for line in table.splitlines()
    )


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        ("", ValueError),
        ("/backbone", ValueError),
        ("backbone/", ValueError),
        (" b", ValueError),
        (3, TypeError),
    ],
)
def test_bad_group_prefix_is_refused(prefix: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="`group_prefix`"):
        build_param_groups(nn.Linear(2, 2), 0.1, group_prefix=prefix)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- frozen tensors


def test_include_frozen_groups_frozen_tensors_and_reports_them() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    assert [d.name for d in classify_parameters(model)] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    decisions = {d.name: d for d in classify_parameters(model, include_frozen=True)}
    assert decisions["0.weight"].frozen and decisions["0.weight"].group == DECAY
    assert decisions["0.bias"].frozen and decisions["0.bias"].group == NO_DECAY
    assert not decisions["2.weight"].frozen
    table = describe_param_groups(model, 0.1, include_frozen=True)
    assert table.splitlines()[0].split()[-1] == "frozen"
    decay_row = next(line for line in table.splitlines() if line.startswith("decay "))
    assert decay_row.split()[-1] == "1"
    assert "frozen now (requires_grad=False, grouped for later unfreezing): 2 tensors, 40 params" in table
    assert "frozen" not in describe_param_groups(model, 0.1)
    with pytest.raises(TypeError, match="`include_frozen` must be a bool"):
        build_param_groups(model, 0.1, include_frozen=1)  # type: ignore[arg-type]


def test_all_frozen_module_is_an_error_unless_frozen_tensors_are_included() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*include_frozen=True"):
        build_param_groups(model, 0.1)
    assert [g["name"] for g in build_param_groups(model, 0.1, include_frozen=True)] == [DECAY, NO_DECAY]


def test_frozen_tensors_cost_nothing_until_unfrozen_then_train_with_their_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    lr, wd = 0.1, 0.5
    optimizer = torch.optim.AdamW(build_param_groups(model, wd, include_frozen=True), lr=lr)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    frozen_before = model[0].weight.detach().clone()
    for _ in range(2):
        step()
    assert torch.equal(model[0].weight, frozen_before) and model[0].weight not in optimizer.state
    model[0].requires_grad_(True)
    for _ in range(3):
        step()
    assert int(optimizer.state[model[0].weight]["step"]) == 3
    assert int(optimizer.state[model[1].weight]["step"]) == 5
    # Zero gradient: the next step is the group's decay alone, w <- w (1 - lr wd), exact to one rounding.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad(set_to_none=False)
    for state in optimizer.state.values():
        state["exp_avg"].zero_()
    optimizer.step()
    torch.testing.assert_close(
        model[0].weight.detach(), before["0.weight"] * (1 - lr * wd), rtol=2**-23, atol=0
    )
    torch.testing.assert_close(model[0].bias.detach(), before["0.bias"], rtol=0, atol=0)
