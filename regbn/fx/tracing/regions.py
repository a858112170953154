"""What a model does outside the tensor operations fx records: grad-mode and autocast regions,
``torch.utils.checkpoint`` calls, hooks. Kept as graph nodes, or refused.

`recording_regions` is active while `regbn.fx.tracing.RegBNTracer` traces. It records:

- **Grad-mode regions** (``torch.no_grad``, ``torch.enable_grad``, ``torch.set_grad_enabled``,
  ``torch.inference_mode``; as context managers and as decorators) as nodes:
  ``ctx = torch.autograd.grad_mode.set_grad_enabled(mode)`` on entry, which sets the mode and
  remembers the previous one in ``ctx.prev``, and ``torch._C._set_grad_enabled(ctx.prev)`` on
  exit, which restores it. The patched model therefore nests in the caller's mode as the model
  does: a region's exit puts back whatever mode the caller had, never the mode seen while tracing.
  ``inference_mode`` is kept as a no-grad region (the same parameters get no gradient; its
  outputs are ordinary tensors instead of inference tensors).
- **Autocast regions** (``torch.autocast``, ``torch.amp.autocast`` and the device aliases) as
  ``ctx = torch.amp.autocast_mode._enter_autocast(device, dtype, enabled, cache)`` and
  ``_exit_autocast(ctx)``, the nodes torch.export's training graphs use.
- **Checkpoints**: ``torch.utils.checkpoint.checkpoint(module, *args, **kwargs)`` stays one
  call, with the module as a ``get_attr`` node, so the block is recomputed in backward as before.
  A checkpointed function that is not a module of the model is refused (`RegionError`).
- **Calls fx cannot trace into**: tensor factories given traced sizes (``torch.ones(b, n)``) and
  einops' functions become one ``call_function`` node each.

Every node written here carries ``node.meta["regbn_region"]`` (``"grad"``, ``"autocast"`` or
``"checkpoint"``). `barrier_edges` gives the ordering edges that keep every node inside the
region it was traced in when `regbn.fx.splice` re-orders a graph.

Hooks: `hooked` says whether a module has hooks that a traced-through call would skip; the
tracer keeps such a module as one call (a leaf), so its hooks run as before.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils.checkpoint as checkpoint_module
from torch import nn
from torch.amp import autocast_mode
from torch.autograd import grad_mode

from ...errors import RegBNValueError

__all__ = [
    "CHECKPOINT",
    "RegionError",
    "barrier_edges",
    "check_checkpoint",
    "einops_functions",
    "global_hooks",
    "hooked",
    "is_region_node",
    "recording_regions",
]

# The functions the recorded nodes call; captured before any patching.
GRAD_ENTER = grad_mode.set_grad_enabled
GRAD_EXIT = torch._C._set_grad_enabled
AUTOCAST_ENTER = autocast_mode._enter_autocast
AUTOCAST_EXIT = autocast_mode._exit_autocast
CHECKPOINT = checkpoint_module.checkpoint

for _fn in (GRAD_ENTER, GRAD_EXIT, AUTOCAST_ENTER, AUTOCAST_EXIT, CHECKPOINT):
    # Never dead-code eliminated: an exit node has no users, and a region is its two ends.
    fx.node.has_side_effect(_fn)

_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class RegionError(RegBNValueError):
    """A region of the model's code that the patched model could not keep as it is."""


def hooked(module: nn.Module) -> bool:
    """True when ``module`` has forward or backward hooks (they run only when it is called)."""
    return any(getattr(module, table, None) for table in _HOOK_TABLES)


def global_hooks() -> list[str]:
    """The kinds of global module hooks registered now (``register_module_forward_hook``...)."""
    from torch.nn.modules import module as module_mod

    tables = {
        "forward": "_global_forward_hooks",
        "forward pre": "_global_forward_pre_hooks",
        "backward": "_global_backward_hooks",
    }
    return [kind for kind, name in tables.items() if getattr(module_mod, name, None)]


def is_region_node(node: fx.Node) -> bool:
    """True for a node that enters or leaves a grad-mode or autocast region."""
    return node.meta.get("regbn_region") in ("grad", "autocast")


def _user_line() -> str:
    """The innermost line of the model's own code on the stack (not torch's, not regbn's)."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith((torch_dir, here)) and "contextlib" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "an unknown line"


class _Recorder:
    """The patched context managers' state while one tracer traces."""

    def __init__(self, tracer: fx.Tracer) -> None:
        self.tracer = tracer
        self.quiet = 0  # >0 inside a patched method: nested torch calls are not recorded again

    def node(self, kind: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = self.tracer.create_node("call_function", target, args, kwargs or {})
        node.meta["regbn_region"] = kind
        return node

    def grad_exit(self, enter: fx.Node) -> None:
        prev = self.tracer.create_node("call_function", getattr, (enter, "prev"), {})
        self.node("grad", GRAD_EXIT, (prev,))

    @contextlib.contextmanager
    def silent(self) -> Iterator[None]:
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1


def _grad_patches(rec: _Recorder) -> dict[tuple[Any, str], Any]:
    """Replacements for the grad-mode context managers' methods (owner, name) -> function."""
    original = {
        (cls, name): cls.__dict__[name]
        for cls in (grad_mode.no_grad, grad_mode.enable_grad, grad_mode.inference_mode)
        for name in ("__enter__", "__exit__")
    }
    sge_init = grad_mode.set_grad_enabled.__dict__["__init__"]
    sge_exit = grad_mode.set_grad_enabled.__dict__["__exit__"]

    def mode_of(ctx: Any) -> bool | None:
        if isinstance(ctx, grad_mode.no_grad):
            return False
        if isinstance(ctx, grad_mode.enable_grad):
            return True
        return False if ctx.mode else None  # inference_mode(False) leaves grad mode alone

    def enter(cls):
        def patched(self):
            mode = mode_of(self)
            if not rec.quiet and mode is not None:
                self._regbn_node = rec.node("grad", GRAD_ENTER, (mode,))
            with rec.silent():
                return original[(cls, "__enter__")](self)

        return patched

    def leave(cls):
        def patched(self, *exc):
            node = self.__dict__.pop("_regbn_node", None)
            if not rec.quiet and node is not None:
                rec.grad_exit(node)
            with rec.silent():
                return original[(cls, "__exit__")](self, *exc)

        return patched

    def sge_init_patched(self, mode):
        if not rec.quiet:
            self._regbn_node = rec.node("grad", GRAD_ENTER, (bool(mode),))
        with rec.silent():
            sge_init(self, mode)

    def sge_exit_patched(self, *exc):
        node = self.__dict__.pop("_regbn_node", None)
        if not rec.quiet and node is not None:
            rec.grad_exit(node)
        with rec.silent():
            return sge_exit(self, *exc)

    patches: dict[tuple[Any, str], Any] = {}
    for cls, name in original:
        patches[(cls, name)] = enter(cls) if name == "__enter__" else leave(cls)
    patches[(grad_mode.set_grad_enabled, "__init__")] = sge_init_patched
    patches[(grad_mode.set_grad_enabled, "__exit__")] = sge_exit_patched
    return patches


def _autocast_patches(rec: _Recorder) -> dict[tuple[Any, str], Any]:
    cls = autocast_mode.autocast

    def enter(self):
        # No real state changes: nothing computes while tracing.
        args = (self.device, self.fast_dtype, self._enabled, self._cache_enabled)
        self._regbn_node = rec.node("autocast", AUTOCAST_ENTER, args)
        return self

    def leave(self, *exc):
        node = self.__dict__.pop("_regbn_node", None)
        if node is not None:
            rec.node("autocast", AUTOCAST_EXIT, (node,))
        return False

    return {
        (cls, "__enter__"): enter,
        (cls, "__exit__"): leave,
    }


def check_checkpoint(tracer: fx.Tracer, fn: Any) -> None:
    """Refuse a checkpointed function that is not a submodule of the traced model."""
    if not isinstance(fn, nn.Module) or not any(fn is m for m in tracer.root.modules()):
        what = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise RegionError(
            f"torch.utils.checkpoint.checkpoint of {what!r} at {_user_line()}: only a checkpoint "
            "of a submodule (checkpoint(self.block, x, ...)) can be kept as a checkpoint in the "
            "patched model. Checkpoint a submodule there, or make the module that calls "
            "checkpoint a leaf (leaf_modules=[...]) so it runs as written"
        )


def _checkpoint_patches(rec: _Recorder) -> dict[tuple[Any, str], Any]:
    # The tracer's create_proxy checks the function and marks the node (fx's autowrap of a
    # global ``checkpoint`` name reaches create_proxy too).
    def patched(function, *args, **kwargs):
        return rec.tracer.create_proxy("call_function", CHECKPOINT, (function, *args), kwargs)

    return {(checkpoint_module, "checkpoint"): patched}


_MISSING = object()


# Tensor factories take sizes, not tensors, so a size read from a traced tensor (``x.shape[0]``)
# reaches them as a Proxy that torch's argument parser refuses; with one, they become nodes.
_FACTORIES = (
    "ones", "zeros", "empty", "full", "arange", "rand", "randn", "randint", "eye", "linspace",
    "ones_like", "zeros_like", "full_like", "tensor", "as_tensor",
)  # fmt: skip


def _leaf_function_patches(rec: _Recorder, owner: Any, names: Iterable[str]) -> dict:
    """``owner.name(...)`` called with a traced value becomes one ``call_function`` node."""

    def wrap(real: Any) -> Any:
        def leaf(*args: Any, **kwargs: Any) -> Any:
            found: list[fx.Proxy] = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a)
                                  if isinstance(a, fx.Proxy) else a)
            if not found:
                return real(*args, **kwargs)
            return rec.tracer.create_proxy("call_function", real, args, kwargs)

        return leaf

    return {(owner, name): wrap(getattr(owner, name)) for name in names if hasattr(owner, name)}


def einops_functions() -> list[Any]:
    """einops' functions (``rearrange``, ``reduce``, ``repeat``, ``einsum``, ``pack``,
    ``unpack``) where einops is importable: traced as one call each, for their Python reads
    shapes as integers."""
    try:
        import einops
    except ImportError:
        return []
    return [getattr(einops, n) for n in _EINOPS if hasattr(einops, n)]


_EINOPS = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack")


def einops_layers() -> tuple[type[nn.Module], ...]:
    """einops' layers (``Rearrange``, ``Reduce``, ``EinMix``) where einops is importable: leaf
    modules, for the same reason as `einops_functions`."""
    try:
        from einops.layers import torch as layers
    except ImportError:
        return ()
    names = ("Rearrange", "Reduce", "EinMix")
    return tuple(getattr(layers, n) for n in names if hasattr(layers, n))


def _output_patches(effects: list[str]) -> dict[tuple[Any, str], Any]:
    """``print`` and ``logging`` still run while tracing; their lines are noted in
    ``effects``: the patched model does not run them again (fx records tensor ops only)."""
    real_print, real_log = builtins.print, logging.Logger._log

    def printing(*args, **kwargs):
        effects.append(f"print at {_user_line()}")
        return real_print(*args, **kwargs)

    def log(self, *args, **kwargs):
        effects.append(f"logging at {_user_line()}")
        return real_log(self, *args, **kwargs)

    return {(builtins, "print"): printing, (logging.Logger, "_log"): log}


@contextlib.contextmanager
def recording_regions(tracer: fx.Tracer, effects: list[str] | None = None) -> Iterator[None]:
    """While active, grad-mode and autocast regions and checkpoint calls become graph nodes of
    ``tracer`` (see the module docstring); ``print``/``logging`` lines go to ``effects``."""
    rec = _Recorder(tracer)
    patches = {**_grad_patches(rec), **_autocast_patches(rec), **_checkpoint_patches(rec),
               **_leaf_function_patches(rec, torch, _FACTORIES)}
    if einops_functions():
        import einops

        patches.update(_leaf_function_patches(rec, einops, _EINOPS))
    if effects is not None:
        patches.update(_output_patches(effects))
    saved = []
    try:
        for (owner, name), fn in patches.items():
            saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)



def barrier_edges(nodes: list[fx.Node]) -> list[tuple[str, str]]:
    """Ordering edges (node names) that keep every node between the region nodes it was traced
    between: each region node follows every node before it and precedes every node after it,
    written as a chain through the region nodes (O(n) edges)."""
    edges: list[tuple[str, str]] = []
    last_barrier: fx.Node | None = None
    since: list[fx.Node] = []
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_region_node(node):
            for n in since:
                edges.append((n.name, node.name))
            if last_barrier is not None:
                edges.append((last_barrier.name, node.name))
            last_barrier, since = node, []
        else:
            if last_barrier is not None:
                edges.append((last_barrier.name, node.name))
            since.append(node)
    return edges

