"""Shape propagation into ``node.meta``.

After `propagate_shapes`, every node that ran carries one `ShapeRecord` under
``node.meta["regbn_tensor"]`` (`regbn.fx.shapes.record`): the shape (``tuple[int, ...]`` for a
tensor, None for anything else), dtype and device, and for a tuple, list or dict that holds
tensors the same structure with ``(shape, dtype)`` in place of each tensor.

Real inputs (``example_inputs``) run the model once under ``torch.no_grad``. The model's buffers are
swapped for copies during the run, so BatchNorm statistics, counters and any other buffer stay
exactly as they were, and training flags are never touched. Shapes (``input_shapes``) run under
``FakeTensorMode``: no activation memory, no compute, and models on ``torch.device("meta")`` work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..._format import format_shape, one_line
from ...errors import RegBNValueError, public
from .fast import same_shape_output
from .inputs import arrange_inputs, copy_containers, fake_inputs, split_inputs
from .record import KEY, ShapeRecord, set_record

__all__ = ["ShapeFailure", "ThawingInterpreter", "propagate_shapes", "clear_shapes"]

META_KEYS = (KEY,)


@dataclass(frozen=True)
class ShapeFailure:
    """Where shape propagation stopped: nodes before ``node_name`` keep their shapes."""

    node_name: str
    target: str
    input_shapes: tuple[Any, ...]
    message: str

    def __str__(self) -> str:
        shapes = ", ".join(format_shape(s) for s in self.input_shapes) or "no tensor inputs"
        return (
            f"shape propagation failed at node {self.node_name!r} ({self.target}) "
            f"with inputs [{shapes}]: {self.message}"
        )


class _NodeFailed(Exception):
    def __init__(self, failure: ShapeFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _describe(value: Any) -> tuple[Any, Any, Any, Any]:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape), value.dtype, value.device, None
    nested = _nested(value)
    return None, None, None, nested if _has_tensor(value) else None


def _nested(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape), value.dtype
    if isinstance(value, Mapping):
        return {k: _nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nested(v) for v in value]
    if isinstance(value, tuple):  # plain tuple also for namedtuples and torch.Size
        return tuple(_nested(v) for v in value)
    return None


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


class ThawingInterpreter(fx.Interpreter):
    """An ``fx.Interpreter`` that hands modules plain dicts and lists, as eager mode does."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # fx hands dicts and lists in as immutable_dict/immutable_list; a module that updates
        # the dict it receives (sentence-transformers' SentenceTransformer.forward) needs a
        # plain one, as it gets in eager mode.
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _thaw(args), _thaw(kwargs)


class ShapeInterpreter(ThawingInterpreter):
    """Runs the graph once and writes each node's shape into its meta.

    With ``swap`` (shape-only runs on fake tensors) each module's tensors are converted when it
    first runs, and shape-preserving standard modules are not dispatched at all.
    """

    def __init__(self, module: fx.GraphModule, swap: _StateSwap | None = None) -> None:
        super().__init__(module)
        self.swap = swap

    def call_module(self, target, args, kwargs):
        if self.swap is not None:
            mod = self.fetch_attr(target)
            out = same_shape_output(mod, args, kwargs)
            if out is not None:
                return out
            self.swap.module(mod)
        return super().call_module(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if self.swap is not None and isinstance(value, torch.Tensor):
            return self.swap.tensor(value, isinstance(value, nn.Parameter))
        return value

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except _NodeFailed:
            raise
        except Exception as e:  # any op error becomes a ShapeFailure naming the node
            args = [self.env[a] for a in n.all_input_nodes if a in self.env]
            shapes = tuple(_describe(a)[0] or _nested(a) for a in args)
            msg = _error_text(e)
            raise _NodeFailed(ShapeFailure(n.name, _target_name(n), shapes, msg)) from e
        shape, dtype, device, nested = _describe(result)
        set_record(n, ShapeRecord(shape, dtype, device, nested))
        return result



def _thaw(value: Any) -> Any:
    """fx's immutable dicts and lists as plain ones; everything else (a ModelOutput) as it is."""
    if isinstance(value, immutable_dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [_thaw(v) for v in value]
    if type(value) is tuple:
        return tuple(_thaw(v) for v in value)
    return value


_MAX_MESSAGE = 2000


def _error_text(e: BaseException) -> str:
    """The whole error message on one line (a long one cut at a sentence, and said so)."""
    text = one_line(e)
    if len(text) > _MAX_MESSAGE:
        cut = text.rfind(". ", 0, _MAX_MESSAGE)
        text = text[: cut + 1 if cut > 0 else _MAX_MESSAGE] + " (message shortened)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def clear_shapes(gm: fx.GraphModule) -> None:
    """Drop shape annotations, so a partial run never leaves stale shapes behind."""
    for node in gm.graph.nodes:
        for key in META_KEYS:
            node.meta.pop(key, None)


class _StateSwap:
    """Replaces parameters/buffers by ``make(tensor, is_param)``, module by module, on demand.

    Tied tensors stay tied. `restore` puts the originals back (call it in a ``finally``), so the
    caller's modules end exactly as they began. Swapping lazily means a module that never
    dispatches an op (see `_same_shape_output`) never pays for converting its tensors.
    """

    def __init__(self, make) -> None:
        self.make = make
        self.saved: list[tuple[dict, str, torch.Tensor]] = []
        self.memo: dict[int, torch.Tensor] = {}
        self.done: set[int] = set()

    def tensor(self, t: torch.Tensor, is_param: bool) -> torch.Tensor:
        if id(t) not in self.memo:
            self.memo[id(t)] = self.make(t, is_param)  # ids stay valid: the modules hold t
        return self.memo[id(t)]

    def module(self, root: nn.Module) -> None:
        for mod in root.modules():
            if id(mod) in self.done:
                continue
            self.done.add(id(mod))
            for kind in ("_parameters", "_buffers"):
                table = getattr(mod, kind)
                for name, t in list(table.items()):
                    if t is not None:
                        self.saved.append((table, name, t))
                        table[name] = self.tensor(t, kind == "_parameters")

    def restore(self) -> None:
        for table, name, t in reversed(self.saved):
            table[name] = t
        self.saved.clear()


@contextlib.contextmanager
def _swapped(make, eager: nn.Module | None = None) -> Iterator[_StateSwap]:
    swap = _StateSwap(make)
    try:
        if eager is not None:
            swap.module(eager)
        yield swap
    finally:
        swap.restore()


def _model_device(gm: nn.Module) -> torch.device:
    for t in gm.parameters():
        return t.device
    for b in gm.buffers():
        return b.device
    return torch.device("cpu")


@public(name="regbn.fx.propagate_shapes")
def propagate_shapes(
    gm: fx.GraphModule,
    example_inputs: Any = None,
    input_shapes: Any = None,
    input_dtypes: Any = None,
) -> ShapeFailure | None:
    """Annotate every node of ``gm`` with its output shape (see the module docstring).

    ``example_inputs``: real inputs, as a tuple of positional arguments, a dict of keyword
    arguments, or a single tensor; entries may themselves be dicts/tuples of tensors.
    ``input_shapes``: shapes instead, e.g. ``[(2, 1, 28, 28), ((2, 5), torch.int64)]``, or a dict
    by argument name; an entry may be a dict/tuple of shapes for an argument that holds several
    tensors. ``input_dtypes`` gives dtypes per entry (default: the dtype of the model's
    floating-point parameters, else torch's default dtype).

    Returns ``None`` on success, or a `ShapeFailure` naming the node where propagation stopped;
    nodes before it keep their shapes, nodes after it have none. The model is left unchanged.
    Bad inputs raise `RegBNValueError` or `RegBNTypeError`.
    """
    if (example_inputs is None) == (input_shapes is None):
        raise RegBNValueError(
            f"needs exactly one of example_inputs (real tensors) or input_shapes "
            f"(e.g. [(2, 1, 28, 28), (2, 3, 28, 28)]); got "
            f"{'both' if example_inputs is not None else 'neither'}"
        )
    clear_shapes(gm)
    if example_inputs is not None:
        positional, named = split_inputs(copy_containers(example_inputs))
        args = arrange_inputs(gm, positional, named)
        return _run_real(gm, args)
    return _run_fake(gm, input_shapes, input_dtypes)


def copy_buffer(t: torch.Tensor, is_param: bool) -> torch.Tensor:
    """A `_swapped` maker: buffers copied (a run may update them), parameters shared."""
    return t if is_param else t.clone()


def _run_real(gm: fx.GraphModule, args: list[Any]) -> ShapeFailure | None:
    # The run draws from the random generators where the model does (dropout, stochastic depth):
    # their states are restored, so a seeded run draws the same numbers with or without it.
    with torch.no_grad(), _swapped(copy_buffer, eager=gm), _rng_restored(gm, args):
        return _interpret(gm, args)


@contextlib.contextmanager
def _rng_restored(gm: nn.Module, args: Any) -> Iterator[None]:
    """Restore the CPU generator, and those of the CUDA devices the model or inputs are on."""
    tensors: list[torch.Tensor] = []
    fx.node.map_aggregate(args, lambda a: tensors.append(a) if isinstance(a, torch.Tensor) else a)
    devices = {t.device for t in (*tensors, *gm.parameters(), *gm.buffers())}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def _run_fake(
    gm: fx.GraphModule, input_shapes: Any, input_dtypes: Any
) -> ShapeFailure | None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = _model_device(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def to_fake(t: torch.Tensor, is_param: bool) -> torch.Tensor:
        # Stored bare (not re-wrapped in nn.Parameter): module attribute lookup does not care,
        # and wrapping costs more than the conversion itself on large models.
        return mode.from_tensor(t, static_shapes=True)

    with torch.no_grad(), _swapped(to_fake) as swap, _quiet_fake_mode(), mode:
        pos, kw = fake_inputs(gm, input_shapes, input_dtypes, device)
        args = arrange_inputs(gm, pos, kw)
        return _interpret(gm, args, swap=swap)


@contextlib.contextmanager
def _quiet_fake_mode() -> Iterator[None]:
    # FakeTensorMode logs a full traceback for every failing op; the ShapeFailure says it better.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _interpret(
    gm: fx.GraphModule, args: list[Any], swap: _StateSwap | None = None
) -> ShapeFailure | None:
    try:
        ShapeInterpreter(gm, swap).run(*args)
    except _NodeFailed as e:
        return e.failure
    return None
