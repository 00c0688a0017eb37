"""Parameter names as the user's own module shows them, found from the module tree, never from strings.

Wrappers put the model under an attribute of their own: DDP and DataParallel under ``module``, ``torch.compile``'s
``OptimizedModule`` under ``_orig_mod``, FSDP1 under ``_fsdp_wrapped_module``, activation checkpointing under
``_checkpoint_wrapped_module``, Lightning's and Fabric's wrappers under ``_forward_module``. Their parameters then
carry that attribute in their names. Those components are dropped here only when the module that holds the
attribute *is* such a wrapper: a LightningModule whose network sits in an attribute called ``module`` keeps the
name ``module.fc.weight``, which is what its ``named_parameters()`` prints and what the user's patterns say.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "WRAPPER_PREFIXES",
    "ModuleNode",
    "ParamSite",
    "clean_param_name",
    "parameter_names",
    "parameter_sites",
]

#: Prefixes that wrappers insert into parameter names. Kept for :func:`clean_param_name` only: names used for
#: grouping are computed from the module tree (:func:`parameter_names`).
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# (module that defines the class, class name, attributes holding the wrapped model). A class is looked up only when
# its module is already imported: an instance cannot exist before its class's module is imported, so this costs no
# import (``torch._dynamo`` and FSDP are slow to import) and tolerates torch builds without ``torch.distributed``.
_TORCH_WRAPPERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", ("module",)),
    ("torch.nn.parallel.data_parallel", "DataParallel", ("module",)),
    ("torch._dynamo.eval_frame", "OptimizedModule", ("_orig_mod",)),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        ("_fsdp_wrapped_module",),
    ),
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",  # CheckpointWrapper and OffloadWrapper
        ("_checkpoint_wrapped_module",),
    ),
)
# Wrappers recognised by class name, so that this file imports neither Lightning nor DeepSpeed. Fabric's wrapper
# registers the model twice (``_forward_module``, possibly itself wrapped, and ``_original_module``).
_NAMED_WRAPPERS: dict[str, tuple[str, ...]] = {
    "_LightningModuleWrapperBase": ("_forward_module",),
    "_FabricModule": ("_forward_module", "_original_module"),
    "DeepSpeedEngine": ("module",),
}
# Weak keys: torch.nn.utils.parametrize creates a new class per parametrized module, which must not be kept alive.
_WRAPPED_ATTRS: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _wrapped_attrs(cls: type) -> frozenset[str]:
    """Attributes of a wrapper class that hold the wrapped model (empty for every other class); cached per class.

    The cache is safe although it depends on which modules are imported: a class that subclasses a wrapper could
    only be created after the wrapper's module was imported, so a negative answer never turns positive later.
    """
    attrs = _WRAPPED_ATTRS.get(cls)
    if attrs is None:
        found: set[str] = set()
        for module_name, class_name, names in _TORCH_WRAPPERS:
            wrapper = getattr(sys.modules.get(module_name), class_name, None)
            if isinstance(wrapper, type) and issubclass(cls, wrapper):
                found.update(names)
        for base in cls.__mro__:
            found.update(_NAMED_WRAPPERS.get(base.__name__, ()))
        attrs = _WRAPPED_ATTRS[cls] = frozenset(found)
    return attrs


# Plain slotted classes (not frozen): built once per module and per parameter site, so construction cost counts.
@dataclass(slots=True)
class ModuleNode:
    """One place of a module in the tree (a shared module has several)."""

    module: nn.Module
    raw_name: str
    """Path as ``named_modules()`` of the root prints it."""
    name: str
    """Path with wrapper attributes left out."""
    attr: str
    """The attribute under which the module sits in its parent, in the user's terms (a wrapper's, for the module
    it wraps); ``""`` for the root."""
    parent: ModuleNode | None


@dataclass(slots=True)
class ParamSite:
    """One place where a parameter is registered: the module that owns it and the attribute (leaf) it sits in."""

    name: str
    raw_name: str
    leaf: str
    node: ModuleNode
    param: torch.Tensor


def _module_nodes(root: nn.Module) -> list[ModuleNode]:
    """Every place of every module, in the pre-order of ``named_modules(remove_duplicate=False)``."""
    nodes: list[ModuleNode] = []
    stack = [ModuleNode(root, "", "", "", None)]
    while stack:
        node = stack.pop()
        nodes.append(node)
        skip = _wrapped_attrs(type(node.module))
        children = [(a, c) for a, c in node.module._modules.items() if c is not None]
        for attr, child in reversed(children):
            raw = f"{node.raw_name}.{attr}" if node.raw_name else attr
            if attr in skip:
                stack.append(ModuleNode(child, raw, node.name, node.attr, node))
            else:
                stack.append(ModuleNode(child, raw, f"{node.name}.{attr}" if node.name else attr, attr, node))
    return nodes


def parameter_sites(module: nn.Module) -> tuple[list[ModuleNode], dict[int, list[ParamSite]]]:
    """The module tree and ``id(parameter) -> every place it is registered``, in ``named_parameters()`` order.

    The first site of each parameter is the one ``named_parameters()`` reports (a tied tensor keeps the name of its
    first place; the others are its aliases).

    Raises:
        ValueError: two different tensors get the same name once wrapper attributes are left out (naming both raw
            names): merging them would leave one tensor out of the optimizer and step the other twice.
    """
    nodes = _module_nodes(module)
    sites: dict[int, list[ParamSite]] = {}
    owner_of: dict[str, tuple[int, str]] = {}
    for node in nodes:
        for leaf, param in node.module._parameters.items():
            if param is None:
                continue
            name = f"{node.name}.{leaf}" if node.name else leaf
            raw = f"{node.raw_name}.{leaf}" if node.raw_name else leaf
            seen = owner_of.setdefault(name, (id(param), raw))
            if seen[0] != id(param):
                raise ValueError(
                    f"two different tensors of {type(module).__name__} get the name `{name}`: `{seen[1]}` and "
                    f"`{raw}` (wrapper attributes are left out of names); rename one of the attributes"
                )
            sites.setdefault(id(param), []).append(ParamSite(name, raw, leaf, node, param))
    return nodes, sites


def parameter_names(module: nn.Module) -> dict[int, tuple[str, ...]]:
    """``id(parameter) -> (name, *aliases)`` for every parameter of ``module``, frozen ones included.

    ``name`` is the first name ``named_parameters()`` of the user's own module gives the tensor; wrapper attributes
    (DDP/DataParallel ``module``, ``torch.compile``'s ``_orig_mod``, FSDP1 ``_fsdp_wrapped_module``, activation
    checkpointing's ``_checkpoint_wrapped_module``, Lightning/Fabric ``_forward_module``) are left out only where
    the module holding them is such a wrapper. ``aliases`` are the other names of a tied tensor. These are the names
    :func:`~lightning_adamw.build_param_groups` matches patterns against and puts in ``param_names``.

    Raises:
        ValueError: two different tensors would get the same name (see :func:`parameter_sites`).
    """
    _, sites = parameter_sites(module)
    return {key: tuple(dict.fromkeys(s.name for s in places)) for key, places in sites.items()}


def clean_param_name(name: str) -> str:
    """Deprecated: strip wrapper prefixes from a name by string alone. Use :func:`parameter_names`.

    A string cannot tell a DDP wrapper's ``module.`` from a user's attribute called ``module``, so this merges
    different tensors under one name; the grouping no longer uses it.
    """
    warnings.warn(
        "`clean_param_name` strips prefixes by string and can merge different tensors; use "
        "`lightning_adamw.param_groups.parameter_names(module)`",
        DeprecationWarning,
        stacklevel=2,
    )
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    return name
