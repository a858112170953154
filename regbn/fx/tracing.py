"""Symbolic tracing for model surgery.

`trace` turns an ``nn.Module`` into a ``torch.fx.GraphModule`` and records, for every node, where
in the module hierarchy it came from. Everything downstream (shape propagation, modality analysis,
name resolution in `regbn.insert`, `regbn.inspect`) reads these annotations:

``node.meta["regbn_module"]``
    Dotted path of the innermost module call the node belongs to; ``None`` at top level. For a leaf
    ``call_module`` node it is the node's target.
``node.meta["regbn_module_calls"]``
    The whole stack of module calls, outermost first, as ``(path, call_index)`` pairs. The call
    index tells apart two calls of one module (a shared encoder applied to two modalities).
``node.meta["regbn_output_of"]``
    The ``(path, call_index)`` calls whose return value is this node. For a leaf module it is its
    own call; for a traced-through module (a ``Sequential``) the node its ``forward`` returned.

Training mode. Code that reads ``self.training`` (``F.dropout(x, p, self.training)``, stochastic
depth, many Hugging Face layers) is frozen into the graph with the mode the model had while it was
traced. `ModeGraphModule` holds one graph per mode and follows ``train()``/``eval()``; see
`regbn.insert` for when it is used. `in_mode` puts a model in one mode for a trace and restores
every module's flag afterwards.

Wrappers. A ``torch.compile`` d model (``OptimizedModule``) and ``DataParallel`` /
``DistributedDataParallel`` have no traceable forward of their own; `unwrap` returns the module
they wrap, which `trace` traces instead.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import os
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block, reduce_graph_module
from torch.package import sys_importer

from ..errors import RegBNError
from ..layer import RegBN

__all__ = [
    "ModeGraphModule",
    "RegBNTracer",
    "TraceError",
    "in_mode",
    "input_name",
    "is_regbn",
    "same_graph",
    "same_trace",
    "trace",
    "trace_graph",
    "unwrap",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_REGBN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LeafSpec = type[nn.Module] | str


class TraceError(RegBNError, ValueError):
    """The model could not be traced symbolically.

    The message names the module, the source line and the reason, and says how to work around it.
    """

    def __init__(
        self,
        message: str,
        *,
        module_path: str | None = None,
        location: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.location = location
        self.reason = reason


def is_regbn(gm: nn.Module, node: fx.Node) -> bool:
    """True when ``node`` calls a `regbn.RegBN` layer of ``gm``."""
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), RegBN)
    except AttributeError:
        return False


class RegBNTracer(fx.Tracer):
    """A tracer that keeps RegBN layers opaque and records module provenance in ``node.meta``."""

    def __init__(
        self,
        leaf_classes: tuple[type[nn.Module], ...] = (),
        leaf_paths: Iterable[str] = (),
        autowrap_functions: Sequence[Callable[..., Any]] = (),
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_classes = (*leaf_classes, RegBN)
        self.leaf_paths = frozenset(leaf_paths)
        self._call_stack: list[tuple[str, int]] = []
        self._call_counts: dict[str, int] = defaultdict(int)
        # Innermost module path active when tracing failed (the stack is unwound by then).
        self.failed_module: tuple[str, ...] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_classes) or module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            # Not part of the hierarchy; let fx raise its own error with the stack intact.
            return super().call_module(m, forward, args, kwargs)
        call = (path, self._call_counts[path])
        self._call_counts[path] += 1
        self._call_stack.append(call)
        last_before = self._last_node()
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = tuple(p for p, _ in self._call_stack)
            raise
        finally:
            self._call_stack.pop()
        self._mark_output(call, result, last_before)
        return result

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["regbn_module"] = self._call_stack[-1][0] if self._call_stack else None
        node.meta["regbn_module_calls"] = tuple(self._call_stack)
        return node

    def _last_node(self) -> fx.Node | None:
        return next(iter(reversed(self.graph.nodes)), None)

    def _mark_output(self, call: tuple[str, int], result: Any, last_before: fx.Node | None) -> None:
        if isinstance(result, fx.Proxy):
            node = result.node
        else:
            # A tuple or dict of tensors: the design names the last node inside the call.
            node = self._last_node()
            if node is None or node is last_before:
                return
        node.meta.setdefault("regbn_output_of", []).append(call)


def _split_leaf_modules(
    model: nn.Module, leaf_modules: Iterable[LeafSpec] | None
) -> tuple[tuple[type[nn.Module], ...], list[str]]:
    classes: list[type[nn.Module]] = []
    paths: list[str] = []
    if leaf_modules is None:
        return (), []
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = [leaf_modules]
    known = [name for name, _ in model.named_modules() if name]
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            classes.append(spec)
        elif isinstance(spec, str):
            if spec not in known:
                close = difflib.get_close_matches(spec, known, n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"leaf_modules: {spec!r} is not a submodule of {type(model).__name__}{hint} "
                    "Give dotted paths as in model.named_modules(), or nn.Module classes."
                )
            paths.append(spec)
        else:
            raise TypeError(
                "leaf_modules must hold nn.Module classes or dotted module paths (str); "
                f"got {spec!r} of type {type(spec).__name__}"
            )
    return tuple(classes), paths


_REASONS: list[tuple[str, str]] = [
    (
        "cannot be used as inputs to control flow",
        "a data-dependent `if`/`while` (bool() of a traced tensor): the branch taken depends on "
        "values that do not exist while tracing",
    ),
    (
        "cannot be iterated",
        "iteration over a traced value (a `for` loop over a tensor, unpacking it, or passing it "
        "as *args)",
    ),
    (
        "'len' is not supported",
        "len() of a traced tensor; its length is not known while tracing",
    ),
    (
        "int() argument must be",
        "int() of a traced value (e.g. of a shape entry); the number is not known while tracing",
    ),
    (
        "cannot be interpreted as an integer",
        "a traced value used as a Python integer (range(), list index, repeat count...), "
        "e.g. x.shape[0] inside range()",
    ),
    (
        "float() argument must be",
        "float() of a traced value; the number is not known while tracing",
    ),
    (
        "not installed as a submodule",
        "a module that is not an attribute of the model (created inside forward?)",
    ),
]


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_REGBN_DIR + os.sep + "fx"):
            continue
        if frame.filename.startswith("<"):  # generated code (fx, eval)
            continue
        return frame
    return None


def _trace_error(exc: BaseException, model: nn.Module, tracer: RegBNTracer) -> TraceError:
    stack = tracer.failed_module or ()
    path = stack[-1] if stack else None
    where = repr(path) if path else f"the top-level forward of {type(model).__name__}"
    if path:
        where += f" ({type(model.get_submodule(path)).__name__})"
    frame = _user_frame(exc)
    location = f"{frame.filename}:{frame.lineno}" if frame else None
    reason = _reason(exc)
    lines = [f"Cannot trace {type(model).__name__} with torch.fx: tracing failed in {where}"]
    if frame is not None:
        code = f"\n      {frame.line.strip()}" if frame.line else ""
        lines.append(f"  at {location}, in {frame.name}(){code}")
    lines.append(f"  why: {reason}")
    if stack:
        fixes = [
            f"leaf_modules=[{stack[-1]!r}] to keep {stack[-1]!r} as one opaque call "
            "(it cannot then be named inside)"
        ]
    else:
        fixes = [
            "leaf_modules=[...] naming a submodule that holds this code (code in the top-level "
            "forward must move into a submodule first)"
        ]
    fixes.append(
        "concrete_args={'arg': value} to fix a Python-level argument (a flag, a length) "
        "to a constant"
    )
    if frame is not None and frame.name != "forward":
        fixes.append(f"autowrap_functions=[{frame.name}] to record that function as one call")
    fixes.append("or trace the model yourself and pass the GraphModule")
    lines.append("  fix: pass " + ";\n       ".join(fixes))
    return TraceError("\n".join(lines), module_path=path, location=location, reason=reason)


def trace(
    model: nn.Module,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    autowrap_functions: Sequence[Callable[..., Any]] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` annotated for surgery (see the module docstring).

    An existing ``GraphModule`` is returned as it is (a `ModeGraphModule` with the graph of its
    current mode). A ``torch.compile`` d, ``DataParallel`` or ``DistributedDataParallel`` model is
    traced through the module it wraps (see `unwrap`). RegBN layers are always leaves, as are the
    classes and dotted paths in ``leaf_modules``. The graph records each ``self.training`` read
    with the mode the modules have now. The result shares the model's parameters and buffers and
    keeps every ``state_dict`` key of the model, including those of parameters the forward never
    reads; the model itself gets no attribute. Raises `TraceError` (a ``ValueError``) when the
    model is not traceable.
    """
    traced = trace_graph(
        model,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    return traced.graph_module()


@dataclass
class Traced:
    """A graph and what it reads: `trace_graph`'s result, before any ``GraphModule`` is made.

    ``model``: the traced module (wrappers removed); ``graph``: its graph; ``constants``: tensors
    fx made while tracing (``_tensor_constant0``), which the graph reads but the model does not
    hold.
    """

    model: nn.Module
    graph: fx.Graph
    constants: dict[str, Any]

    def graph_module(self) -> fx.GraphModule:
        """The annotated ``GraphModule`` (the model itself where it is one already)."""
        if isinstance(self.model, fx.GraphModule) and self.graph is self.model.graph:
            return self.model
        targets = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                name = str(node.target)
                value = self.constants[name] if name in self.constants else None
                targets[name] = _lookup(self.model, name) if value is None else value
        gm = fx.GraphModule(targets, self.graph, type(self.model).__name__)
        carry_missing_state(self.model, gm)
        return gm


def same_trace(traced: Traced, gm: fx.GraphModule) -> bool:
    """True when ``traced`` runs what ``gm`` runs: the same graph, and every tensor constant fx
    made while tracing equal to ``gm``'s (a constant may depend on ``self.training``)."""
    if not same_graph(traced.graph, gm.graph):
        return False
    for name, value in traced.constants.items():
        mine = _lookup(gm, name)
        try:
            equal = (
                isinstance(mine, torch.Tensor)
                and isinstance(value, torch.Tensor)
                and mine.shape == value.shape
                and mine.dtype == value.dtype
                and bool(torch.equal(mine, value))
            )
        except (RuntimeError, NotImplementedError):  # meta or fake tensors hold no values
            equal = False
        if not equal:
            return False
    return True


def trace_graph(
    model: nn.Module,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    autowrap_functions: Sequence[Callable[..., Any]] | None = None,
) -> Traced:
    """`trace` without building the ``GraphModule`` (which compiles its code): the graph alone,
    e.g. to compare two traces. ``Traced.graph_module()`` finishes the job."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace expects an nn.Module; got {type(model).__name__}")
    model, _ = unwrap(model)
    if isinstance(model, fx.GraphModule):
        return Traced(model, model.graph, {})
    if autowrap_functions is not None and not all(callable(f) for f in autowrap_functions):
        raise TypeError("autowrap_functions must be a sequence of Python functions")
    classes, paths = _split_leaf_modules(model, leaf_modules)
    tracer = RegBNTracer(classes, paths, autowrap_functions or ())
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        _name_placeholders(graph, model, concrete_args)
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as e:
        if isinstance(e, TraceError):
            raise
        raise _trace_error(e, model, tracer) from e
    finally:
        # fx stores tensors made while tracing (``_tensor_constant0``) on the model it traces;
        # they move to the result, and the caller's model stays as it was.
        constants = {name: vars(model)[name] for name in set(vars(model)) - before}
        for name in constants:
            delattr(model, name)
    return Traced(model, graph, constants)


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel``.

    Returns the innermost wrapped module and the wrappers removed, outermost first (e.g.
    ``["torch.compile", "DistributedDataParallel"]``); a model that is no wrapper comes back as
    it is with ``[]``.
    """
    wrappers: list[str] = []
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            wrappers.append("torch.compile")
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            wrappers.append(type(model).__name__)
            model = model.module
        else:
            return model, wrappers


def input_name(node: fx.Node) -> str:
    """The forward argument a placeholder stands for (fx may have renamed the node)."""
    return node.meta.get("regbn_arg") or str(node.target).lstrip("*")


def _name_placeholders(graph: fx.Graph, model: nn.Module, concrete_args: dict | None) -> None:
    """Record each placeholder's argument name (``node.meta["regbn_arg"]``).

    fx renames a specialised argument (``double`` becomes placeholder ``double_1``) and keeps its
    original default while asserting the concrete value, so calling the traced model without
    that argument would fail. The default becomes the concrete value where it is a literal.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(params):
        return
    for node, param in zip(placeholders, params, strict=True):
        node.meta["regbn_arg"] = param.name
        if concrete_args and param.name in concrete_args:
            value = concrete_args[param.name]
            if value is None or isinstance(value, (bool, int, float, str)):
                node.args = (value,)


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


# ----------------------------------------------------------------------------- training mode


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` for the duration, then every module's own flag as it was.

    A `ModeGraphModule` also gets the graph of its original mode back.
    """
    flags = [(m, m.training) for m in model.modules()]
    current = not isinstance(model, ModeGraphModule) or model.graph is model.mode_graphs[training]
    if current and all(flag is training for _, flag in flags):  # nothing to switch or restore
        yield model
        return
    model.train(training)
    try:
        yield model
    finally:
        if isinstance(model, ModeGraphModule):
            model.train(flags[0][1])
        for m, flag in flags:
            m.training = flag


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]]:
    def name(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: ("%node", n.name))

    return [(n.name, n.op, n.target, name(n.args), name(n.kwargs)) for n in graph.nodes]


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """True when ``a`` and ``b`` run the same code: same nodes, ops, targets and arguments."""
    if len(a.nodes) != len(b.nodes):
        return False
    try:
        return bool(_signature(a) == _signature(b))
    except (RuntimeError, TypeError, ValueError):  # tensors among the arguments: ambiguous ==
        return False


def _lookup(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _assign(root: nn.Module, target: str, value: Any) -> None:
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


class ModeGraphModule(fx.GraphModule):
    """A ``GraphModule`` with one graph for training and one for evaluation.

    ``train()`` and ``eval()`` switch ``graph`` (and the generated ``forward``) to that mode's
    graph; both graphs call the same submodules, so parameters, buffers and ``state_dict`` keys
    are shared, never duplicated. ``graph`` and ``code`` are those of the current mode, and so is
    what any tracer that re-traces this module sees (``torch.fx.symbolic_trace``, a
    ``DataParallel`` replica, ``torch.export``). ``mode_graphs`` gives both; an edit to one graph
    applies to that mode only. Setting ``module.training`` by hand does not switch graphs; call
    ``train()``/``eval()``.

    Why two graphs rather than one: fx graphs have no control flow, and ``self.training`` decides
    Python-level branches (stochastic depth skips its ops in eval mode), so one graph cannot hold
    both behaviours. torchvision's ``create_feature_extractor`` takes the same route; `regbn.insert`
    only builds this class when the two traces differ, so models without mode-dependent code keep
    a plain ``GraphModule``.
    """

    def __init__(
        self,
        root: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph,
        class_name: str = "GraphModule",
        eval_root: nn.Module | None = None,
    ) -> None:
        super().__init__(root, train_graph, class_name)
        self._merge_targets(eval_root if eval_root is not None else root, eval_graph)
        self._mode_graphs = {True: train_graph, False: eval_graph}
        self._select(self.training)

    def _merge_targets(self, source: nn.Module, graph: fx.Graph) -> None:
        """Give ``self`` every attribute ``graph`` reads; a name taken by a different object (a
        constant that differs between modes) is renamed in ``graph``."""
        for node in graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            wanted = _lookup(source, str(node.target))
            mine = _lookup(self, str(node.target))
            if mine is wanted:
                continue
            target = str(node.target)
            if mine is not None:
                k = 0
                while _lookup(self, f"{target}_eval{k}") is not None:
                    k += 1
                target = f"{target}_eval{k}"
                node.target = target
            _assign(self, target, wanted)

    @property
    def mode_graphs(self) -> dict[bool, fx.Graph]:
        """``{True: training graph, False: evaluation graph}``."""
        return dict(self._mode_graphs)

    def _select(self, training: bool) -> None:
        graph = self._mode_graphs[bool(training)]
        if self._graph is not graph:
            self.graph = graph  # recompiles forward

    def train(self, mode: bool = True) -> ModeGraphModule:
        super().train(mode)
        self._select(mode)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModeGraphModule:
        res = super().__deepcopy__(memo)
        # self.__dict__ was deep-copied with the same memo: this returns those copies.
        res._mode_graphs = copy.deepcopy(self._mode_graphs, memo)
        for graph in res._mode_graphs.values():
            graph.owning_module = res
        res._select(res.training)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        # Like GraphModule: the generated code of each graph, not the graphs themselves.
        body = self.__dict__.copy()
        del body["_graph"]
        graphs = body.pop("_mode_graphs")
        sources = {}
        for mode, graph in graphs.items():
            code = graph.python_code(root_module="self")
            sources[mode] = (code.src, _format_import_block(code.globals, sys_importer))
        return (_rebuild_mode_graph_module, (body, sources, type(self).__name__))


def _rebuild_mode_graph_module(
    body: dict[str, Any], sources: dict[bool, tuple[str, str]], class_name: str
) -> ModeGraphModule:
    built = {
        mode: reduce_graph_module(dict(body, _code=src), block)
        for mode, (src, block) in sources.items()
    }
    out = ModeGraphModule(
        built[True], built[True].graph, built[False].graph, class_name, eval_root=built[False]
    )
    carry_missing_state(built[True], out)
    out.meta = body.get("meta", {})
    return out
