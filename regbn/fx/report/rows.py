"""What a report says about each node of an annotated graph: labels, parameters, inputs.

These functions read the fx graph (and the model) and return plain values; `report.py` puts them
into its rows. Kept apart so that the report module holds the report's data and nothing else.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..modality.fusions import input_labels
from ..shapes.record import tensor_record
from ..tracing.capture import is_regbn

if TYPE_CHECKING:
    from .data import Row

__all__ = [
    "input_order",
    "row_fields",
    "layer_label",
    "node_params",
    "params_by_modality",
    "strip_dtypes",
    "target_str",
]


def row_fields(
    node: fx.Node, gm: fx.GraphModule, fusion_names: set[str], labels: dict[str, str]
) -> dict[str, Any]:
    """The fields of the report's `Row` for ``node``, read from its ``regbn_*`` meta keys;
    ``labels`` maps node names to the names users see (`names.display_names`)."""
    module = node.meta.get("regbn_module")
    if module is None and node.op == "call_module":
        module = str(node.target)
    shape = tensor_record(node).shape
    return {
        "name": node.name,
        "label": labels.get(node.name, node.name),
        "module": module or None,
        "op": node.op,
        "target": target_str(node),
        "shape": tuple(shape) if shape is not None else None,
        "nested": strip_dtypes(tensor_record(node).nested),
        "dtype": tensor_record(node).dtype or _common_dtype(tensor_record(node).nested),
        "modalities": frozenset(node.meta.get("regbn_modalities", ())),
        "is_fusion": node.name in fusion_names,
        "inputs": tuple(n.name for n in node.all_input_nodes),
        "layer": layer_label(node, gm),
        "params": node_params(node, gm),
        "is_regbn": is_regbn(gm, node),
        "calls": tuple(tuple(c) for c in node.meta.get("regbn_module_calls", ())),
    }


def _common_dtype(nested: Any) -> torch.dtype | None:
    """The one dtype of every tensor in a tuple/dict output (a RegBN layer's (f_r, g_out)),
    or None when they differ or there is none."""
    found: set[torch.dtype] = set()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype):
            found.add(value[1])
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    visit(nested)
    return found.pop() if len(found) == 1 else None


def target_str(node: fx.Node) -> str:
    """The node's target as a user would spell it: ``torch.cat``, ``operator.add``, a path."""
    target = node.target
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    module = {
        "_operator": "operator",
        "torch._C._nn": "torch.nn.functional",
        "torch._C._VariableFunctions": "torch",
    }.get(module, module)
    simple = getattr(target, "__name__", None)
    # The public spelling when the module exports it (torch.cat, not its builtin class path).
    if simple and getattr(sys.modules.get(module), simple, None) is target:
        return f"{module}.{simple}"
    name = getattr(target, "__qualname__", None) or simple or repr(target)
    return f"{module}.{name}" if module else name


def layer_label(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short label: the module's class, the function or the method called."""
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_function":
        if node.target is operator.getitem and len(node.args) > 1:
            return f"getitem[{node.args[1]!r}]"
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return {"placeholder": "input", "get_attr": "attr", "output": "output"}[node.op]


def node_params(node: fx.Node, gm: fx.GraphModule) -> int:
    """Parameters the node uses directly: a leaf module call's, or the one a get_attr reads."""
    try:
        if node.op == "call_module":
            return sum(p.numel() for p in gm.get_submodule(str(node.target)).parameters())
        if node.op == "get_attr":
            value = gm.get_parameter(str(node.target))
            return value.numel()
    except AttributeError:  # a buffer or a plain attribute: not a parameter
        return 0
    return 0


def strip_dtypes(nested: Any) -> Any:
    """A nested record holds (shape, dtype) leaves; the views want the shapes alone."""
    if isinstance(nested, dict):
        return {k: strip_dtypes(v) for k, v in nested.items()}
    if isinstance(nested, tuple) and len(nested) == 2 and isinstance(nested[1], torch.dtype):
        return nested[0]
    if isinstance(nested, (tuple, list)):
        return type(nested)(strip_dtypes(v) for v in nested)
    return nested


def input_order(gm: fx.GraphModule, rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(node name, input name) of every model input, in argument order: a dict/tuple argument
    gives one per entry, in the order its entries are read."""
    labels = input_labels(gm)  # node name -> input name, as the modality analysis names them
    by_name = {row.name: row for row in rows}
    argument = {r.name: i for i, r in enumerate(r for r in rows if r.op == "placeholder")}
    order = {row.name: i for i, row in enumerate(rows)}

    def key(name: str) -> tuple[int, int]:
        # A source is a placeholder, or a constant getitem whose one input is the placeholder.
        row = by_name[name]
        owner = name if row.op == "placeholder" else row.inputs[0]
        return argument[owner], order[name]

    return [(name, labels[name]) for name in sorted(labels, key=key)]


def params_by_modality(
    model: nn.Module, rows: Sequence[Row]
) -> tuple[dict[frozenset[str], int], int]:
    """Attribute each parameter to the modalities of the module call(s) that use it.

    A parameter owned by module ``m`` takes the union of the modalities of the nodes whose
    innermost module is ``m`` (a leaf call of ``m`` or the ops of ``m``'s own forward) and of
    the readers of a ``get_attr`` of it. One shared by two branches is counted for both together.
    Returns the counts per modality set and the count of parameters the forward never used.
    """
    by_module: dict[str, set[str]] = {}
    users_of: dict[str, set[str]] = {}
    readers: dict[str, list[Row]] = {}
    for row in rows:
        for src in row.inputs:
            readers.setdefault(src, []).append(row)
    for row in rows:
        if row.module is not None:
            by_module.setdefault(row.module, set()).update(row.modalities)
        if row.op == "get_attr":
            mods = users_of.setdefault(row.target, set())
            for reader in readers.get(row.name, []):
                mods.update(reader.modalities)
    # A parameter inside a leaf module (a tower kept whole, MultiheadAttention's out_proj) counts
    # under the leaf's call.
    leaves = {row.target for row in rows if row.op == "call_module"}
    counts: dict[frozenset[str], int] = {}
    unused = 0
    for name, param in model.named_parameters():
        owner = _leaf_owner(name.rpartition(".")[0], by_module, leaves)
        if owner not in by_module and name not in users_of:
            unused += param.numel()
            continue
        key = frozenset(by_module.get(owner, set()) | users_of.get(name, set()))
        counts[key] = counts.get(key, 0) + param.numel()
    return counts, unused


def _leaf_owner(owner: str, by_module: dict[str, set[str]], leaves: set[str]) -> str:
    """``owner`` itself when its code ran, else the innermost leaf module call that holds it."""
    if owner in by_module:
        return owner
    parent = owner
    while parent:
        parent = parent.rpartition(".")[0]
        if parent in leaves:
            return parent
    return owner
