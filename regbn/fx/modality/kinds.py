"""What kind of fusion a node is: cat, stack, add, sub, mul, div, matmul, einsum, outer,
attention, bilinear or other, from the function, method or module it calls. (`regbn.fx.modality`
calls a matmul or einsum of two sets of samples, (N, D) against (M, D), a similarity.)"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..shapes.record import submodule

__all__ = ["ELEMENTWISE_KINDS", "fusion_kind"]

# The kinds where FiLM-like conditioning (a projection split into scale and shift) can happen.
ELEMENTWISE_KINDS = frozenset({"mul", "add", "sub", "div"})

_FUNCTION_KINDS: dict[Any, str] = {
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.hstack: "cat",
    torch.vstack: "cat",
    torch.dstack: "cat",
    torch.column_stack: "cat",
    torch.stack: "stack",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.floordiv: "div",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
    torch.bmm: "matmul",
    torch.einsum: "einsum",
    torch.outer: "outer",
    torch.ger: "outer",
    torch.kron: "outer",
    F.bilinear: "bilinear",
    torch.bilinear: "bilinear",
    F.scaled_dot_product_attention: "attention",
    F.multi_head_attention_forward: "attention",
}

_METHOD_KINDS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "matmul": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
    "outer": "outer",
    "ger": "outer",
}


def fusion_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """cat, stack, add, sub, mul, div, matmul, einsum, outer, attention, bilinear or other."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return _METHOD_KINDS.get(str(node.target), "other")
    module = submodule(gm, node)
    if module is None:
        return "other"
    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return "attention"
    if isinstance(module, nn.Bilinear):
        return "bilinear"
    return "other"
