"""Step 2 of `regbn.insert` (and `regbn.remove`): the edits of the fx graph.

`splice` calls each planned layer once both of its tensors exist and rewires every other use of
f and g to the layer's outputs; `reorder_topologically` then puts the nodes in a valid order,
moving as little as possible; `finish` lints the graph and recompiles the module.
`without_layers` undoes `splice` for `regbn.remove`.
"""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import replace

import networkx as nx
import torch.fx as fx

from ..modality.inputs import build_graph
from ..shapes.record import ShapeRecord, tensor_record
from ..tracing.regions import RegionError, barrier_edges
from .plan import Plan

__all__ = ["finish", "next_layer_index", "reorder_topologically", "splice", "without_layers"]

_LAYER_NAME = re.compile(r"^regbn_(\d+)$")


def splice(gm: fx.GraphModule, plans: list[Plan], names: list[str]) -> None:
    """Call layer ``names[i]`` on pair ``plans[i]`` and rewire the uses of f and g (the module
    docstring of `regbn.fx.insertion` says which uses of g keep the raw g)."""
    graph = gm.graph
    current: dict[fx.Node, fx.Node] = {}
    for name, plan in zip(names, plans, strict=True):
        if plan.layer is None:
            raise AssertionError(f"pair {plan.f_name!r}, {plan.g_name!r} has no layer yet")
        gm.add_submodule(name, plan.layer)
        f = current.get(plan.f, plan.f)
        g = current.get(plan.g, plan.g)
        order = {n: k for k, n in enumerate(graph.nodes)}
        anchor = f if order[f] > order[g] else g
        # Right before the first later use of f or g: the layer runs in the grad-mode or autocast
        # region of that use (a use inside `with torch.no_grad():` puts it there, a fusion after
        # the block keeps it outside).
        later = [u for u in (*f.users, *g.users) if order[u] > order[anchor]]
        first = min(later, key=order.__getitem__) if later else None
        with graph.inserting_before(first) if first is not None else graph.inserting_after(anchor):
            call = graph.call_module(name, (f, g))
        with graph.inserting_after(call):
            f_r = graph.call_function(operator.getitem, (call, 0))
        with graph.inserting_after(f_r):
            g_out = graph.call_function(operator.getitem, (call, 1))
        _annotate_new(call, f_r, g_out, f, g, plan)
        _rewire(f, f_r, keep={call})
        _rewire(g, g_out, keep={call} | _upstream(gm, f))  # the uses f needs keep the raw g
        current[plan.f], current[plan.g] = f_r, g_out


def _rewire(src: fx.Node, out: fx.Node, keep: set[fx.Node]) -> None:
    """Every use of ``src``, except by the nodes in ``keep``, reads ``out`` instead."""
    src.replace_all_uses_with(out, delete_user_cb=lambda user: user not in keep)


def _upstream(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    names = nx.ancestors(build_graph(gm), node.name)
    return {node} | {n for n in gm.graph.nodes if n.name in names}


def _annotate_new(call, f_r, g_out, f, g, plan: Plan) -> None:
    """The meta the analysis gives every node, for the layer's call and its two outputs."""
    mods = f.meta.get("regbn_modalities", frozenset()) | g.meta.get("regbn_modalities", frozenset())
    call.meta.update(
        regbn_module=call.target,
        regbn_module_calls=((call.target, 0),),
        regbn_output_of=[(call.target, 0)],
        regbn_tensor=ShapeRecord(
            nested=(
                (tensor_record(f).shape, tensor_record(f).dtype),
                (tensor_record(g).shape, tensor_record(g).dtype),
            )
        ),
        regbn_modalities=mods,
        regbn_fusion=None,
        regbn_role="layer",
        regbn_pair=(plan.f_name, plan.g_name),
    )
    for out, src, role in ((f_r, f, "f_r"), (g_out, g, "g_out")):
        out.meta.update(
            regbn_module=call.target,
            regbn_module_calls=((call.target, 0),),
            regbn_tensor=replace(tensor_record(src), nested=None),
            regbn_modalities=mods,
            regbn_fusion=None,
            regbn_role=role,
        )


def reorder_topologically(gm: fx.GraphModule) -> None:
    """Put nodes in a valid order, keeping the existing one wherever it is already valid."""
    nodes = list(gm.graph.nodes)
    position = {n.name: (0 if n.op == "placeholder" else 1, k) for k, n in enumerate(nodes)}
    graph = build_graph(gm)
    # Grad-mode and autocast regions: every node stays inside the region it was traced in.
    graph.add_edges_from(barrier_edges(nodes))
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    except nx.NetworkXUnfeasible as e:
        raise RegionError(
            "a pair's tensors lie in different grad-mode or autocast regions of the model's code "
            "(one inside a `with torch.no_grad():` or `torch.autocast` block, one outside), and "
            "a tensor used inside the region would need the layer's output. Pair tensors of the "
            "same region, e.g. the outputs of the modules that contain the regions"
        ) from e
    by_name = {n.name: n for n in nodes}
    if order == [n.name for n in nodes]:
        return
    prev = by_name[order[0]]
    if prev is not nodes[0]:
        nodes[0].prepend(prev)
    for name in order[1:]:
        node = by_name[name]
        if prev.next is not node:
            prev.append(node)
        prev = node


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Check the edited graph and regenerate the module's code from it."""
    gm.graph.lint()
    gm.recompile()
    return gm


def next_layer_index(gm: fx.GraphModule) -> int:
    """The k of the next ``regbn_k``: after every layer ``gm`` holds already."""
    used = [int(m.group(1)) for name in gm._modules if (m := _LAYER_NAME.match(name))]
    return max(used) + 1 if used else 0


def without_layers(graph: fx.Graph, names: set[str]) -> fx.Graph:
    """A copy of ``graph`` in which the calls of layers ``names`` are gone and their outputs'
    uses read the layers' inputs again."""
    out = copy.deepcopy(graph)
    for call in [n for n in out.nodes if n.op == "call_module" and n.target in names]:
        f, g = call.args[0], call.args[1]
        for user in list(call.users):
            user.replace_all_uses_with(f if user.args[1] == 0 else g)
            out.erase_node(user)
        out.erase_node(call)
    return out
