"""User-facing tensor names of a traced model, and the errors that explain a wrong one.

A name is an input (``"gray"``, ``"batch['audio']"``), a dotted module path (the output of that
call), a read of a module's output as the model's code spells it (``text.pooler_output``), a
local variable of the model's forward (the value it holds when forward returns) or an fx node
name; the prefixes ``input:``, ``module:`` and ``node:`` pick one kind when a
bare name is ambiguous. `resolve_name` turns a name into its node; `is_ambiguous` says whether a
bare name needs a prefix. This module depends on `tracing` (and the exceptions of
`regbn.errors`) only, so that shape, modality and insertion code can all import it.
"""

from __future__ import annotations

import builtins
import difflib
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import RegBNTypeError, RegBNValueError
from .shapes.record import tensor_record
from .tracing.capture import input_name
from .tracing.regions import hooked

__all__ = [
    "INSPECT_HINT",
    "PREFIXES",
    "entry_label",
    "expression",
    "entry_name",
    "display_name",
    "display_names",
    "is_ambiguous",
    "is_constant_getitem",
    "resolve_name",
    "unknown_name",
]

PREFIXES = ("input", "module", "node")
INSPECT_HINT = "Run regbn.inspect(model, ...) to list them"


@dataclass(frozen=True)
class _Candidate:
    kind: str  # "input", "module" or "node"
    label: str
    node: fx.Node


def entry_name(placeholder: fx.Node, key: Any) -> str:
    """The modality name of one entry of a container input: ``batch['audio']``, ``x[0]``."""
    return f"{input_name(placeholder)}[{key!r}]"


def entry_label(node: fx.Node) -> str:
    """The name of the entry ``node`` reads (`is_constant_getitem`), as Python spells it:
    ``batch['audio']``, ``x[0]``, ``batch.image`` (a dataclass or NamedTuple field)."""
    src, key = node.args[0], node.args[1]
    assert isinstance(src, fx.Node)
    if node.target is getattr:
        return f"{input_name(src)}.{key}"
    return entry_name(src, key)


# Attributes of a tensor, never the field of a batch object.
_TENSOR_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag", "data", "grad",
     "is_cuda", "requires_grad", "layout", "names"}
)  # fmt: skip


def is_constant_getitem(node: fx.Node) -> bool:
    """True for ``x[k]`` with a literal int or str ``k`` (an entry of a tuple or dict input), or
    for ``x.field`` (a field of a dataclass or NamedTuple input)."""
    if node.op != "call_function" or len(node.args) != 2:
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[1], (int, str))
    return (
        node.target is getattr
        and isinstance(node.args[1], str)
        and node.args[1] not in _TENSOR_ATTRS
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "placeholder"
    )


class _Index:
    """Every user-facing name of a graph's nodes, gathered in one pass."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.inputs: dict[str, list[fx.Node]] = defaultdict(list)
        self.modules: dict[str, dict[int, fx.Node]] = defaultdict(dict)
        self.leaves: dict[str, list[fx.Node]] = defaultdict(list)
        self.nodes: dict[str, fx.Node] = {}
        self.reads: dict[str, list[fx.Node]] = defaultdict(list)
        self.variables: dict[str, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self.inputs[input_name(node)].append(node)
            elif _is_input_entry(node):
                self.inputs[entry_label(node)].append(node)
            for path, idx in node.meta.get("regbn_output_of", ()):
                self.modules[path].setdefault(idx, node)
            if node.op == "call_module":
                self.leaves[str(node.target)].append(node)
            if node.op != "output" and not _region_helper(node):
                self.nodes[node.name] = node
            if _is_read(node) and (expr := expression(node)) != node.name:
                self.reads[expr].append(node)
            if var := node.meta.get("regbn_variable"):
                self.variables[var].append(node)

    def input(self, name: str) -> list[_Candidate]:
        label = name.replace('"', "'")
        nodes = self.inputs.get(name, []) + (self.inputs.get(label, []) if label != name else [])
        return [_Candidate("input", f"input:{name}", n) for n in nodes]

    def module(self, name: str) -> list[_Candidate]:
        calls = self.modules.get(name, {})
        if not calls:  # a GraphModule traced elsewhere carries no provenance meta
            leaf = self.leaves.get(name, [])
            many = len(leaf) > 1
            return [
                _Candidate("module", f"module:{name}" + (f" (node {n.name})" if many else ""), n)
                for n in leaf
            ]
        return [
            _Candidate(
                "module",
                f"module:{name}" + (f" (call {idx}, node {n.name})" if len(calls) > 1 else ""),
                n,
            )
            for idx, n in sorted(calls.items())
        ]

    def node(self, name: str) -> list[_Candidate]:
        found = self.nodes.get(name)
        return [_Candidate("node", f"node:{name}", found)] if found is not None else []

    def read(self, name: str) -> list[_Candidate]:
        wanted = name.replace('"', "'")
        return [_Candidate("node", wanted, n) for n in self.reads.get(wanted, [])]

    def variable(self, name: str) -> list[_Candidate]:
        return [_Candidate("node", name, n) for n in self.variables.get(name, [])]

    def candidates(self, name: str) -> list[_Candidate]:
        prefix, _, rest = name.partition(":")
        if prefix in PREFIXES and rest:
            return {"input": self.input, "module": self.module, "node": self.node}[prefix](rest)
        found = self.input(name) + self.module(name) + self.node(name) + self.read(name)
        # A variable of forward counts only where no other kind of name matches: naming a
        # variable never makes an input, module or node name ambiguous.
        found = found or self.variable(name)
        distinct: dict[fx.Node, _Candidate] = {}
        for c in found:
            distinct.setdefault(c.node, c)
        # Several labels for one node (input 'x' is node 'x') are one tensor, not an ambiguity.
        return list(distinct.values()) if len(distinct) > 1 else found[:1]

    def module_path(self, node: fx.Node) -> str | None:
        """A leaf module call's own path; for a function or method result, the outermost
        module called once whose output it is (``text`` for the last add of a text tower)."""
        if node.op == "call_module":
            path = str(node.target)
            calls = self.modules.get(path) or dict(enumerate(self.leaves.get(path, [])))
            return path if len(calls) == 1 else None
        once = [
            path
            for path, _ in node.meta.get("regbn_output_of") or ()
            if len(self.modules.get(path, {})) == 1
        ]
        return min(once, key=lambda p: (p.count("."), len(p))) if once else None

    def _named_root(self, node: fx.Node) -> bool:
        while _is_read(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node.op in ("placeholder", "call_module") or self.module_path(node) is not None

    def display(self, node: fx.Node) -> str:
        """The name `regbn.inspect` and the errors show for ``node``: its input name, module
        path, read expression or forward variable, in that order, else its fx node name; always
        one that `resolve_name` maps back to ``node`` (prefixed where the bare name is
        ambiguous)."""
        options: list[tuple[str, str]] = []
        if node.op == "placeholder":
            options.append(("input", input_name(node)))
        elif _is_input_entry(node):
            options.append(("input", entry_label(node)))
        if (path := self.module_path(node)) is not None:
            options.append(("module", path))
        read = expression(node) if _is_read(node) else node.name
        var = node.meta.get("regbn_variable")
        # A read of an input or a module's output (text.pooler_output) beats a variable; a
        # read of an unnamed result (rearrange_2[0]) does not.
        if read != node.name and self._named_root(node):
            options.append(("", read))
        if var:
            options.append(("", var))
        if read != node.name:
            options.append(("", read))
        options.append(("node", node.name))
        for prefix, name in options:
            for spelled in (name, f"{prefix}:{name}" if prefix else None):
                if spelled is not None and [c.node for c in self.candidates(spelled)] == [node]:
                    return spelled
        return f"node:{node.name}"


def display_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The user-facing name of one node (see `display_names`)."""
    return _Index(gm).display(node)


def display_names(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> the name shown to users: an input, a dotted module path, a read as the
    model's code spells it (``text.pooler_output``) or a variable of the model's forward
    (``g``), else the fx node name. Every name maps back to its node in `resolve_name`."""
    index = _Index(gm)
    return {n.name: index.display(n) for n in gm.graph.nodes if n.op != "output"}


def expression(node: fx.Node, depth: int = 4) -> str:
    """A short Python expression for an attribute or item read: ``text.pooler_output``,
    ``text['sentence_embedding']``, ``image.last_hidden_state[:, 0]``; else the node name."""
    if depth == 0 or node.op == "placeholder":
        return input_name(node) if node.op == "placeholder" else node.name
    if node.op == "call_module":
        return str(node.target)
    src = node.args[0] if node.op == "call_function" and len(node.args) == 2 else None
    if isinstance(src, fx.Node):
        key = node.args[1]
        if node.target is builtins.getattr and isinstance(key, str):
            return f"{expression(src, depth - 1)}.{key}"
        if node.target is operator.getitem:
            return f"{expression(src, depth - 1)}[{_index(key)}]"
    return node.name


def _index(key: Any) -> str:
    items = key if isinstance(key, tuple) else (key,)
    parts = []
    for item in items:
        if isinstance(item, slice):
            text = ":".join("" if v is None else str(v) for v in (item.start, item.stop))
            parts.append(text + (f":{item.step}" if item.step is not None else ""))
        elif item is Ellipsis:
            parts.append("...")
        else:
            parts.append(repr(item) if not isinstance(item, fx.Node) else item.name)
    return ", ".join(parts)


def _is_input_entry(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return is_constant_getitem(node) and isinstance(src, fx.Node) and src.op == "placeholder"


def _is_read(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (builtins.getattr, operator.getitem)


def _region_helper(node: fx.Node) -> bool:
    """A node that only enters or leaves a region, or hands a module to a checkpoint call."""
    region = node.meta.get("regbn_region")
    return region in ("grad", "autocast") or (region == "checkpoint" and node.op == "get_attr")


def _candidates(gm: fx.GraphModule, name: str) -> list[_Candidate]:
    return _Index(gm).candidates(name)


def is_ambiguous(gm: fx.GraphModule, name: str) -> bool:
    """True when a bare name denotes more than one tensor (an input and a module, say)."""
    return len(_candidates(gm, name)) > 1


def _all_names(gm: fx.GraphModule) -> list[str]:
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names.append(input_name(node))
        if node.op != "output":
            names.append(node.name)
        names.extend(path for path, _ in node.meta.get("regbn_output_of", ()))
        if node.op == "call_module":
            names.append(node.target)
        if _is_read(node) and (expr := expression(node)) != node.name:
            names.append(expr)
        if var := node.meta.get("regbn_variable"):
            names.append(var)
    return list(dict.fromkeys(names))


def unknown_name(gm: fx.GraphModule, name: str, model: nn.Module) -> RegBNValueError:
    """The error for a name that denotes no tensor: close matches and why a module has none."""
    bare = name.partition(":")[2] if name.partition(":")[0] in PREFIXES else name
    close = _distinct(gm, difflib.get_close_matches(bare, _all_names(gm), n=6, cutoff=0.6))[:3]
    did = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    note = _why_not_a_tensor(gm, model, bare)
    return RegBNValueError(
        f"{name!r} is not a tensor of this model{note}{did} {INSPECT_HINT}"
    )


def _distinct(gm: fx.GraphModule, names: list[str]) -> list[str]:
    # 'gray_net.fc' and its node 'gray_net_fc' are one tensor: suggest it once, best spelling first.
    seen: set[fx.Node] = set()
    out = []
    for name in names:
        nodes = {c.node for c in _candidates(gm, name)}
        if nodes and nodes <= seen:
            continue
        seen |= nodes
        out.append(name)
    return out


def _why_not_a_tensor(gm: fx.GraphModule, model: nn.Module, name: str) -> str:
    if name not in dict(model.named_modules()):
        return ""
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    parent = name
    while "." in parent:
        parent = parent.rsplit(".", 1)[0]
        if parent in leaves:
            if hooked(model.get_submodule(parent)):
                return (
                    f" (it lies inside {parent!r}, which has hooks and so stays one call, for "
                    f"its hooks to run as before; name {parent!r}, or remove its hooks before "
                    "insert and register them on the patched model)"
                )
            return (
                f" (it lies inside {parent!r}, which is traced as one call; name {parent!r}, or "
                "trace without it in leaf_modules)"
            )
    return " (it is a submodule, but forward never calls it)"


def resolve_name(
    gm: fx.GraphModule, name: str, model: nn.Module | None = None
) -> fx.Node:
    """The node a user-facing name denotes; ValueError for unknown or ambiguous names (the
    caller says which argument held it, e.g. with `regbn.errors.context`)."""
    if not isinstance(name, str):
        raise RegBNTypeError(
            f"names must be strings (an input name, a dotted module path or an fx node "
            f"name); got {name!r} of type {type(name).__name__}"
        )
    found = _candidates(gm, name)
    if not found:
        raise unknown_name(gm, name, model if model is not None else gm)
    if len(found) > 1:
        listed = ", ".join(repr(c.label.split(" ")[0]) + _describe(c) for c in found)
        raise RegBNValueError(
            f"{name!r} is ambiguous; it names {len(found)} different tensors: {listed}. "
            "Write one of these prefixed names (input:, module: or node:) instead"
        )
    return found[0].node


def _describe(c: _Candidate) -> str:
    shape = tensor_record(c.node).shape
    shape_s = f", shape {tuple(shape)}" if shape is not None else ""
    if c.kind == "module" and " (" in c.label:
        return f" [{c.label.split(' (', 1)[1].rstrip(')')}; write node:{c.node.name}{shape_s}]"
    return f" [node {c.node.name}{shape_s}]"
