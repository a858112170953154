"""Output shapes of standard layers without running them, for shape-only runs.

Norms, activations, convolutions and linear layers are most of a ResNet or ViT; on fake tensors,
`same_shape_output` gives their output from closed-form shapes instead of dispatching the op (and
converting the layer's weights), which makes shape propagation about five times faster. Only
exact ``torch.nn`` classes with one tensor argument qualify (a subclass may change shapes), and
anything unusual returns None: the layer then runs and raises where it should.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["same_shape_output"]

_SAME_SHAPE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def same_shape_output(mod: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of a shape-preserving module, checked but not computed; None to run it.

    Only for shape-only runs: exact classes (a subclass may change shapes), one tensor argument.
    Norms, activations, convolutions and linear layers are most of a ResNet or ViT; skipping their
    dispatch (and the conversion of their weights) makes shape propagation on fake tensors about
    five times faster. Anything unusual falls back to running the module.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    cls = type(mod)
    if cls in _SAME_SHAPE:
        return x
    if cls in _LAYER_SHAPES:
        shape = _LAYER_SHAPES[cls](mod, x)
        return None if shape is None else torch.empty(shape, dtype=x.dtype, device=x.device)
    if cls.__module__.startswith("torch.nn") and isinstance(mod, _NORMS):
        if isinstance(mod, nn.LayerNorm):
            ok = tuple(x.shape[-len(mod.normalized_shape) :]) == tuple(mod.normalized_shape)
        else:
            channels = mod.num_channels if isinstance(mod, nn.GroupNorm) else mod.num_features
            ok = x.dim() >= 2 and x.shape[1] == channels
        return x if ok and x.dtype.is_floating_point else None  # None: let the op raise
    return None


def _conv_shape(mod: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[int, ...] | None:
    k = len(mod.kernel_size)
    if (
        x.dim() != k + 2
        or x.shape[1] != mod.in_channels
        or mod.weight.dtype != x.dtype
        or isinstance(mod.padding, str)
        and mod.padding != "valid"
    ):
        return None  # unusual: let the real op decide (and raise where it should)
    padding = (0,) * k if isinstance(mod.padding, str) else mod.padding
    spatial = []
    for size, p, d, kk, st in zip(
        x.shape[2:], padding, mod.dilation, mod.kernel_size, mod.stride, strict=True
    ):
        out = (size + 2 * p - d * (kk - 1) - 1) // st + 1
        if out <= 0:
            return None
        spatial.append(out)
    return (x.shape[0], mod.out_channels, *spatial)


def _linear_shape(mod: nn.Linear, x: torch.Tensor) -> tuple[int, ...] | None:
    if x.dim() < 1 or x.shape[-1] != mod.in_features or mod.weight.dtype != x.dtype:
        return None
    return (*x.shape[:-1], mod.out_features)


# Exact classes only: a subclass may override forward. Convolutions and linear layers are most of
# the dispatches in a CNN or transformer; their output shapes are closed-form.
_LAYER_SHAPES: dict[type[nn.Module], Callable[[Any, torch.Tensor], tuple[int, ...] | None]] = {
    nn.Conv1d: _conv_shape,
    nn.Conv2d: _conv_shape,
    nn.Conv3d: _conv_shape,
    nn.Linear: _linear_shape,
}

