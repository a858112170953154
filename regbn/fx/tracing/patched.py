"""The patched model: an object of the model's own class whose ``forward`` runs the patched graph.

`regbn.insert` ends here. `build_patched` makes a new object of the model's class (a subclass
generated for that one object, as ``torch.fx.GraphModule`` does) that

- holds the model's own submodules, parameters and buffers (the same objects, in new
  containers, so the caller's model never changes) in the model's order, with the RegBN layers
  appended after them (``regbn_0``, ``regbn_1``, ...). ``parameters()`` and ``state_dict()``
  list the model's entries first, under the model's names, so an optimizer or checkpoint made
  before `insert` resumes onto the right tensors;
- keeps every other attribute, method, ``train()``/``eval()`` override and hook of the model
  (hooks registered on the model object at `insert` time are copied; later ones are its own);
- runs, in ``forward``, the training or the eval graph according to ``self.training`` (code
  that reads ``self.training`` is frozen into a trace, so each mode has its graph), calling the
  model's submodules through ``self``, and returns the model's output type (a ``ModelOutput``
  that fx turned into a dict comes back as the ``ModelOutput``).

Why this design: a ``GraphModule`` is not the user's class (methods, attributes and ``train()``
overrides are lost) and lists its submodules in graph order. A new object of the user's class,
sharing the user's module tree, keeps all of that and needs nothing of the caller's object.

``patched.graph``, ``patched.code``, ``patched.mode_graphs`` and ``patched.print_readable()``
give the patched graph, as on a ``GraphModule`` (unless the model's class has attributes of
those names; `patched_graphs` always works). Pickling (``torch.save`` of the whole object) saves
each graph as plain rows of nodes (`_rows`); the model's class must be importable, as for the
model itself.
"""

from __future__ import annotations

import builtins
import copy
import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, SupportsIndex, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _forward_from_src

from .module_state import lookup

__all__ = [
    "PatchedModel",
    "Patch",
    "base_class",
    "build_patched",
    "is_patched",
    "output_spec",
    "patched_graphs",
    "unpatched",
]

PATCH = "_regbn_patch"
CONSTANTS = "_regbn_constants"
_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own containers (modules, hooks, ...)


@dataclass
class Patch:
    """What the patched object runs: one graph per mode (the same graph when the modes agree),
    the layers `insert` added, the model's class and its output type."""

    graphs: dict[bool, fx.Graph]
    added: list[str]
    base: type[nn.Module]
    output: Any = None  # `output_spec` of what the model returned
    forwards: dict[bool, Any] = field(default_factory=dict, repr=False)

    def compile(self) -> None:
        done: dict[int, Any] = {}
        for mode, graph in self.graphs.items():
            if id(graph) not in done:
                code = graph.python_code(root_module="self")
                done[id(graph)] = _forward_from_src(code.src, code.globals)
            self.forwards[mode] = done[id(graph)]

    def restore(self, out: Any) -> Any:
        """The model's output types for what the graph returned."""
        return _restore(out, self.output)


def output_spec(value: Any) -> Any:
    """The container types of a model's output, ``(type, children)`` down to the tensors: a
    torch.fx graph returns a ``ModelOutput`` (a dict subclass) as a plain dict."""
    if isinstance(value, Mapping):
        return (type(value), {k: output_spec(v) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return (type(value), [output_spec(v) for v in value])
    return None


def _restore(out: Any, spec: Any) -> Any:
    if spec is None:
        return out
    kind, children = spec
    if isinstance(children, dict) and type(out) is dict:
        items = {k: _restore(v, children.get(k)) for k, v in out.items()}
        return items if kind is dict else kind(**items)
    if isinstance(children, list) and isinstance(out, (tuple, list)) and len(out) == len(
        children
    ):
        values = [_restore(v, c) for v, c in zip(out, children, strict=True)]
        return type(out)(*values) if hasattr(out, "_fields") else type(out)(values)
    return out


class PatchedModel(nn.Module):
    """Marker base of every patched object's class (see the module docstring)."""

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        state = dict(self.__dict__)
        patch: Patch = state.pop(PATCH)
        saved = {
            "graphs": {mode: _rows(graph) for mode, graph in patch.graphs.items()},
            "same": patch.graphs[True] is patch.graphs[False],
            "added": list(patch.added),
            "output": patch.output,
        }
        return (_rebuild, (patch.base, state, saved))

    def __repr__(self) -> str:
        patch: Patch = self.__dict__[PATCH]
        if patch.base.__repr__ is not nn.Module.__repr__:
            return super().__repr__()  # the model's own printout
        # Each added layer is printed after the submodule its inputs come from last, not at the
        # end where parameters() lists it.
        modules = self.__dict__["_modules"]
        try:
            self.__dict__["_modules"] = _display_order(modules, patch)
            return nn.Module.__repr__(self)
        finally:
            self.__dict__["_modules"] = modules


def _top_module(node: fx.Node) -> str | None:
    calls = node.meta.get("regbn_module_calls") or ()
    path = calls[0][0] if calls else str(node.target) if node.op == "call_module" else None
    return path.split(".")[0] if path else None


def _display_order(modules: dict[str, Any], patch: Patch) -> dict[str, Any]:
    order = [name for name in modules if name not in patch.added]
    for node in patch.graphs[True].nodes:
        if node.op != "call_module" or node.target not in patch.added:
            continue
        sources = [n for n in node.all_input_nodes if n.op != "placeholder"]
        tops = {t for n in sources if (t := _top_module(n)) is not None} & set(order)
        at = max((order.index(t) + 1 for t in tops), default=0)
        while at < len(order) and order[at] in patch.added:
            at += 1  # after layers placed there before it
        order.insert(at, str(node.target))
    order += [name for name in modules if name not in order]
    return {name: modules[name] for name in order}


def _class_for(base: type[nn.Module], forward: Any, taken: set[str]) -> type[nn.Module]:
    """A subclass of ``base`` for one patched object: ``forward`` runs the patched graph."""

    def graph(self) -> fx.Graph:
        return self.__dict__[PATCH].graphs[self.training]

    def code(self) -> str:
        return graph(self).python_code(root_module="self").src

    def mode_graphs(self) -> dict[bool, fx.Graph]:
        return dict(self.__dict__[PATCH].graphs)

    def print_readable(self, print_output: bool = True) -> str:
        text = code(self)
        if print_output:
            print(text)
        return text

    ns: dict[str, Any] = {
        "forward": forward,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    extras = {
        "graph": property(graph),
        "code": property(code),
        "mode_graphs": property(mode_graphs),
        "print_readable": print_readable,
    }
    for name, value in extras.items():
        if name not in taken and not hasattr(base, name):
            ns[name] = value
    return type(base.__name__, (PatchedModel, base), ns)


def _make_forward(signature_of: Any) -> Any:
    @functools.wraps(signature_of)  # fx, torch.export and inspect see the graph's arguments
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        patch: Patch = self.__dict__[PATCH]
        return patch.restore(patch.forwards[self.training](self, *args, **kwargs))

    return forward


def _instance(base: type[nn.Module], state: dict[str, Any], patch: Patch) -> nn.Module:
    patch.compile()
    taken = set(state) | {k for t in ("_modules", "_parameters", "_buffers") for k in state[t]}
    cls = _class_for(base, _make_forward(patch.forwards[True]), taken)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    obj.__dict__[PATCH] = patch
    return obj


def _own_containers(model: nn.Module) -> dict[str, Any]:
    """``model.__dict__`` with nn.Module's containers (submodules, parameters, buffers, hooks)
    copied, so that adding to the result never adds to ``model``."""
    state = dict(model.__dict__)
    for key, value in state.items():
        if key in _INTERNALS and isinstance(value, (dict, set)):
            state[key] = copy.copy(value)
    state.pop(PATCH, None)
    return state


def base_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (for a patched object: the class of the model it was made from)."""
    patch = model.__dict__.get(PATCH)
    return patch.base if patch is not None else type(model)


def is_patched(model: Any) -> bool:
    """True for an object `regbn.insert` returned (not a ``GraphModule``)."""
    return isinstance(model, PatchedModel) and PATCH in model.__dict__


def patched_graphs(model: nn.Module) -> dict[bool, fx.Graph]:
    """``{True: training graph, False: eval graph}`` of a patched object."""
    return dict(model.__dict__[PATCH].graphs)


def added_names(model: nn.Module) -> list[str]:
    """The RegBN layers `insert` added to a patched object."""
    return list(model.__dict__[PATCH].added)


def build_patched(
    model: nn.Module,
    per_mode: dict[bool, fx.GraphModule],
    added: list[str],
    output: Any = None,
) -> nn.Module:
    """The patched object for ``model``: ``per_mode[True]``/``[False]`` are the spliced graph
    modules of each mode (the same object when the modes agree), ``added`` the names of all
    RegBN layers insert added (earlier inserts' too). The graphs are copied; their targets are
    read from the new object (the model's paths, the layers at the top, and tensors fx made
    while tracing in a ``_regbn_constants`` module after them)."""
    state = _own_containers(model)
    modules = state["_modules"]
    for name in added:
        if name not in modules:
            per = per_mode[True] if lookup(per_mode[True], name) is not None else per_mode[False]
            modules[name] = per.get_submodule(name)
    constants = nn.Module()
    graphs: dict[bool, fx.Graph] = {}
    copies: dict[int, fx.Graph] = {}
    for mode, gm in per_mode.items():
        if id(gm) not in copies:
            copies[id(gm)] = _retarget(gm, state, constants, "" if mode else "_eval")
        graphs[mode] = copies[id(gm)]
    if constants._buffers or constants._modules or constants._parameters:
        constants.training = model.training
        modules[CONSTANTS] = constants
    patch = Patch(graphs, list(added), base_class(model), output)
    return _instance(patch.base, state, patch)


def _retarget(gm: fx.GraphModule, state: dict, constants: nn.Module, suffix: str) -> fx.Graph:
    """A copy of ``gm``'s graph whose ``get_attr`` targets all resolve on the patched object."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    shell = nn.Module()
    shell.__dict__.update(state)
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        value = lookup(gm, target)
        if lookup(shell, target) is value:
            continue
        name = target.replace(".", "_") + suffix
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            constants.register_buffer(name, value, persistent=False)
        elif isinstance(value, nn.Module):
            constants.add_module(name, value)
        else:
            setattr(constants, name, value)
        node.target = f"{CONSTANTS}.{name}"
    graph.lint()
    return graph


# Node meta worth keeping in a pickle: regbn's provenance (names resolve on a reloaded model).
_KEPT_META = ("regbn_module", "regbn_module_calls", "regbn_output_of", "regbn_region",
              "regbn_arg", "stack_trace")  # fmt: skip


def _rows(graph: fx.Graph) -> list[tuple[Any, ...]]:
    """``graph`` as plain rows (op, name, target, args, kwargs, meta), node references written
    as ``_Ref(name)``: picklable without recursion over the node list and without tracing the
    generated code again (which would lose the grad-mode and autocast nodes)."""
    rows = []
    for n in graph.nodes:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: cast(Any, _Ref(a.name)))
        meta = {k: n.meta[k] for k in _KEPT_META if k in n.meta}
        rows.append((n.op, n.name, _by_name(n.target), args, kwargs, meta))
    return rows


@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Named:
    """A function pickled by its qualified name, as fx's generated code names it (many torch
    functions, e.g. ``F.max_pool2d``, are local objects that pickle cannot name)."""

    name: str

    def resolve(self) -> Any:
        parts = self.name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for part in parts[cut:]:
                obj = getattr(obj, part)
            return obj
        return getattr(builtins, self.name)


def _by_name(target: Any) -> Any:
    if isinstance(target, str) or not callable(target):
        return target
    try:
        named = _Named(fx.node._get_qualified_name(target))
        if named.resolve() is target:
            return named
    except (AttributeError, ImportError, RuntimeError, ValueError):
        pass
    return target


def _graph_of(rows: list[tuple[Any, ...]]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def load(a: Any) -> Any:
        if isinstance(a, _Ref):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(load(x) for x in a) if not hasattr(a, "_fields") else type(a)(
                *(load(x) for x in a)
            )
        if isinstance(a, dict):
            return {k: load(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(load(a.start), load(a.stop), load(a.step))
        return a

    for op, name, target, args, kwargs, meta in rows:
        target = target.resolve() if isinstance(target, _Named) else target
        node = graph.create_node(op, target, load(args), load(kwargs), name=name)
        node.meta.update(meta)
        env[name] = node
    return graph


def _rebuild(base: type[nn.Module], state: dict[str, Any], saved: dict[str, Any]) -> nn.Module:
    """Unpickle a patched object."""
    graphs = {mode: _graph_of(rows) for mode, rows in saved["graphs"].items()}
    if saved["same"]:
        graphs[False] = graphs[True]
    patch = Patch(graphs, saved["added"], base, saved["output"])
    return _instance(base, state, patch)


def unpatched(patched: nn.Module) -> nn.Module:
    """An object of the model's class, sharing ``patched``'s modules, without the RegBN layers
    `insert` added nor the patched graph: it runs the model's own ``forward``."""
    state = _own_containers(patched)
    for name in (*added_names(patched), CONSTANTS):
        state["_modules"].pop(name, None)
    base = base_class(patched)
    obj = base.__new__(base)
    obj.__dict__.update(state)
    return obj
