"""The refusals of the RegBN layer: its options, its inputs and a training batch's solution.

Each check raises :class:`regbn.RegBNValueError` or :class:`regbn.RegBNTypeError` with a message
that starts with ``RegBN:`` and says the rule, the value received and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._format import shape_str
from ._norms import PROJECTIONS
from ._spectrum import LAMBDA_RULES
from .errors import RegBNTypeError, RegBNValueError

__all__ = [
    "as_shape",
    "autocast_enabled",
    "check_finite",
    "check_inputs",
    "check_options",
    "check_projection_size",
    "check_training_batch",
    "functorch_active",
    "host_reads",
    "is_symbolic",
    "solve_failed",
]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_range(name: str, value, lo: float, hi: float, text: str, why: str) -> None:
    """``momentum`` lies in (0, 1], ``sigma_THR`` in [0, 1)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (lo < value <= hi) if text.startswith("(") else (lo <= value < hi)
    if not ok:
        raise RegBNValueError(
            f"RegBN: {name} must be a number in {text} ({why}); got {value!r}. "
            f"The official defaults are momentum=0.02 and sigma_THR=0.0"
        )


def check_options(
    beta1: float,
    beta2: float,
    momentum: float,
    sigma_THR: float,
    sigma_MIN: float,
    lambda_rule: str,
    projection: str,
) -> None:
    """The constructor's numeric and named options (the shapes are checked by :func:`as_shape`)."""
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise RegBNValueError(f"RegBN: {name} must be in [0, 1); got {value!r}")
    _check_range("momentum", momentum, 0.0, 1.0, "(0, 1]", "the running W would overshoot")
    _check_range("sigma_THR", sigma_THR, 0.0, 1.0, "[0, 1)", "it is a fraction of max(s)")
    if not (_is_number(sigma_MIN) and math.isfinite(sigma_MIN) and sigma_MIN >= 0):
        raise RegBNValueError(f"RegBN: sigma_MIN must be a finite number >= 0; got {sigma_MIN!r}")
    if lambda_rule not in LAMBDA_RULES:
        raise RegBNValueError(
            f"RegBN: lambda_rule must be one of {LAMBDA_RULES}; got {lambda_rule!r}. "
            "'paper' enforces ||W||_F = 1; 'official' reproduces the published code"
        )
    if projection not in PROJECTIONS:
        raise RegBNValueError(
            f"RegBN: projection must be one of {PROJECTIONS}; got {projection!r}. 'full' is "
            "the paper's W over the flattened features; 'channel' shares one Cg×Cf W over "
            "the spatial positions of f and g (same spatial size)"
        )


def as_shape(which: str, channels, layer_dim) -> tuple[int, ...]:
    """(C, *spatial) from the constructor's ``{which}_num_channels`` and ``{which}_layer_dim``."""
    dims = [] if layer_dim is None else list(layer_dim)
    shape = (channels, *dims)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise RegBNValueError(
            f"RegBN: {which}_num_channels and {which}_layer_dim must be positive ints; got "
            f"{which}_num_channels={channels!r}, {which}_layer_dim={layer_dim!r}"
        )
    return tuple(shape)


def check_projection_size(
    f_shape: tuple[int, ...],
    g_shape: tuple[int, ...],
    projection: str,
    w_shape: tuple[int, int],
    itemsize: int,
    max_bytes: int,
) -> None:
    """W (``w_shape``, (Dg, Df)) fits ``max_projection_bytes``; 'channel' needs one spatial size."""
    if projection == "channel" and tuple(f_shape[1:]) != tuple(g_shape[1:]):
        raise RegBNValueError(
            f"RegBN: projection='channel' shares one Cg×Cf W over spatial positions, so f "
            f"and g need the same spatial size; got f {shape_str(f_shape)} and g "
            f"{shape_str(g_shape)} (channels first). Resize or pool one of them, or use "
            f"projection='full'"
        )
    dg, df = w_shape
    nbytes = df * dg * itemsize
    if nbytes > max_bytes:
        raise RegBNValueError(
            f"RegBN: the projection W would be Dg×Df = {dg}×{df} ({nbytes / 2**20:.1f} MiB), "
            f"more than max_projection_bytes={max_bytes} "
            f"({max_bytes / 2**20:.1f} MiB). Normalise a smaller tensor, such "
            f"as a pooled one (g {shape_str(g_shape)}, f {shape_str(f_shape)} now), or "
            f"raise max_projection_bytes"
        )


def check_inputs(
    f: Tensor,
    g: Tensor,
    f_shape: Sequence[int] | None,
    g_shape: Sequence[int] | None,
    device: torch.device,
) -> None:
    """f and g are floating-point (B, C, *spatial) tensors of the declared shapes, on ``device``."""
    for name, x in (("f", f), ("g", g)):
        if not isinstance(x, Tensor):
            raise RegBNTypeError(f"RegBN: {name} must be a torch.Tensor; got {type(x).__name__}")
        if not (x.is_floating_point()):
            raise RegBNTypeError(
                f"RegBN: {name} must be a floating-point tensor; got dtype {x.dtype}. "
                f"Convert it with {name}.float()"
            )
        if x.dim() < 2:
            raise RegBNValueError(
                f"RegBN: {name} must be (B, C, *spatial) with a batch dim; got shape "
                f"{shape_str(x.shape)}. Add the batch dim, e.g. {name}.unsqueeze(0)"
            )
    if f.shape[0] != g.shape[0]:
        raise RegBNValueError(
            f"RegBN: f and g must hold the same samples, so their batch sizes (dim 0) must "
            f"match; got f {shape_str(f.shape)} and g {shape_str(g.shape)}"
        )
    for name, x, declared in (("f", f, f_shape), ("g", g, g_shape)):
        if declared is not None and tuple(x.shape[1:]) != declared:
            raise RegBNValueError(
                f"RegBN: {name} must have shape (B, {', '.join(map(str, declared))}) as "
                f"declared by {name}_num_channels/{name}_layer_dim; got "
                f"{shape_str(x.shape)}. Pass the declared shape or build the layer for this "
                f"one"
            )
    if (f.device != device or g.device != device) and not (is_symbolic(f) or is_symbolic(g)):
        raise RegBNValueError(
            f"RegBN: f ({f.device}) and g ({g.device}) must be on the layer's device "
            f"({device}); move the layer with layer.to(device)"
        )


def check_batch_size(f: Tensor) -> None:
    """A training batch needs two samples (no read of the data)."""
    if f.shape[0] < 2:
        raise RegBNValueError(
            "RegBN: a training batch needs at least 2 samples to estimate the projection; "
            f"got a batch of {f.shape[0]}. Use a larger batch, or call layer.eval() for "
            "single-sample inference"
        )


def check_training_batch(f: Tensor, g: Tensor) -> None:
    """A training batch (the global one, when synchronised) must allow a solve."""
    check_batch_size(f)
    # A NaN or Inf anywhere reaches the sum; only then pay for the element-wise test.
    if bool(torch.isfinite(f.sum() + g.sum())):
        return
    for name, x in (("f", f), ("g", g)):
        if not bool(torch.isfinite(x).all()):
            raise RegBNValueError(
                f"RegBN: training input {name} holds non-finite values (NaN or Inf); the "
                f"batch was rejected and no buffer changed. Check the upstream layers or "
                f"the data"
            )


def check_finite(outs: list[Tensor], f: Tensor, g: Tensor, normalize_input: bool) -> None:
    """One reduction and one sync on success: a NaN or Inf anywhere in ``outs`` (the
    solution, the outputs, the updated input-norm statistics) makes their sum non-finite.
    The sum runs in each tensor's own precision (float32 at least), so no copy is made; only
    when it is not finite, which a sum of huge finite entries can also be, is every entry
    tested. f and g only serve the message."""
    total = sum(x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x in outs)
    if not math.isfinite(float(total)) and not all(
        bool(torch.isfinite(x.detach()).all()) for x in outs
    ):
        hint = "" if normalize_input else " or set normalize_input=True"
        raise RegBNValueError(
            f"RegBN: the batch solution is not finite although the inputs are (f spans "
            f"|x| ≤ {float(f.abs().max()):.3g}, g spans |x| ≤ {float(g.abs().max()):.3g}): "
            f"the solve, the norms or the input-norm running statistics overflowed. The "
            f"batch was rejected and no buffer changed. Rescale the inputs{hint}"
        )


def solve_failed(f: Tensor, g: Tensor, normalize_input: bool) -> RegBNValueError:
    """The error for finite inputs whose scale overflows the solve (eigh cannot decompose the
    Gram, as for float64 features of size 1e200)."""
    hint = "" if normalize_input else " or set normalize_input=True"
    return RegBNValueError(
        f"RegBN: the inputs' scale overflows the solve (f spans |x| ≤ "
        f"{float(f.detach().abs().max()):.3g}, g spans |x| ≤ "
        f"{float(g.detach().abs().max()):.3g}; the Gram matrix GGᵀ of g is not finite, so no "
        f"λ⁺ exists for this batch). The batch was rejected and no buffer changed. Rescale the "
        f"inputs{hint}"
    )


def is_symbolic(x: Tensor) -> bool:
    """A fake or meta tensor: shapes and dtypes only, no values."""
    # A plain tensor is never fake; skip the subclass inspection on the hot path.
    return x.device.type == "meta" or (type(x) is not Tensor and is_fake(x))


def functorch_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def host_reads(x: Tensor) -> bool:
    """Whether a call on ``x`` may read values on the host: a plain CPU tensor in eager mode
    (not under compile, jit.trace, torch.func, or a dispatch mode such as make_fx's tracing or
    FakeTensorMode), where a read waits for nothing."""
    return (
        type(x) is Tensor
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not functorch_active()
        and _get_current_dispatch_mode() is None
    )


def autocast_enabled(device_type: str) -> bool:
    if device_type == "meta":
        return False  # no autocast on meta tensors (shape-only runs)
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _sum(x: Tensor) -> Tensor:
    """x's sum in its own precision (float32 at least): non-finite when an entry is."""
    return x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)).reshape(1)


def guard_values(
    f: Tensor, g: Tensor, stats: list[Tensor], out_norms: list[nn.LayerNorm], w_max: Tensor
) -> Tensor:
    """What the checks read, as device values that the solve reads once with the spectrum:
    the sum of f, g and the input-norm statistics (non-finite when an entry is), a bound on
    each output LayerNorm's values (√D·max|w| + max|b|) and ``w_max``, one on max|W|."""
    total = torch.cat([_sum(f) + _sum(g), *(_sum(s) for s in stats)]).sum().reshape(1)
    outs = []
    for norm in out_norms:
        size = math.sqrt(math.prod(norm.normalized_shape))
        bound = torch.full((1,), size, dtype=total.dtype, device=total.device)
        if norm.weight is not None:
            bound = bound * norm.weight.detach().abs().amax().to(total.dtype)
        if norm.bias is not None:
            bound = bound + norm.bias.detach().abs().amax().to(total.dtype)
        outs.append(bound)
    return torch.cat([total, *outs, w_max.to(total.dtype).reshape(1)])


def proven_finite(bound: float, guard, dtype: torch.dtype) -> bool:
    """Whether the host bounds show that f_r, W_batch, D = W_batch − W, the outputs and the
    running update stay finite, so that no output need be tested: ``bound`` on f_r and W_batch
    (:func:`regbn._spectrum.bound_of_fast_path`, inf where the path gives none) and the
    guard's bounds on the output norms and on max|W| (:func:`guard_values`), all a 2¹⁰
    margin below the largest value of ``dtype`` (W's)."""
    if guard is None or not math.isfinite(bound):
        return False
    lim = torch.finfo(dtype).max * 2.0**-10
    *outs, w_max = guard[1:]
    return bound + float(w_max) <= lim and all(float(b) <= lim for b in outs)
