"""The parameters, buffers and attributes a traced ``GraphModule`` holds, by dotted path.

``fx.GraphModule`` copies only what its graph reads; `carry_missing_state` gives it the rest of
the model's ``state_dict``, so that pretrained checkpoints keep loading into a patched model.
`lookup` and `assign` read and write an attribute by its dotted path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["assign", "carry_missing_state", "lookup"]


def carry_missing_state(source: nn.Module, gm: fx.GraphModule, skip: Iterable[str] = ()) -> None:
    """Give ``gm`` every parameter and buffer of ``source`` that the graph does not reference.

    ``GraphModule`` copies only the attributes its graph uses, so an unused parameter would drop out
    of ``state_dict`` and pretrained checkpoints would stop loading. Only modules created by fx are
    touched; the caller's own module objects are never modified.
    """
    skipped = tuple(skip)
    original = {id(m) for m in source.modules()}
    for mod_path, mod in source.named_modules(remove_duplicate=False):
        entries = [(n, t, "param") for n, t in mod._parameters.items() if t is not None]
        entries += [(n, t, "buffer") for n, t in mod._buffers.items() if t is not None]
        for name, tensor, kind in entries:
            key = f"{mod_path}.{name}" if mod_path else name
            if key.startswith(skipped):
                continue
            owner = _ensure_path(gm, mod_path, original)
            if owner is None or id(owner) in original:
                continue
            if name in owner._parameters or name in owner._buffers:
                if kind == "buffer" and name in mod._non_persistent_buffers_set:
                    owner._non_persistent_buffers_set.add(name)
                continue
            if kind == "param":
                owner.register_parameter(name, tensor)
            else:
                persistent = name not in mod._non_persistent_buffers_set
                owner.register_buffer(name, tensor, persistent=persistent)
        sub = _ensure_path(gm, mod_path, original, create=False)
        if sub is not None and sub is not mod and id(sub) not in original:
            sub.training = mod.training
    _constants_not_persistent(source, gm, original)
    gm.training = source.training


def _constants_not_persistent(source: nn.Module, gm: fx.GraphModule, original: set[int]) -> None:
    # fx stores tensors computed while tracing (``_tensor_constant0``) as buffers; keeping them out
    # of state_dict lets a checkpoint of the original model load with strict=True.
    known = set(source.state_dict().keys())
    for mod_path, mod in gm.named_modules():
        if id(mod) in original:
            continue
        for name in list(mod._buffers):
            key = f"{mod_path}.{name}" if mod_path else name
            if key not in known:
                mod._non_persistent_buffers_set.add(name)


def _ensure_path(
    root: nn.Module, path: str, original: set[int], create: bool = True
) -> nn.Module | None:
    mod = root
    if not path:
        return root
    for part in path.split("."):
        child = mod._modules.get(part)
        if child is None:
            if not create or id(mod) in original:
                return None
            if hasattr(mod, part):
                return None
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod



def lookup(root: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``root``; None where any part is missing."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def assign(root: nn.Module, target: str, value: Any) -> None:
    """Set dotted path ``target`` of ``root`` to ``value``, creating empty modules on the way; a
    plain tensor becomes a buffer."""
    *path, field = target.split(".")
    mod = root
    for part in path:
        child = getattr(mod, part, None)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        mod.register_buffer(field, value)
    else:
        setattr(mod, field, value)

