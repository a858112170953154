"""One shape record per node, and the facts every later step asks of a node.

Shape propagation writes one `ShapeRecord` under ``node.meta["regbn_tensor"]`` (as torch.fx's
ShapeProp keeps one ``TensorMetadata`` under ``tensor_meta``); every reader goes through
`tensor_record`. The helpers beside it answer what modality analysis, insertion and the
report ask: which nodes an argument holds, which module a call runs, whether the value is a
tensor and whether it holds integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "KEY",
    "NO_RECORD",
    "ShapeRecord",
    "has_record",
    "is_integral",
    "is_tensor_node",
    "nodes_in",
    "set_record",
    "submodule",
    "tensor_record",
]

KEY = "regbn_tensor"


@dataclass(frozen=True)
class ShapeRecord:
    """What shape propagation found at one node.

    ``shape``: ``tuple[int, ...]`` for a tensor, None for anything else. ``dtype`` and
    ``device``: the tensor's, None for anything else. ``nested``: for a tuple, list or dict
    that holds tensors, the same structure with ``(shape, dtype)`` in place of each tensor
    (None in place of non-tensors); None otherwise.
    """

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    nested: Any = None


# The record of a node that shape propagation did not reach.
NO_RECORD = ShapeRecord()


def tensor_record(node: fx.Node) -> ShapeRecord:
    """The node's `ShapeRecord`; `NO_RECORD` (all None) where shapes were not propagated."""
    return node.meta.get(KEY, NO_RECORD)


def has_record(node: fx.Node) -> bool:
    """Whether shape propagation reached the node."""
    return KEY in node.meta


def set_record(node: fx.Node, record: ShapeRecord) -> None:
    node.meta[KEY] = record


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
    """True/False from the shape record; None when shapes were not propagated."""
    if not has_record(node):
        return None
    return tensor_record(node).shape is not None


def is_integral(node: fx.Node) -> bool:
    """True when shape propagation found integer or bool values (ids, masks, lengths)."""
    dtype = tensor_record(node).dtype
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex
