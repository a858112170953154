"""RegBN's norms and its eval maths as plain functions (RegBN, NeurIPS 2023).

The same functions serve the layer, the fx graph that :func:`regbn.fold` writes (where the
tensors are fx Proxies) and every exporter; :class:`regbn.RegBN` holds the norm modules and
their buffers and calls these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .errors import RegBNValueError

__all__ = [
    "PROJECTIONS",
    "NormSpec",
    "apply_spec",
    "as_rows",
    "eval_maths",
    "from_rows",
    "input_norm",
    "layer_norm",
    "norm_spec",
    "output_norm",
    "run_norm",
]

def input_norm(enabled: bool, channels: int, spatial: list[int], affine: bool) -> nn.Module:
    """BatchNorm{k}d over channels for k ≥ 2 spatial dims, else LayerNorm over [C, *spatial]."""
    if not enabled:
        return nn.Identity()
    if len(spatial) >= 2:
        if len(spatial) > 3:
            raise RegBNValueError(
                f"RegBN: normalize_input=True supports at most 3 spatial dims (BatchNorm3d); got "
                f"{len(spatial)} ({spatial}). Reshape the tensor or set normalize_input=False"
            )
        return getattr(nn, f"BatchNorm{len(spatial)}d")(channels, affine=affine)
    return nn.LayerNorm([channels, *spatial], elementwise_affine=affine)


def output_norm(enabled: bool, channels: int, spatial: list[int], affine: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return nn.LayerNorm([channels, *spatial], elementwise_affine=affine)


# ---------------------------------------------------------------------- the eval maths, functional
# A norm as plain tensors, so that the same function serves the layer, the fx graph that
# regbn.fold writes (where the tensors are fx Proxies) and every exporter:
#   ("layer", shape, weight, bias, eps)              LayerNorm over the last dims, of sizes shape
#   ("batch", running_mean, running_var, weight, bias, eps)   BatchNorm with running statistics
NormSpec = tuple | None

PROJECTIONS = ("full", "channel")


# max|x| is brought down to 2**k before the LayerNorm when larger: (x/t)² then sums without
# overflow over any realistic D (2**(2k) · 2**30 below the dtype's max), and a non-constant
# sample keeps a variance of at least the float spacing there squared over D (2**32/D in
# float32, 2**854/D in float64), so that ε/σ² stays below round-off for D up to 10⁷: an
# unscaled ε is exact to round-off.
_RESCALE_EXP = {torch.float64: 480}
_RESCALE_EXP_DEFAULT = 40  # float32 and narrower


def layer_norm(
    x: Tensor,
    shape: Sequence[int],
    weight,
    bias,
    eps: float,
    dtype: torch.dtype | None = None,
    host: bool = False,
) -> Tensor:
    """LayerNorm over the last dims, of sizes ``shape`` (as nn.LayerNorm), safe from overflow.

    (x − μ)/√(σ² + ε) equals (x' − μ')/√(σ'² + ε/t²) for x' = x/t. With t = max(1, max|x|·2⁻ᵏ)
    per sample (k = 40 in float32, 480 in float64: ``_RESCALE_EXP``) t is 1 for any sample
    within 2ᵏ, which is then the plain torch LayerNorm, bit for bit; a larger finite sample
    (1e20 in float32, whose σ² overflows) is brought within 2ᵏ and gives a finite output. There
    ε is left unscaled: σ'² is at least the square of the float grid's spacing at 2ᵏ, so ε/σ'²
    lies below the dtype's round-off. t is a constant for autograd: the result does not depend
    on it, so the gradient is exact. ``dtype``: x's (given where x is an fx Proxy).

    ``host``: the caller found that x may be read on the host (a plain CPU tensor in eager
    mode, no device to wait for: :func:`regbn._checks.host_reads`); max|x| is read and, when
    every sample is within 2ᵏ, the plain LayerNorm runs alone, the same numbers with six ops
    fewer (eval at small shapes is bound by the number of ops). Elsewhere (CUDA, compile,
    export, fold's graph, fake tensors, torch.func, dispatch modes) the rescaled form runs.
    """
    k = _RESCALE_EXP.get(x.dtype if dtype is None else dtype, _RESCALE_EXP_DEFAULT)
    if host and _within(x, 2.0**k):
        return TF.layer_norm(x, list(shape), weight, bias, eps)  # what t = 1 computes below
    dims = tuple(range(-len(shape), 0))
    # max|x| as max(max x, −min x): no temporary the size of x, and two vectorised
    # reductions (several times faster on the CPU than vector_norm(x, inf) or aminmax).
    xd = x.detach()
    t = torch.maximum(xd.amax(dim=dims, keepdim=True), -xd.amin(dim=dims, keepdim=True))
    t = (t * 2.0**-k).clamp_min(1.0)
    return TF.layer_norm(x / t, list(shape), weight, bias, eps)


def _within(x: Tensor, limit: float) -> bool:
    """max|x| ≤ limit, read on the host (the caller checked `regbn._checks.host_reads`)."""
    if type(x) is not Tensor or x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x.detach() if x.requires_grad else x)
    return max(float(hi), -float(lo)) <= limit  # False for NaN: the rescaled form then runs


def apply_spec(spec: NormSpec, x: Tensor, dtype: torch.dtype, host: bool = False) -> Tensor:
    """One norm in eval form, its tensors cast to the compute ``dtype`` (``host``: see
    :func:`layer_norm`)."""
    if spec is None:
        return x
    def cast(t):  # a tensor already in dtype as it is; an fx Proxy is always cast
        return t if t is None or (isinstance(t, Tensor) and t.dtype == dtype) else t.to(dtype)

    if spec[0] == "layer":
        _, shape, weight, bias, eps = spec
        return layer_norm(x, shape, cast(weight), cast(bias), eps, dtype, host)
    _, mean, var, weight, bias, eps = spec
    return TF.batch_norm(x, cast(mean), cast(var), cast(weight), cast(bias), False, 0.0, eps)


def norm_spec(norm: nn.Module) -> NormSpec:
    """The eval-mode :data:`NormSpec` of one of RegBN's norm modules."""
    if isinstance(norm, nn.LayerNorm):
        return ("layer", tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return ("batch", norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    return None


def eval_maths(
    f: Tensor,
    g: Tensor,
    W: Tensor,
    norms: Sequence[NormSpec],
    f_shape: Sequence[int],
    g_shape: Sequence[int],
    dtype: torch.dtype,
    projection: str = "full",
    host: bool = False,
) -> tuple[Tensor, Tensor]:
    """RegBN in eval mode as plain torch ops: ``f_r = F − G·W`` between the norms.

    Args:
        f: (B, *f_shape); g: (B, *g_shape); W: (Dg, Df), the running projection; (Cg, Cf) for
            ``projection="channel"``, applied at every spatial position.
        norms: the specs of (norm_f, norm_g, norm_f_out, norm_g_out), see :func:`norm_spec`.
        dtype: the compute dtype (float32 or float64); inputs, W and the norms' tensors are cast
            to it, the outputs stay in it.
        projection: ``"full"`` or ``"channel"``, as the layer's.
        host: the layer's eager call: a LayerNorm may read its input's scale on the host (see
            :func:`layer_norm`); the graphs of fold and the exporters leave it False.

    Sizes come from ``f_shape``/``g_shape``, never from data, so the graph exports with a
    symbolic batch size, and an empty batch gives empty outputs.
    """
    nf, ng, nfo, ngo = norms
    f = apply_spec(nf, f.to(dtype), dtype, host)
    g = apply_spec(ng, g.to(dtype), dtype, host)
    channel = projection == "channel"
    f_r = torch.addmm(
        as_rows(f, f_shape, channel), as_rows(g, g_shape, channel), W.to(dtype), alpha=-1
    )
    f_r = from_rows(f_r, f_shape, channel)
    return apply_spec(nfo, f_r, dtype, host), apply_spec(ngo, g, dtype, host)


def as_rows(x: Tensor, shape: Sequence[int], channel: bool) -> Tensor:
    """x (B, *shape) as the rows the projection acts on: (B, prod(shape)), or with
    ``channel`` one row of C channels per sample and spatial position, (B·prod(spatial), C)."""
    if not channel or len(shape) == 1:
        return x.reshape(-1, math.prod(shape))
    return x.movedim(1, -1).reshape(-1, shape[0])


def from_rows(rows: Tensor, shape: Sequence[int], channel: bool) -> Tensor:
    """The inverse of :func:`as_rows`: (B, *shape), contiguous."""
    if not channel or len(shape) == 1:
        return rows.reshape(-1, *shape)
    return rows.reshape(-1, *shape[1:], shape[0]).movedim(-1, 1).contiguous()


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run ``module`` in the given mode, whatever the layer's own flag says (``is_training``)."""
    before = module.training
    if before != training:
        module.train(training)
    try:
        yield module
    finally:
        if before != training:
            module.train(before)


def run_norm(norm: nn.Module, x: Tensor, training: bool) -> Tensor:
    """One norm on x in training (batch statistics, updated running ones) or eval form.

    Computed in x's dtype: a float16 or bfloat16 layer's norm parameters and statistics are
    cast to it (the CPU has no mixed-dtype norms), and updated statistics are written back.
    """
    if not training or isinstance(norm, nn.LayerNorm | nn.Identity):
        return apply_spec(norm_spec(norm), x, x.dtype)
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    running_mean, running_var = norm.running_mean, norm.running_var
    assert running_mean is not None and running_var is not None
    tensors = [t for t in (*norm.parameters(), running_mean) if t is not None]
    if all(t.dtype == x.dtype for t in tensors):
        with _mode(norm, True):
            return norm(x)
    # BatchNorm training in x's dtype with statistics kept in the layer's (nn.BatchNorm's
    # own bookkeeping: the counter, and a cumulative average when momentum is None).
    tracked = norm.num_batches_tracked
    assert tracked is not None  # RegBN's BatchNorms track running statistics
    with torch.no_grad():
        tracked.add_(1)
    momentum = norm.momentum
    if momentum is None:
        momentum = 1.0 / float(tracked)
    mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    w = None if norm.weight is None else norm.weight.to(x.dtype)
    b = None if norm.bias is None else norm.bias.to(x.dtype)
    y = TF.batch_norm(x, mean, var, w, b, True, momentum, norm.eps)
    with torch.no_grad():
        running_mean.copy_(mean)
        running_var.copy_(var)
    return y
