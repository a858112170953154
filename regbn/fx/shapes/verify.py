"""Every insert verifies itself: the traced graph against the model, on the example batch.

`verify` runs the model and its traced graph (before any layer is spliced in) on the same inputs,
in training mode (forward and backward) and in eval mode (forward), and compares:

- the outputs: structure, dtypes, shapes and values;
- which parameters receive a gradient, and the gradients' values (training mode);
- which buffers change, and their new values (BatchNorm statistics, counters).

A difference is a `VerifyError` naming what differs, the first module whose output differs (or
the module owning the first parameter whose gradient differs) and how to proceed. It is how
regbn catches what tracing cannot see and no rule in `regbn.fx.regions` keeps: a Python branch
taken differently by the tracer than by a real tensor, an in-place update of Python state, a
custom context manager, a hook on a module that was traced through.

Each side runs from the same random-generator state (dropout draws alike) on its own copy of
every buffer; the model's buffers, its training flags, its ``.grad`` fields and the global random
state end exactly as they began. Each gradient is read as two sums (its sum and norm) the moment
backward accumulates it and freed at once (``.grad`` is put back afterwards), so the check holds
one side's outputs and these sums, never all gradients: less than one training step of the
model. The heap the first side freed is handed back to the OS before the second side runs.

With ``input_shapes`` (fake tensors, no data) only the structure is compared: output dtypes and
shapes, and which parameters receive a gradient. Values are skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...errors import RegBNValueError
from ..tracing.capture import input_name
from ..tracing.mode_graph import in_mode
from ..tracing.patched import output_spec
from .inputs import arrange_inputs, copy_containers, fake_inputs, split_inputs
from .propagate import (
    ShapeFailure,
    ShapeInterpreter,
    _model_device,
    _NodeFailed,
    _quiet_fake_mode,
    _rng_restored,
    _swapped,
    clear_shapes,
    copy_buffer,
    propagate_shapes,
)

__all__ = [
    "Run",
    "VerifyError",
    "check_forward",
    "python_state",
    "restore_python_state",
    "verify",
    "verify_training",
]

HOW = (
    "make the module where they part a leaf (leaf_modules=[...]) so that it runs as written, "
    "give concrete_args for an argument a branch reads, or pass verify=False to skip this check"
)


class VerifyError(RegBNValueError):
    """The traced graph does not compute what the model computes on the example inputs.

    ``differences``: what differs, one phrase each."""

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = differences or []


@dataclass
class Run:
    """What one side computed: flattened outputs, gradient sums and changed buffers."""

    outputs: list[tuple[str, Any]]
    output: Any  # `output_spec` of the output
    grads: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    buffers: dict[str, tuple[float, float]] = field(default_factory=dict)


def _flatten(value: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):
        return [x for k, v in value.items() for x in _flatten(v, f"{prefix}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _sums(t: torch.Tensor) -> tuple[float, float]:
    # torch's reductions sum blockwise: float32 sums hold ~1e-6 relative, far inside the
    # comparison's 1e-4, at a tenth of the cost of a float64 copy of every gradient
    d = t.detach()
    d = d if d.dtype in (torch.float32, torch.float64) else d.float()
    return float(d.sum()), float(d.norm())


def _loss(outputs: list[tuple[str, Any]]) -> torch.Tensor | None:
    terms = [
        v.float().sum()
        for _, v in outputs
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad
    ]
    return torch.stack(terms).sum() if terms else None


def _run(
    module: nn.Module,
    gm: fx.GraphModule,
    call: Any,
    training: bool,
    rng: Any,
    params: dict[str, nn.Parameter],
    fake: bool,
) -> Run:
    """One side: forward (and backward in training) on fresh copies of the buffers."""

    originals = {id(b): b for b in module.buffers()}
    names = {id(b): n for n, b in module.named_buffers()}
    with _swapped(copy_buffer, eager=module) as swap:
        swap.module(gm)  # tensors fx copied into the graph module get the same copies
        _set_rng(rng)
        out = call()
        outputs = _flatten(out)
        loss = _loss(outputs) if training else None
        wanted = {n: p for n, p in params.items() if p.requires_grad}
        grads: dict[str, tuple[float, float] | None] = dict.fromkeys(wanted)
        if loss is not None and wanted:
            _backward(loss, wanted, grads, fake)
        changed: dict[str, tuple[float, float]] = {}
        if not fake:
            for table, key, old in swap.saved:
                new = table[key]
                if id(old) in originals and not _equal_nan(new, old):
                    changed[names[id(old)]] = _sums(new)
        kept = [(k, v.detach() if isinstance(v, torch.Tensor) else v) for k, v in outputs]
    return Run(kept, output_spec(out), grads, changed)


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and
                    torch.equal(a.isnan(), b.isnan()))
    return bool(torch.equal(a, b))


_PLAIN = (int, float, bool, str, type(None))
_MODULE_OWN = frozenset(vars(nn.Module()))


def python_state(model: nn.Module) -> dict[tuple[str, str], Any]:
    """Every plain Python attribute (numbers, strings, flags) of every module, by (path, name):
    what a forward could update outside tensors (``self.calls += 1``)."""
    out = {}
    for path, mod in model.named_modules():
        for key, value in vars(mod).items():
            if key not in _MODULE_OWN and isinstance(value, _PLAIN):
                out[(path, key)] = value
    return out


def restore_python_state(model: nn.Module, saved: dict[tuple[str, str], Any]) -> None:
    """Put back the attributes of `python_state` (tracing and verification run the model's
    Python, which may update them)."""
    modules = dict(model.named_modules())
    for (path, key), value in saved.items():
        mod = modules.get(path)
        if mod is not None and vars(mod).get(key, value) is not value:
            object.__setattr__(mod, key, value)


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): the second side then
    starts from the model's footprint, not from the first side's high-water mark."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not Linux/glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _backward(
    loss: torch.Tensor,
    params: dict[str, nn.Parameter],
    grads: dict[str, tuple[float, float] | None],
    fake: bool,
) -> None:
    """Backward from ``loss``; each parameter's gradient becomes two sums in ``grads`` as soon
    as it is accumulated and is freed at once, so the check never holds all gradients (a
    training step does). Every ``.grad`` is put back as it was."""
    saved = {name: p.grad for name, p in params.items()}
    handles = []
    for name, p in params.items():
        p.grad = None

        def read(param: torch.Tensor, name: str = name) -> None:
            if param.grad is not None:
                grads[name] = (0.0, 0.0) if fake else _sums(param.grad)
            param.grad = None

        handles.append(p.register_post_accumulate_grad_hook(read))
    try:
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.grad = saved[name]


def _rng_state() -> Any:
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if (
        torch.cuda.is_available()
    ) else []
    return torch.get_rng_state(), cuda


def _set_rng(state: Any) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for i, s in enumerate(cuda):
        torch.cuda.set_rng_state(s, i)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return bool(torch.equal(a, b))
    # The same ops on the same inputs, but fx may call a different overload (x.view vs
    # torch.reshape): a few ulps of the dtype, relative to the tensor's scale.
    scale = float(a.detach().abs().max()) if a.numel() else 0.0
    tol = 64 * torch.finfo(a.dtype).eps * max(scale, 1.0)
    return bool(torch.allclose(a, b, rtol=0, atol=tol, equal_nan=True))


def _near(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(
        (x != x and y != y) or abs(x - y) <= 1e-4 * max(abs(x), abs(y), 1e-6)
        for x, y in zip(a, b, strict=True)
    )


def _differences(model_run: Run, graph_run: Run, fake: bool) -> list[str]:
    out: list[str] = []
    mine, theirs = dict(model_run.outputs), dict(graph_run.outputs)
    if list(mine) != list(theirs):
        out.append(f"the outputs differ in structure: the model returns {list(mine)}, the graph "
                   f"{list(theirs)}")
    for key in [k for k in mine if k in theirs]:
        a, b = mine[key], theirs[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape:
                out.append(f"{key}: the model gives {tuple(a.shape)} {a.dtype}, the graph "
                           f"{tuple(b.shape)} {b.dtype}")
            elif not fake and not _close(a, b):
                delta = float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
                out.append(f"{key}: values differ (max |difference| {delta:.3g})")
        elif isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            out.append(f"{key}: the model gives {type(a).__name__}, the graph {type(b).__name__}")
    only_model = [n for n, g in model_run.grads.items() if g is not None and
                  graph_run.grads.get(n) is None]
    only_graph = [n for n, g in graph_run.grads.items() if g is not None and
                  model_run.grads.get(n) is None]
    if only_graph:
        out.append(f"parameters that get a gradient from the graph but not from the model (a "
                   f"frozen part, e.g. under torch.no_grad): {_few(only_graph)}")
    if only_model:
        out.append(f"parameters that get a gradient from the model but not from the graph: "
                   f"{_few(only_model)}")
    if not fake:
        differ = [n for n, g in model_run.grads.items()
                  if g is not None and (h := graph_run.grads.get(n)) is not None
                  and not _near(g, h)]
        if differ:
            out.append(f"gradients differ for {_few(differ)}")
        a, b = model_run.buffers, graph_run.buffers
        moved = sorted(set(a) ^ set(b))
        moved += [n for n in a if n in b and not _near(a[n], b[n])]
        if moved:
            out.append(f"buffers change differently (running statistics, counters): "
                       f"{_few(moved)}")
    return out


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _owner(name: str) -> str:
    return name.rpartition(".")[0] or "(the model itself)"


def verify(
    model: nn.Module,
    graphs: dict[bool, fx.GraphModule],
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
) -> Any:
    """Check the traced model of each mode in ``graphs`` (``{True: training graph, False: eval
    graph}``, either may be left out) against ``model`` on the example inputs (see the module
    docstring). Returns the `output_spec` of the model's output in training mode (None when
    training mode is not checked); raises `VerifyError` where they differ."""
    fake = example_inputs is None
    output: Any = None
    with _rng_restored(model, example_inputs if example_inputs is not None else ()):
        for training in (True, False):
            if training in graphs:
                output = _verify_mode(
                    model, graphs[training], training, example_inputs, input_shapes,
                    input_dtypes, fake, output,
                )
    return output


def verify_training(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Any
) -> tuple[Any, ShapeFailure | None]:
    """The training-mode check whose graph side also propagates shapes into ``gm`` (as
    `propagate_shapes` does), so that a checked insert runs the graph once less. Returns the
    `output_spec` of the model's output and where shape propagation stopped (None when it did
    not); raises `VerifyError` where the graph and the model differ."""
    clear_shapes(gm)
    try:
        with _rng_restored(model, example_inputs):
            output = _verify_mode(model, gm, True, example_inputs, None, None, False,
                                  None, record_shapes=True)
    except _NodeFailed as e:  # the graph fails on the example: the analysis reports where
        return None, e.failure
    except VerifyError:
        raise
    except Exception as e:  # the model itself fails on the example: say where the graph does
        failure = propagate_shapes(gm, example_inputs)
        if failure is not None:
            return None, failure
        raise VerifyError(
            f"the model raises {type(e).__name__} ({e}) on the example inputs, but "
            f"its traced graph does not. {HOW[0].upper()}{HOW[1:]}",
            [f"the model raises {type(e).__name__}"],
        ) from e
    return output, None


def _verify_mode(
    model: nn.Module, gm: fx.GraphModule, training: bool, example_inputs: Any,
    input_shapes: Any, input_dtypes: Any, fake: bool, output: Any,
    backward: bool = True, record_shapes: bool = False,
) -> Any:
    with _sides(model, gm, example_inputs, input_shapes, input_dtypes,
                record_shapes) as (
        call_model,
        call_graph,
        params,
    ), in_mode(model, training):
        rng = _rng_state()
        with torch.enable_grad() if training else torch.no_grad():
            before = python_state(model)
            a = _run(model, gm, call_model, training and backward, rng, params, fake)
            updated = {k for k, v in python_state(model).items() if before.get(k, v) != v}
            restore_python_state(model, before)
            if training and backward:
                _release_memory()  # the model side's activations, before the graph side's
            b = _run(model, gm, call_graph, training and backward, rng, params, fake)
    if updated:
        names = [f"{path}.{key}" if path else key for path, key in sorted(updated)]
        first = sorted(updated)[0][0]
        leaf = (f"make the module that updates them a leaf (leaf_modules=[{first!r}])" if first
                else "move that update into a submodule made a leaf")
        raise VerifyError(
            f"the model's forward updates Python attributes outside tensors "
            f"({_few(names)}), which a traced graph cannot do: the patched model would leave "
            f"them as they are. To keep them, {leaf}, keep such state in a buffer, or pass "
            "verify=False to accept the difference",
            [f"forward updates {', '.join(names)}"],
        )
    output = a.output if training else output
    found = _differences(a, b, fake)
    if found:
        mode = "training" if training else "eval"
        where = _where(model, gm, a, b, found, example_inputs, training)
        raise VerifyError(
            f"the traced graph does not compute what the model computes on the "
            f"example inputs in {mode} mode, so the patched model would not be your model: "
            + "; ".join(found)
            + f". {where}To proceed: {HOW}",
            found,
        )
    return output


def check_forward(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Any
) -> list[str]:
    """The check of `regbn.inspect`, `find_fusions` and `measure_dependence`: one forward of the
    model and one of the graph in the model's current mode, outputs compared (no backward).
    Returns what differs (empty when nothing does)."""
    try:
        with _rng_restored(model, example_inputs):
            _verify_mode(model, gm, model.training, example_inputs, None, None, False,
                         None, backward=False)
    except VerifyError as e:
        return e.differences
    return []


@contextlib.contextmanager
def _sides(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Any, input_shapes: Any,
    input_dtypes: Any, record_shapes: bool = False,
) -> Iterator[tuple[Any, Any, dict[str, nn.Parameter]]]:
    """Two callables, the model and the graph on the same inputs, and the parameters they read
    (fake tensors for shapes: then the parameters are fake too)."""
    if example_inputs is not None:
        pos, named = split_inputs(example_inputs)
        args = arrange_inputs(gm, *split_inputs(copy_containers(example_inputs)))
        named = {**_fixed(model, gm, pos, named, args), **named}
        # forward, not __call__: the model's own hooks run on the patched model as they are
        graph = ShapeInterpreter(gm).run if record_shapes else gm
        yield (lambda: model.forward(*copy_containers(pos), **copy_containers(named)),
               lambda: graph(*copy_containers(args)), dict(model.named_parameters()))
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def to_fake(t: torch.Tensor, is_param: bool) -> torch.Tensor:
        fake = mode.from_tensor(t, static_shapes=True)
        return nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake

    device = _model_device(model)
    with _swapped(to_fake, eager=model) as swap, _quiet_fake_mode(), mode:
        swap.module(gm)  # the graph module's own references to the same tensors
        pos, kw = fake_inputs(gm, input_shapes, input_dtypes, device)
        args = arrange_inputs(gm, pos, kw)
        yield (lambda: _call_by_graph_order(model, gm, args), lambda: gm(*args),
               dict(model.named_parameters()))


def _fixed(
    model: nn.Module, gm: fx.GraphModule, pos: Any, named: Any, args: list[Any]
) -> dict[str, Any]:
    """The arguments the example leaves out but the graph fixed (``concrete_args``), by name."""

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    names = [input_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
    given = set(list(params)[: len(pos)]) | set(named)
    return {
        n: v
        for n, v in zip(names, args, strict=True)
        if n in params and n not in given and params[n].kind is not params[n].VAR_KEYWORD
    }


def _call_by_graph_order(model: nn.Module, gm: fx.GraphModule, args: list[Any]) -> Any:
    """Call ``model`` with the graph's placeholder values, by argument name."""

    names = [input_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
    return model.forward(**dict(zip(names, args, strict=True)))


def _where(
    model: nn.Module, gm: fx.GraphModule, a: Run, b: Run, found: list[str],
    example_inputs: Any, training: bool,
) -> str:
    """Where the two part: the first module (in graph order) whose output differs, else the
    module owning the first parameter whose gradient differs."""
    if example_inputs is not None:
        try:
            first = _first_module(model, gm, example_inputs, training)
        except Exception:  # locating is best effort; the differences were already found
            first = None
        if first is not None:
            return f"They first part at the output of module {first!r}{_line(model, first)}. "
    for name in list(a.grads) + list(b.grads):
        if (a.grads.get(name) is None) != (b.grads.get(name) is None):
            owner = _owner(name)
            return f"They part in module {owner!r}{_line(model, owner)}. "
    return ""


def _line(model: nn.Module, path: str) -> str:
    """Where the module's forward is written: ``(file.py:12, Tower.forward)``."""
    try:
        forward = inspect.unwrap(type(model.get_submodule(path)).forward)
        file = inspect.getsourcefile(forward)
        line = inspect.getsourcelines(forward)[1]
    except (AttributeError, OSError, TypeError):
        return ""
    return f" ({file}:{line}, {forward.__qualname__})"


def _first_module(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Any, training: bool
) -> str | None:
    """Run both sides once more, recording each module call's output, and compare in graph
    order (a second run only when the check failed)."""
    eager: dict[tuple[str, int], Any] = {}
    counts: dict[str, int] = {}
    handles = []
    for path, mod in model.named_modules():
        if not path:
            continue

        def hook(_m, _i, out, path=path):
            k = counts.get(path, 0)
            counts[path] = k + 1
            eager[(path, k)] = out

        handles.append(mod.register_forward_hook(hook))
    rng = _rng_state()
    try:
        with _sides(model, gm, example_inputs, None, None) as (call_model, _, _), \
                in_mode(model, training), torch.no_grad(), _swapped(copy_buffer, eager=model):
            _set_rng(rng)
            call_model()
    finally:
        for h in handles:
            h.remove()
    wanted = {node: calls for node in gm.graph.nodes
              if (calls := node.meta.get("regbn_output_of"))}
    traced: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n in wanted:
                traced[n] = value
            return value

    args = arrange_inputs(gm, *split_inputs(copy_containers(example_inputs)))
    with in_mode(model, training), torch.no_grad(), _swapped(copy_buffer, eager=model):
        _set_rng(rng)
        Recorder(gm).run(*args)
    for node, value in traced.items():
        for call in wanted[node]:
            if call in eager and not _same_value(eager[call], value):
                return call[0]
    return None


def _same_value(a: Any, b: Any) -> bool:
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        return False
    for (_, x), (_, y) in zip(fa, fb, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if not _close(x, y):
                return False
    return True
