"""Training and eval mode in `regbn.insert`: one set of layers in both graphs.

When the model's code reads ``self.training``, insert traces it in both modes. `align` matches
the nodes of the two graphs, `eval_plans` finds each pair in the eval graph, `warn_mixed_modes`
warns where a module's mode differs from the model's, and `mode_result` builds the
`ModeGraphModule` that switches graphs with ``train()``/``eval()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any

import torch.fx as fx
from torch import nn

from ...errors import RegBNValueError, RegBNWarning
from ..names import INSPECT_HINT
from ..shapes.record import tensor_record
from ..tracing.mode_graph import ModeGraphModule
from ..tracing.module_state import carry_missing_state
from .plan import Plan

__all__ = ["align", "eval_plans", "mode_result", "warn_mixed_modes"]


def align(train: fx.GraphModule, ev: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Map each node of the training graph to the same computation in the eval graph.

    Node names drift after the first mode-dependent node (``add_3`` in one graph is ``add_2`` in
    the other), so nodes are matched as sequences of (op, target, module call stack): the longest
    matching blocks, in graph order. Nodes only one mode computes stay unmatched.
    """

    def key(n: fx.Node) -> tuple[Any, ...]:
        return (n.op, str(n.target), n.meta.get("regbn_module_calls", ()))

    a, b = list(train.graph.nodes), list(ev.graph.nodes)
    matcher = difflib.SequenceMatcher(None, [key(n) for n in a], [key(n) for n in b], False)
    out: dict[fx.Node, fx.Node] = {}
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            out[a[i + k]] = b[j + k]
    return out


def eval_plans(plans: list[Plan], train: fx.GraphModule, ev: fx.GraphModule) -> list[Plan]:
    """``plans`` (resolved in the training graph) with the eval graph's nodes of the same
    tensors; a tensor eval mode does not compute is refused."""
    match = align(train, ev)
    out = []
    for plan in plans:
        nodes = []
        for node, name in ((plan.f, plan.f_name), (plan.g, plan.g_name)):
            other = match.get(node)
            if other is None or tensor_record(other).shape != tensor_record(node).shape:
                raise RegBNValueError(
                    f"pair {plan.index}: {name!r} (node {node.name}) is computed in training "
                    "mode only (code under `if self.training`), so eval mode has no such tensor. "
                    "Pair a tensor both modes compute, e.g. the output of the enclosing module; "
                    f"{INSPECT_HINT}"
                )
            nodes.append(other)
        out.append(dataclasses.replace(plan, f=nodes[0], g=nodes[1]))
    return out


def mode_result(
    model: nn.Module, train: fx.GraphModule, ev: fx.GraphModule | None
) -> fx.GraphModule:
    """The patched model: ``train`` alone, or a `ModeGraphModule` of both graphs where eval mode
    has its own (``ev``); every module fx made has the model's training flag."""
    out = train
    if ev is not None:
        out = ModeGraphModule(train, train.graph, ev.graph, type(train).__name__, eval_root=ev)
        carry_missing_state(train, out)
        out.meta.update(train.meta)
    _copy_flags(model, out)
    if isinstance(out, ModeGraphModule):
        out._select(out.training)
    return out


def _mode_dependent(train: fx.GraphModule, ev: fx.GraphModule) -> set[str | None]:
    """Module paths (``None``: the top level) whose code computes differently in the two modes:
    the innermost module call of every node one graph has and the other lacks or calls with
    other arguments."""
    match = align(train, ev)
    out = {n.meta.get("regbn_module") for n in ev.graph.nodes if n not in match.values()}
    for node, other in match.items():
        try:
            mapped = fx.node.map_arg((node.args, node.kwargs), match.get)
            same = bool(mapped == (other.args, other.kwargs))
        except (RuntimeError, TypeError, ValueError):  # tensor arguments: no plain ==
            same = False
        if not same:
            out.add(node.meta.get("regbn_module"))
    out |= {n.meta.get("regbn_module") for n in train.graph.nodes if n not in match}
    return out


def warn_mixed_modes(model: nn.Module, train: fx.GraphModule, ev: fx.GraphModule) -> None:
    """Warn where a module whose code reads ``self.training`` is not in the model's mode: the
    result runs the graph of the model's mode until ``train()``/``eval()`` sets every module."""
    other: list[str] = []
    for path in [p for p in _mode_dependent(train, ev) if p is not None]:
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a GraphModule keeps only the modules its graph calls
            continue
        if module.training is not model.training:
            other.append(path)
    if other:
        mode = "training" if model.training else "eval"
        warnings.warn(
            f"the model is in {mode} mode but {sorted(other)} are not, and their code "
            f"reads self.training; the result runs it as in {mode} mode until patched.train() "
            "or patched.eval() sets every module",
            RegBNWarning,
            stacklevel=1,
        )


def _copy_flags(model: nn.Module, out: fx.GraphModule) -> None:
    # The traces ran with every module in one mode: modules fx made take the model's flags again
    # (the model's own modules, shared with ``out``, got theirs back from `in_mode`).
    original = dict(model.named_modules())
    for path, sub in out.named_modules():
        mod = original.get(path)
        if mod is not None and sub is not mod:
            sub.training = mod.training
