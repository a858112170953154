"""Which inputs of a node it reads the *values* of.

A node's modalities are the union of those of the operands whose values it reads; shape, dtype
and device reads carry none (see `regbn.fx.modality`). `value_inputs` leaves them out:
``x.shape``, ``x.size()``, the ``self`` of ``x.new_ones(...)``, the first argument of
``torch.zeros_like`` and the second tensor of ``view_as``/``type_as``/``to``.
"""

from __future__ import annotations

import builtins

import torch
import torch.fx as fx

from ..shapes.record import nodes_in

__all__ = ["value_inputs"]

_SHAPE_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized",
     "is_meta", "requires_grad", "names"}
)  # fmt: skip
_SHAPE_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "element_size", "stride",
     "is_floating_point", "is_complex", "is_contiguous", "data_ptr", "storage_offset"}
)  # fmt: skip
_NEW_METHODS = frozenset(
    {"new_ones", "new_zeros", "new_empty", "new_full", "new_tensor", "new_empty_strided"}
)
# Methods whose tensor arguments after self lend only their shape, dtype or device.
_AS_METHODS = frozenset({"view_as", "reshape_as", "expand_as", "type_as", "to", "type"})
_LIKE_FUNCTIONS = frozenset(
    {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
     torch.randn_like, torch.randint_like}
)  # fmt: skip
_SHAPE_FUNCTIONS = frozenset({torch.numel, builtins.len})

def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes whose values ``node`` reads (shape, dtype and device reads left out)."""
    op, target, args = node.op, node.target, node.args
    if op == "call_function":
        if target is builtins.getattr and len(args) >= 2 and args[1] in _SHAPE_ATTRS:
            return []
        if target in _SHAPE_FUNCTIONS:
            return []
        if target in _LIKE_FUNCTIONS:
            return nodes_in((args[1:], node.kwargs))
    if op == "call_method":
        if target in _SHAPE_METHODS:
            return []
        if target in _NEW_METHODS:
            return nodes_in((args[1:], node.kwargs))
        if target in _AS_METHODS:
            return nodes_in(args[:1])
    return list(node.all_input_nodes)

