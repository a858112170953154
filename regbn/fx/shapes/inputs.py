"""The inputs of a shape run: the user's example inputs or shapes, lined up with ``forward``.

`arrange_inputs` puts positional and named inputs in the order of the traced graph's
placeholders (filling in the defaults of ``concrete_args``); `fake_inputs` turns
``input_shapes`` (with ``input_dtypes``) into tensors. A shape is ``(2, 3, 28, 28)``, a
``(shape, dtype)`` pair, or a dict/tuple of those for an argument that holds several tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError
from ..tracing.capture import input_name

__all__ = ["arrange_inputs", "copy_containers", "fake_inputs", "split_inputs"]


def copy_containers(value: Any) -> Any:
    """The caller's dicts and lists copied (tensors shared), so a forward that updates the dict
    it receives leaves the caller's example inputs as they were."""
    if type(value) is dict:
        return {k: copy_containers(v) for k, v in value.items()}
    if type(value) is list:
        return [copy_containers(v) for v in value]
    if type(value) is tuple:
        return tuple(copy_containers(v) for v in value)
    return value


def arrange_inputs(
    gm: fx.GraphModule, positional: Sequence[Any], named: Mapping[str, Any]
) -> list[Any]:
    """Line up user inputs with the graph's placeholders (fills in defaults of concrete_args)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [input_name(p) for p in phs]
    unknown = [k for k in named if k not in names]
    if unknown:
        raise RegBNValueError(
            f"inputs: unknown argument name(s) {unknown}; the model's forward takes "
            f"{names}"
        )
    if len(positional) > len(phs):
        raise RegBNValueError(
            f"inputs: got {len(positional)} positional inputs but the traced forward "
            f"takes {len(phs)} ({', '.join(names)}); pass one per argument, or a dict of keyword "
            "arguments"
        )
    values = []
    for i, (ph, name) in enumerate(zip(phs, names, strict=True)):
        if i < len(positional):
            values.append(positional[i])
        elif name in named:
            values.append(named[name])
        elif ph.args:
            values.append(ph.args[0])
        else:
            raise RegBNValueError(
                f"inputs: no value for argument {name!r}; the traced forward takes "
                f"{names}. Pass example_inputs/input_shapes for every argument"
            )
    return values


def split_inputs(inputs: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    """Inputs as (positional, named): a dict is by name, a tuple/list positional, else one."""
    if isinstance(inputs, Mapping):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}

def _model_float_dtype(gm: nn.Module) -> torch.dtype:
    # A float64 model gets float64 inputs unless told otherwise, as real inputs would be.
    for t in gm.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _parse_spec(
    spec: Any, dtype: torch.dtype | None, device: torch.device, path: str
) -> Any:
    """Turn one entry of input_shapes into a tensor (under fake mode) or a structure of them.

    ``dtype`` applies to shapes without their own; `fake_inputs` sets it to the model's.
    """
    if _is_shape(spec):
        if any(d < 0 for d in spec):
            raise RegBNValueError(f"input_shapes{path}: negative size in {tuple(spec)}")
        return torch.empty(tuple(spec), dtype=dtype, device=device)
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and isinstance(spec[1], (torch.dtype, str))
        and isinstance(spec[0], (tuple, list, torch.Size))
    ):
        own = _dtype(spec[1], path)
        return _parse_spec(spec[0], own, device, path)  # its own dtype wins
    if isinstance(spec, Mapping):
        return {
            k: _parse_spec(v, dtype, device, f"{path}[{k!r}]") for k, v in spec.items()
        }
    if isinstance(spec, (tuple, list)):
        return type(spec)(
            _parse_spec(v, dtype, device, f"{path}[{i}]") for i, v in enumerate(spec)
        )
    raise RegBNTypeError(
        f"input_shapes{path}: expected a shape such as (2, 3, 28, 28), a (shape, "
        f"dtype) pair, or a dict/tuple of those; got {spec!r}"
    )


def _dtype(value: Any, path: str) -> torch.dtype:
    """A dtype given as ``torch.int64`` or ``"int64"``."""
    if isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value), None)
    if not isinstance(dt, torch.dtype):
        raise RegBNValueError(
            f"input_shapes{path}: unknown dtype {value!r}; use e.g. 'int64'"
        )
    return dt


def _is_shape(spec: Any) -> bool:
    """True for a shape: a ``torch.Size`` or a tuple/list of ints."""
    return isinstance(spec, torch.Size) or (
        isinstance(spec, (tuple, list)) and all(isinstance(d, int) for d in spec)
    )


def _with_dtype(spec: Any, dtype: Any, path: str) -> Any:
    """``spec`` (an entry of input_shapes) with ``dtype`` (an entry of input_dtypes) applied: one
    dtype for a shape, or a dict/tuple of dtypes mirroring a dict/tuple of shapes (an entry
    left out or None keeps its default)."""
    if dtype is None:
        return spec
    if isinstance(dtype, Mapping) and isinstance(spec, Mapping):
        return {
            k: _with_dtype(v, dtype[k], f"{path}[{k!r}]") if k in dtype else v
            for k, v in spec.items()
        }
    if (
        isinstance(dtype, (tuple, list))
        and isinstance(spec, (tuple, list))
        and not _is_shape(spec)
        and len(dtype) == len(spec)
    ):
        pairs = enumerate(zip(spec, dtype, strict=True))
        return type(spec)(_with_dtype(v, d, f"{path}[{i}]") for i, (v, d) in pairs)
    if isinstance(dtype, (Mapping, tuple, list)):
        raise RegBNValueError(
            f"input_dtypes{path}: {dtype!r} does not mirror the input_shapes entry "
            f"{spec!r}; "
            "give one dtype per shape, e.g. {'input_ids': torch.int64} for a dict of shapes"
        )
    if _is_shape(spec):
        return (spec, _dtype(dtype, path))
    if isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], torch.dtype | str):
        return spec  # a (shape, dtype) pair: its own dtype wins
    # One dtype for every shape inside a dict/tuple entry.
    if isinstance(spec, Mapping):
        return {k: _with_dtype(v, dtype, f"{path}[{k!r}]") for k, v in spec.items()}
    if isinstance(spec, (tuple, list)):
        return type(spec)(
            _with_dtype(v, dtype, f"{path}[{i}]") for i, v in enumerate(spec)
        )
    return spec


def fake_inputs(
    gm: nn.Module, input_shapes: Any, input_dtypes: Any, device: torch.device
) -> tuple[Sequence[Any], Mapping]:
    """``input_shapes`` (with ``input_dtypes``) as empty tensors on ``device`` (under fake mode:
    no memory), positional and by name; a float shape gets the model's float dtype."""
    if _is_shape(input_shapes) and (isinstance(input_shapes, torch.Size) or input_shapes):
        input_shapes = [tuple(input_shapes)]  # one shape for a one-input model
    positional, named = split_inputs(input_shapes)
    if input_dtypes is not None:
        if isinstance(input_dtypes, Mapping):
            named = {
                k: _with_dtype(v, input_dtypes[k], f"[{k!r}]") if k in input_dtypes else v
                for k, v in named.items()
            }
        else:
            dts = list(input_dtypes)
            positional = [
                _with_dtype(s, dts[i], f"[{i}]") if i < len(dts) else s
                for i, s in enumerate(positional)
            ]
    default = _model_float_dtype(gm)
    pos = [_parse_spec(s, default, device, f"[{i}]") for i, s in enumerate(positional)]
    kw = {k: _parse_spec(s, default, device, f"[{k!r}]") for k, s in named.items()}
    return pos, kw

