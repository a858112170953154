"""Small facts about one fx node that every analysis step asks: which nodes an argument holds,
which module a call runs, whether the value is a tensor and whether it holds integers."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["is_integral", "is_tensor_node", "nodes_in", "submodule"]


def nodes_in(value: Any) -> list[fx.Node]:
    """The nodes inside ``value`` (an argument, a tuple or dict of them), each once, in order."""
    found: list[fx.Node] = []

    def keep(node: fx.Node) -> fx.Node:
        found.append(node)
        return node

    fx.node.map_arg(value, keep)
    return list(dict.fromkeys(found))


def submodule(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls; None when ``gm`` does not hold it."""
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def is_tensor_node(node: fx.Node) -> bool | None:
    """True/False from shape meta; None when shapes were not propagated."""
    if "regbn_shape" not in node.meta:
        return None
    return node.meta["regbn_shape"] is not None


def is_integral(node: fx.Node) -> bool:
    """True when shape propagation found integer or bool values (ids, masks, lengths)."""
    dtype = node.meta.get("regbn_dtype")
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex
