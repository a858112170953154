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
``node.meta["regbn_variable"]``
    The local variable of the model's own ``forward`` that holds this node's value when forward
    returns (``g`` for ``g = torch.flatten(self.gray_net(gray), 1)``), read from forward's frame
    as tracing leaves it; absent where no variable holds it.

Training mode. Code that reads ``self.training`` is frozen into the graph with the mode the model
had while it was traced; `regbn.fx.mode_graph` holds one graph per mode (`ModeGraphModule`) and
puts a model in one mode for a trace (`in_mode`). A trace that fails raises `TraceError`
(`regbn.fx.trace_errors`), never a raw fx traceback.

Wrappers. A ``torch.compile`` d model (``OptimizedModule``) and ``DataParallel`` /
``DistributedDataParallel`` have no traceable forward of their own; `unwrap` returns the module
they wrap, which `trace` traces instead.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import sys
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError, public
from ...layer import RegBN
from .errors import TraceError, trace_error
from .mode_graph import ModeGraphModule, in_mode, same_graph
from .module_state import carry_missing_state, lookup
from .patched import is_patched, patched_graphs
from .regions import (
    CHECKPOINT,
    RegionError,
    check_checkpoint,
    einops_functions,
    einops_layers,
    hooked,
    recording_regions,
)

__all__ = [
    "ModeGraphModule",
    "RegBNTracer",
    "TraceError",
    "carry_missing_state",
    "in_mode",
    "input_name",
    "is_regbn",
    "same_graph",
    "same_trace",
    "trace",
    "trace_graph",
    "unwrap",
]

LeafSpec = type[nn.Module] | str


def is_regbn(gm: nn.Module, node: fx.Node) -> bool:
    """True when ``node`` calls a `regbn.RegBN` layer of ``gm``."""
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), RegBN)
    except AttributeError:
        return False


class RegBNProxy(fx.Proxy):
    """A Proxy whose attribute assignments are graph nodes: ``out.pooler_output = proj(x)`` on
    a leaf's output object (transformers' ``get_text_features``) mutates the real object at
    run time too, so what the model returns keeps the field it set."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tracer", "node") or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        call = self.tracer.create_proxy("call_function", setattr, (self, name, value), {})
        call.node.meta["regbn_region"] = "setattr"
        object.__setattr__(self, name, value)  # later reads in the traced code see the value


fx.node.has_side_effect(setattr)


class RegBNTracer(fx.Tracer):
    """A tracer that keeps RegBN layers opaque and records module provenance in ``node.meta``."""

    def __init__(
        self,
        leaf_classes: tuple[type[nn.Module], ...] = (),
        leaf_paths: Iterable[str] = (),
        autowrap_functions: Sequence[Callable[..., Any]] = (),
    ) -> None:
        # Global names bound to torch.utils.checkpoint.checkpoint or to einops' functions stay
        # one call (regions.py).
        self._leaf_functions = (CHECKPOINT, *einops_functions())
        super().__init__(autowrap_functions=(*autowrap_functions, *self._leaf_functions))
        self.leaf_classes = (*leaf_classes, RegBN, *einops_layers())
        # print/logging lines met while tracing: they run once here, never in the graph.
        self.effects: list[str] = []
        self.leaf_paths = frozenset(leaf_paths)
        self._call_stack: list[tuple[str, int]] = []
        self._call_counts: dict[str, int] = defaultdict(int)
        # Innermost module path active when tracing failed (the stack is unwound by then).
        self.failed_module: tuple[str, ...] | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return RegBNProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_classes) or module_qualified_name in self.leaf_paths:
            return True
        # A module with hooks stays one call, so that its hooks run as before.
        return hooked(m) or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        # Grad-mode and autocast regions and checkpoint calls become nodes (regions.py).
        with recording_regions(self, self.effects), _forward_locals(root) as variables:
            graph = super().trace(root, concrete_args)
        _name_variables(graph, variables)
        for node in graph.nodes:
            if node.target in self._leaf_functions:  # not fx.wrap'ed in the generated code
                node.meta.pop("is_wrapped", None)
        return graph

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        if kind == "call_function" and target is CHECKPOINT:
            check_checkpoint(self, args[0] if args else None)
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind == "call_function" and target is CHECKPOINT:
            # The checkpointed module's output, as its name says (``pairs=[("block", ...)]``).
            path = self.path_of_module(args[0])
            proxy.node.meta["regbn_region"] = "checkpoint"
            proxy.node.args[0].meta["regbn_region"] = "checkpoint"  # the module, not a tensor
            proxy.node.meta["regbn_output_of"] = [(path, self._call_counts[path])]
            self._call_counts[path] += 1
        return proxy

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
        node: fx.Node | None
        if isinstance(result, fx.Proxy):
            node = result.node
        else:
            # A tuple or dict of tensors: the last node inside the call stands for it.
            node = self._last_node()
            if node is None or node is last_before:
                return
        node.meta.setdefault("regbn_output_of", []).append(call)


def _split_leaf_modules(
    model: nn.Module, leaf_modules: Iterable[LeafSpec] | None
) -> tuple[tuple[type[nn.Module], ...], list[str]]:
    """``leaf_modules`` as (classes, dotted paths); an unknown path or other value refused."""
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
                raise RegBNValueError(
                    f"leaf_modules: {spec!r} is not a submodule of "
                    f"{type(model).__name__}{hint} Give dotted paths as in "
                    "model.named_modules(), or nn.Module classes."
                )
            paths.append(spec)
        else:
            raise RegBNTypeError(
                f"leaf_modules must hold nn.Module classes or dotted module paths (str); "
                f"got {spec!r} of type {type(spec).__name__}"
            )
    return tuple(classes), paths


@public(name="regbn.fx.trace")
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
    hold; ``effects``: the ``print``/``logging`` lines tracing ran, which the graph does not;
    ``auto_leaves``: the classes `trace_graph` made leaves, with why.
    """

    model: nn.Module
    graph: fx.Graph
    constants: dict[str, Any]
    effects: list[str] = field(default_factory=list)
    auto_leaves: list[str] = field(default_factory=list)

    def graph_module(self) -> fx.GraphModule:
        """The annotated ``GraphModule`` (the model itself where it is one already)."""
        if isinstance(self.model, fx.GraphModule) and self.graph is self.model.graph:
            return self.model
        targets = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                name = str(node.target)
                value = self.constants[name] if name in self.constants else None
                targets[name] = lookup(self.model, name) if value is None else value
        gm = fx.GraphModule(targets, self.graph, type(self.model).__name__)
        carry_missing_state(self.model, gm)
        return gm


def same_trace(traced: Traced, gm: fx.GraphModule) -> bool:
    """True when ``traced`` runs what ``gm`` runs: the same graph, and every tensor constant fx
    made while tracing equal to ``gm``'s (a constant may depend on ``self.training``)."""
    if not same_graph(traced.graph, gm.graph):
        return False
    for name, value in traced.constants.items():
        mine = lookup(gm, name)
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
    given: Sequence[str] | None = None,
    auto_leaves: bool = False,
) -> Traced:
    """`trace` without building the ``GraphModule`` (which compiles its code): the graph alone,
    e.g. to compare two traces. ``Traced.graph_module()`` finishes the job.

    ``given``: the forward arguments the example inputs hold, by name. A forward that takes
    ``**kwargs`` or is wrapped by a decorator (every transformers 5 model) is then traced
    through a root with exactly those arguments: the others keep their defaults, ``**kwargs``
    gets nothing. ``auto_leaves``: where tracing fails inside a submodule, that module's class
    becomes a leaf (every instance at once) and tracing starts again; `Traced.auto_leaves`
    says which and why.
    """
    if not isinstance(model, nn.Module):
        raise RegBNTypeError(f"expects an nn.Module; got {type(model).__name__}")
    model, _ = unwrap(model)
    if isinstance(model, fx.GraphModule):
        return Traced(model, model.graph, {})
    if is_patched(model):  # its graph of the current mode, as recorded (regions included)
        graph = fx.Graph()
        graph.output(graph.graph_copy(patched_graphs(model)[model.training], {}))
        return Traced(model, graph, {})
    if autowrap_functions is not None and not all(callable(f) for f in autowrap_functions):
        raise RegBNTypeError(
            "autowrap_functions must be a sequence of Python functions"
        )
    classes, paths = _split_leaf_modules(model, leaf_modules)
    made: list[str] = []
    while True:
        try:
            traced = _trace_once(model, classes, paths, autowrap_functions, concrete_args, given)
        except _Failed as failed:
            module = model.get_submodule(failed.stack[-1]) if failed.stack else None
            cls = type(module) if module is not None else None
            if (not auto_leaves or cls is None or cls in classes or len(made) >= _MAX_AUTO
                    or isinstance(failed.exc, RegionError)):
                if isinstance(failed.exc, RegionError):  # it says it all already
                    # Its own cause, not this loop's wrapper, is what `public` reports as original.
                    failed.exc.original = failed.exc.__cause__
                    raise failed.exc from None
                raise failed.error from failed.exc
            classes = (*classes, cls)
            reason = getattr(failed.error, "reason", None) or type(failed.exc).__name__
            location = getattr(failed.error, "location", None)
            made.append(f"{cls.__name__} (first at {failed.stack[-1]!r}: {reason}"
                        + (f"; {location}" if location else "") + ")")
            continue
        traced.auto_leaves = made
        return traced


class _Locals(dict):
    """The local variables of one forward call as it returned (filled by `_forward_locals`)."""


@contextlib.contextmanager
def _forward_locals(root: nn.Module) -> Iterator[_Locals]:
    """Record the locals of ``type(root).forward``'s frame when it returns: which proxy each
    of the user's variable names holds at the end. Skipped under a debugger or coverage tool,
    whose own trace function must stay the only one."""
    found = _Locals()
    forward = inspect.unwrap(type(root).forward)
    code = getattr(forward, "__code__", None)
    if code is None or sys.gettrace() is not None:
        yield found
        return

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "return":  # the outermost call returns last
            found.clear()
            found.update(frame.f_locals)
        return local

    def calls(frame: types.FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    sys.settrace(calls)
    try:
        yield found
    finally:
        sys.settrace(None)


def _name_variables(graph: fx.Graph, variables: dict[str, Any]) -> None:
    for name, value in variables.items():
        node = getattr(value, "node", None) if isinstance(value, fx.Proxy) else None
        if (
            node is None
            or node.graph is not graph
            or node.op == "placeholder"
            or name == "self"
            or name.startswith("_")
        ):
            continue
        node.meta.setdefault("regbn_variable", name)


_MAX_AUTO = 64


class _Failed(Exception):
    def __init__(self, exc: BaseException, error: BaseException, stack: tuple[str, ...]) -> None:
        super().__init__(str(error))
        self.exc, self.error, self.stack = exc, error, stack


def _trace_once(
    model: nn.Module,
    classes: tuple[type[nn.Module], ...],
    paths: list[str],
    autowrap_functions: Sequence[Callable[..., Any]] | None,
    concrete_args: dict[str, Any] | None,
    given: Sequence[str] | None,
) -> Traced:
    tracer = RegBNTracer(classes, paths, autowrap_functions or ())
    before = set(vars(model))
    root = model
    if given is not None and concrete_args is None and _needs_root(model, given):
        root = _root_with(model, list(given))
        tracer.traced_func_name = _ROOT_FORWARD
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
        if root is model:
            _name_placeholders(graph, model, concrete_args)
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError,
            NameError, KeyError, IndexError) as e:  # NameError: a module built inside forward
        if isinstance(e, TraceError):
            raise
        error = e if isinstance(e, RegionError) else trace_error(
            e, model, tracer.failed_module or ()
        )
        raise _Failed(e, error, tracer.failed_module or ()) from e
    finally:
        # fx stores tensors made while tracing (``_tensor_constant0``) on the model it traces;
        # they move to the result, and the caller's model stays as it was.
        constants = {name: vars(model)[name] for name in set(vars(model)) - before}
        for name in constants:
            delattr(model, name)
    return Traced(model, graph, constants, list(dict.fromkeys(tracer.effects)))


_ROOT_FORWARD = "_regbn_traced_forward"


def _needs_root(model: nn.Module, given: Sequence[str]) -> bool:
    """A forward fx cannot trace from its own signature: ``**kwargs``, or a decorator's
    ``(*args, **kwargs)`` wrapper (transformers 5 wraps every model's forward)."""
    forward = type(model).forward
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    wrapped = hasattr(forward, "__wrapped__")
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names_ok = all(n.isidentifier() and (n in params or var_kw) for n in given)
    return (wrapped or var_kw) and names_ok and len(set(given)) == len(given)


def _root_with(model: nn.Module, given: list[str]) -> nn.Module:
    """A view of ``model`` (same ``__dict__``, a throwaway subclass) whose traced method takes
    exactly ``given`` and calls the model's own forward with them by name."""
    args = ", ".join(given)
    call = ", ".join(f"{n}={n}" for n in given)
    namespace: dict[str, Any] = {"_forward": type(model).forward}
    exec(f"def {_ROOT_FORWARD}(self, {args}):\n    return _forward(self, {call})\n", namespace)
    base: type[nn.Module] = type(model)
    cls: type[nn.Module] = type(base.__name__, (base,), {_ROOT_FORWARD: namespace[_ROOT_FORWARD]})
    view = cast(nn.Module, cls.__new__(cls))
    object.__setattr__(view, "__dict__", model.__dict__)
    return view


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
            model = getattr(model, "_orig_mod")  # noqa: B009  (checked to be a Module above)
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


