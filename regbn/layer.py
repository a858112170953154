"""The RegBN layer: buffers, shapes, normalisations and the running projection."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import is_fake

from ._format import shape_str
from .solver import LAMBDA_RULES, solve_batch, solve_dtype

__all__ = ["RegBN", "NormSpec", "eval_maths", "layer_norm", "norm_spec"]

_HISTORY = 32  # λ⁺ values kept in the ``lambda_history`` buffer


def _input_norm(enabled: bool, channels: int, spatial: list[int], affine: bool) -> nn.Module:
    """BatchNorm{k}d over channels for k ≥ 2 spatial dims, else LayerNorm over [C, *spatial]."""
    if not enabled:
        return nn.Identity()
    if len(spatial) >= 2:
        if len(spatial) > 3:
            raise ValueError(
                f"normalize_input=True supports at most 3 spatial dims (BatchNorm3d); got "
                f"{len(spatial)} ({spatial}). Reshape the tensor or set normalize_input=False"
            )
        return getattr(nn, f"BatchNorm{len(spatial)}d")(channels, affine=affine)
    return nn.LayerNorm([channels, *spatial], elementwise_affine=affine)


def _output_norm(enabled: bool, channels: int, spatial: list[int], affine: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return nn.LayerNorm([channels, *spatial], elementwise_affine=affine)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_range(name: str, value, lo: float, hi: float, text: str, why: str) -> None:
    """``momentum`` lies in (0, 1], ``sigma_THR`` in [0, 1)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (lo < value <= hi) if text.startswith("(") else (lo <= value < hi)
    if not ok:
        raise ValueError(
            f"RegBN: {name} must be a number in {text} ({why}); got {value!r}. "
            f"The official defaults are momentum=0.02 and sigma_THR=0.0"
        )


# ---------------------------------------------------------------------- the eval maths, functional
# A norm as plain tensors, so that the same function serves the layer, the fx graph that
# regbn.fold writes (where the tensors are fx Proxies) and every exporter:
#   ("layer", shape, weight, bias, eps)              LayerNorm over the last dims, of sizes shape
#   ("batch", running_mean, running_var, weight, bias, eps)   BatchNorm with running statistics
NormSpec = tuple | None

PROJECTIONS = ("full", "channel")
_TINY = 1e-30  # far below any variance of values in [-1, 1] on a float32 grid, unless all equal


def layer_norm(x: Tensor, shape: Sequence[int], weight, bias, eps: float) -> Tensor:
    """LayerNorm over the last dims, of sizes ``shape`` (as nn.LayerNorm), safe from overflow.

    (x − μ)/√(σ² + ε) equals (x' − μ')/√(σ'² + ε/t²) for x' = x/t, exactly. With t = max(1,
    max|x|) per sample every x' lies in [−1, 1], so a finite input (1e20 in float32, whose σ²
    overflows) gives a finite output; for |x| ≤ 1 it is the usual formula. t is a constant for
    autograd: the result does not depend on it, so the gradient is exact.
    """
    dims = tuple(range(-len(shape), 0))
    # max|x| as max(max x, −min x): two reductions, no temporary the size of x.
    xd = x.detach()
    t = torch.maximum(xd.amax(dim=dims, keepdim=True), -xd.amin(dim=dims, keepdim=True))
    t = t.clamp_min(1.0)
    # Two passes, the mean and then ‖x − μ‖₂ (torch.var_mean's Welford loop is several times
    # slower on the CPU). x/t is a fresh tensor that no backward reads: centred in place.
    c = x / t
    c = c.sub_(c.mean(dim=dims, keepdim=True))
    var = torch.linalg.vector_norm(c, 2, dim=dims, keepdim=True).square() / math.prod(shape)
    # The floor only matters for a constant sample (x − μ = 0) whose ε/t² underflowed.
    y = c * torch.rsqrt((var + eps / t.square()).clamp_min(_TINY))
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight)
    if weight is not None:
        return y * weight
    return y if bias is None else y + bias


def _apply_spec(spec: NormSpec, x: Tensor, dtype: torch.dtype) -> Tensor:
    """One norm in eval form, its tensors cast to the compute ``dtype``."""
    if spec is None:
        return x
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    if spec[0] == "layer":
        _, shape, weight, bias, eps = spec
        return layer_norm(x, shape, cast(weight), cast(bias), eps)
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
) -> tuple[Tensor, Tensor]:
    """RegBN in eval mode as plain torch ops: ``f_r = F − G·W`` between the norms.

    Args:
        f: (B, *f_shape); g: (B, *g_shape); W: (Dg, Df), the running projection; (Cg, Cf) for
            ``projection="channel"``, applied at every spatial position.
        norms: the specs of (norm_f, norm_g, norm_f_out, norm_g_out), see :func:`norm_spec`.
        dtype: the compute dtype (float32 or float64); inputs, W and the norms' tensors are cast
            to it, the outputs stay in it.
        projection: ``"full"`` or ``"channel"``, as the layer's.

    Sizes come from ``f_shape``/``g_shape``, never from data, so the graph exports with a
    symbolic batch size, and an empty batch gives empty outputs.
    """
    nf, ng, nfo, ngo = norms
    f = _apply_spec(nf, f.to(dtype), dtype)
    g = _apply_spec(ng, g.to(dtype), dtype)
    channel = projection == "channel"
    f_r = torch.addmm(
        as_rows(f, f_shape, channel), as_rows(g, g_shape, channel), W.to(dtype), alpha=-1
    )
    f_r = from_rows(f_r, f_shape, channel)
    return _apply_spec(nfo, f_r, dtype), _apply_spec(ngo, g, dtype)


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
def _mode(module: nn.Module, training: bool):
    """Run ``module`` in the given mode, whatever the layer's own flag says (``is_training``)."""
    before = module.training
    if before != training:
        module.train(training)
    try:
        yield module
    finally:
        if before != training:
            module.train(before)


def _is_symbolic(x: Tensor) -> bool:
    # A plain tensor is never fake; skip the subclass inspection on the hot path.
    return x.device.type == "meta" or (type(x) is not Tensor and is_fake(x))


def _functorch_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _autocast_enabled(device_type: str) -> bool:
    if device_type == "meta":
        return False  # no autocast on meta tensors (shape-only runs)
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _mean_abs(x: Tensor, block: int = 1 << 18) -> Tensor:
    """mean |x|, accumulated in float64 where the device has it (on the CPU each block is summed
    in x's dtype, through a small reused buffer: a Dg×Df temporary costs page faults)."""
    x = x.reshape(-1)
    if x.device.type != "cpu":
        return x.abs().sum(dtype=solve_dtype(x.device)) / max(x.numel(), 1)
    buf = torch.empty(min(block, x.numel()), dtype=x.dtype)
    total = x.new_zeros((), dtype=torch.float64)
    for i in range(0, x.numel(), block):
        n = min(block, x.numel() - i)
        total += torch.abs(x[i : i + n], out=buf[:n]).sum()
    return total / max(x.numel(), 1)


def _decode_shapes(state) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(f_shape, g_shape) from a saved extra state: the int64 tensor this version writes, or the
    dict of earlier checkpoints; None for a lazy layer's."""
    if isinstance(state, dict):
        if state.get("f_shape") is None or state.get("g_shape") is None:
            return None
        return tuple(state["f_shape"]), tuple(state["g_shape"])
    if not isinstance(state, Tensor) or state.numel() == 0:
        return None
    v = [int(x) for x in state.tolist()]
    nf = v[0]
    f_shape = tuple(v[1 : 1 + nf])
    g_shape = tuple(v[2 + nf : 2 + nf + v[1 + nf]])
    return f_shape, g_shape


class RegBN(nn.Module):
    r"""RegBN: batch normalisation of multimodal data with regularisation.

    Removes from the features ``f`` the part that the features ``g`` explain linearly
    (Ghahremani & Wachinger, "RegBN: Batch Normalization of Multimodal Data with
    Regularization", NeurIPS 2023). With F (B×Df) and G (B×Dg) the per-sample flattened
    (and optionally normalised) inputs, a training batch computes

    .. math::

        W(\lambda) = \arg\min_W \|F - GW\|_F^2 + \lambda\|W\|_F^2 = G^\top(GG^\top+\lambda I)^{-1}F,
        \qquad f_r = F - G\,W(\lambda^+) = \lambda^+ (GG^\top + \lambda^+ I)^{-1} F

    where λ⁺ ≥ 0 is solved exactly on every batch: ``lambda_rule="paper"`` takes the λ with
    ‖W(λ)‖_F = 1 (0 when the least-norm solution already lies in the unit ball);
    ``lambda_rule="official"`` takes Σ_i (s_i²/(s_i²+λ))² = 1, the condition the published
    code's L-BFGS search approximates. After each training batch the running projection
    follows the paper's Adam-like rule (eq. 6), W ← (1 − η) W + η W(λ⁺); eval mode returns
    f_r = F − G W with the running W and never changes a buffer.

    Deployment: in eval mode the layer is plain torch ops (:func:`eval_maths`), and that is what
    it computes under ``torch.export``, the ONNX exporters, ``torch.jit.trace`` and
    ``torch.func``, on real, fake and meta tensors; :func:`regbn.fold` writes those ops into the
    model's graph so that it runs without regbn. Under any torch.fx tracer the layer is one
    ``call_module`` leaf. A training-mode layer refuses to be exported or traced (λ⁺ comes from
    a data-dependent solve) and refuses second derivatives (its gradient is exact to first
    order). ``reset_running_stats()`` and ``reset_parameters()`` work as on ``nn.BatchNorm``,
    e.g. after ``to_empty()`` of a model built on the meta device.

    Shapes:
        f: (B, f_num_channels, *f_layer_dim); g: (B, g_num_channels, *g_layer_dim).
        Outputs ``(f_r, g_out)`` have the inputs' shapes. ``W`` is (Dg, Df).

    Args:
        f_num_channels: channels C of f (dim 1); None: every shape comes from the first batch.
        g_num_channels: channels of g; None likewise.
        f_layer_dim: spatial dims of f after the channels, ``[]`` for vectors.
        g_layer_dim: spatial dims of g after the channels.
        gpu: accepted for compatibility with the official module and ignored; use ``.to()``.
        beta1: decay of the first moment in the running update (paper eq. 6).
        beta2: decay of the second moment in the running update.
        momentum: step size of the running update, in (0, 1].
        normalize_input: normalise f and g before the solve (BatchNorm{k}d for k ≥ 2 spatial dims,
            else LayerNorm over [C, *spatial]).
        normalize_output: LayerNorm over [C, *spatial] on f_r and on g.
        affine: learnable scale and shift in those normalisations.
        sigma_THR: singular values of G at or below ``sigma_THR * max(s)`` become ``sigma_MIN``;
            in [0, 1).
        sigma_MIN: the value that replaces them (0 drops the direction).
        verbose: print λ⁺ and ‖W_batch‖²_F after every training batch.
        lambda_rule: ``"paper"`` (‖W‖_F = 1) or ``"official"`` (the published code's condition).
        max_projection_bytes: refuse a W (Dg×Df) larger than this many bytes.
        projection: ``"full"`` (the paper's W, Dg×Df, over the flattened features) or
            ``"channel"``: one Cg×Cf W shared over spatial positions, solved over the B·H·W
            (sample, position) rows, when f and g have the same spatial size; an opt-in
            extension for feature maps whose full W cannot fit.

    Example::

        >>> layer = RegBN(512, 64, [], [7, 7])
        >>> f_r, g_out = layer(torch.randn(50, 512), torch.randn(50, 64, 7, 7))
        >>> layer.last_lambda  # λ⁺ of that batch
    """

    W: Tensor
    adam_m: Tensor
    adam_v: Tensor
    num_batches_tracked: Tensor
    lambda_history: Tensor
    _SOLVE_DTYPE_BUFFERS = ("adam_m", "adam_v", "lambda_history")
    projection = "full"  # the default, also for layers pickled before the option existed

    def __init__(
        self,
        f_num_channels: int | None = None,
        g_num_channels: int | None = None,
        f_layer_dim: Sequence[int] | None = None,
        g_layer_dim: Sequence[int] | None = None,
        gpu: int | None = None,
        beta1: float = 0.9,
        beta2: float = 0.99,
        momentum: float = 0.02,
        normalize_input: bool = False,
        normalize_output: bool = True,
        affine: bool = False,
        sigma_THR: float = 0.0,
        sigma_MIN: float = 0.0,
        verbose: bool = False,
        *,
        lambda_rule: str = "paper",
        max_projection_bytes: int = 2**30,
        projection: str = "full",
    ) -> None:
        super().__init__()
        if gpu is not None:
            warnings.warn(
                f"RegBN: gpu={gpu!r} is ignored; the layer follows .to(device) like any module",
                UserWarning,
                stacklevel=2,
            )
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"RegBN: {name} must be in [0, 1); got {value!r}")
        _check_range("momentum", momentum, 0.0, 1.0, "(0, 1]", "the running W would overshoot")
        _check_range("sigma_THR", sigma_THR, 0.0, 1.0, "[0, 1)", "it is a fraction of max(s)")
        if not (_is_number(sigma_MIN) and math.isfinite(sigma_MIN) and sigma_MIN >= 0):
            raise ValueError(f"RegBN: sigma_MIN must be a finite number >= 0; got {sigma_MIN!r}")
        if lambda_rule not in LAMBDA_RULES:
            raise ValueError(
                f"RegBN: lambda_rule must be one of {LAMBDA_RULES}; got {lambda_rule!r}. "
                "'paper' enforces ||W||_F = 1; 'official' reproduces the published code"
            )
        self.beta1, self.beta2, self.momentum = float(beta1), float(beta2), float(momentum)
        self.sigma_THR, self.sigma_MIN = float(sigma_THR), float(sigma_MIN)
        self.normalize_input, self.normalize_output = bool(normalize_input), bool(normalize_output)
        self.affine, self.verbose = bool(affine), bool(verbose)
        self.lambda_rule = lambda_rule
        self.max_projection_bytes = int(max_projection_bytes)
        if projection not in PROJECTIONS:
            raise ValueError(
                f"RegBN: projection must be one of {PROJECTIONS}; got {projection!r}. 'full' is "
                "the paper's W over the flattened features; 'channel' shares one Cg×Cf W over "
                "the spatial positions of f and g (same spatial size)"
            )
        self.projection = projection

        self.register_buffer("adam_m", torch.zeros((), dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "lambda_history", torch.full((_HISTORY,), math.nan, dtype=torch.float64)
        )

        self.f_shape: tuple[int, ...] | None = None
        self.g_shape: tuple[int, ...] | None = None
        self._work: Tensor | None = None
        if f_num_channels is None or g_num_channels is None:
            # Lazy, like nn.LazyBatchNorm: shapes come from the first batch or a checkpoint.
            self._declared = (f_num_channels, g_num_channels, f_layer_dim, g_layer_dim)
            self.register_buffer("W", nn.parameter.UninitializedBuffer())
        else:
            self._declared = None
            self._build(
                self._as_shape("f", f_num_channels, f_layer_dim),
                self._as_shape("g", g_num_channels, g_layer_dim),
            )

    # ------------------------------------------------------------------ shapes and building
    @staticmethod
    def _as_shape(which: str, channels, layer_dim) -> tuple[int, ...]:
        dims = [] if layer_dim is None else list(layer_dim)
        shape = (channels, *dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(
                f"RegBN: {which}_num_channels and {which}_layer_dim must be positive ints; got "
                f"{which}_num_channels={channels!r}, {which}_layer_dim={layer_dim!r}"
            )
        return tuple(shape)

    def _check_bytes(
        self, f_shape: tuple[int, ...], g_shape: tuple[int, ...], itemsize: int
    ) -> None:
        if self.projection == "channel" and tuple(f_shape[1:]) != tuple(g_shape[1:]):
            raise ValueError(
                f"RegBN: projection='channel' shares one Cg×Cf W over spatial positions, so f "
                f"and g need the same spatial size; got f {shape_str(f_shape)} and g "
                f"{shape_str(g_shape)} (channels first). Resize or pool one of them, or use "
                f"projection='full'"
            )
        dg, df = self._w_shape(f_shape, g_shape)
        nbytes = df * dg * itemsize
        if nbytes > self.max_projection_bytes:
            raise ValueError(
                f"RegBN: the projection W would be Dg×Df = {dg}×{df} ({nbytes / 2**20:.1f} MiB), "
                f"more than max_projection_bytes={self.max_projection_bytes} "
                f"({self.max_projection_bytes / 2**20:.1f} MiB). Normalise a smaller tensor, such "
                f"as a pooled one (g {shape_str(g_shape)}, f {shape_str(f_shape)} now), or "
                f"raise max_projection_bytes"
            )

    def _w_shape(self, f_shape: Sequence[int], g_shape: Sequence[int]) -> tuple[int, int]:
        """W's shape: (Dg, Df), or (Cg, Cf) for projection='channel'."""
        if self.projection == "channel":
            return g_shape[0], f_shape[0]
        return math.prod(g_shape), math.prod(f_shape)

    def _build(
        self,
        f_shape: tuple[int, ...],
        g_shape: tuple[int, ...],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create the norms and W for these shapes; on any error nothing is assigned."""
        dtype = dtype or torch.get_default_dtype()
        self._check_bytes(f_shape, g_shape, dtype.itemsize)
        fc, *fs = f_shape
        gc, *gs = g_shape
        # Built outside inference mode: an inference tensor as a buffer or parameter would break
        # every later training step.
        with torch.inference_mode(False):
            norms = {
                "norm_f": _input_norm(self.normalize_input, fc, fs, self.affine),
                "norm_g": _input_norm(self.normalize_input, gc, gs, self.affine),
                "norm_f_out": _output_norm(self.normalize_output, fc, fs, self.affine),
                "norm_g_out": _output_norm(self.normalize_output, gc, gs, self.affine),
            }
            if device is not None:
                for m in norms.values():
                    m.to(device)
            W = torch.zeros(*self._w_shape(f_shape, g_shape), device=device, dtype=dtype)
        for name, m in norms.items():
            setattr(self, name, m)
        self.register_buffer("W", W)
        self.f_shape, self.g_shape = f_shape, g_shape

    def _materialize(self, f: Tensor, g: Tensor) -> None:
        fc, gc, fl, gl = self._declared
        f_shape = tuple(f.shape[1:]) if fc is None else self._as_shape("f", fc, fl)
        g_shape = tuple(g.shape[1:]) if gc is None else self._as_shape("g", gc, gl)
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        self._build(f_shape, g_shape, device=self.adam_m.device, dtype=dtype)
        self._declared = None

    def _unmaterialize(self, declared: tuple) -> None:
        for name in ("norm_f", "norm_g", "norm_f_out", "norm_g_out"):
            if name in self._modules:
                delattr(self, name)
        self.register_buffer("W", nn.parameter.UninitializedBuffer())
        self.f_shape = self.g_shape = None
        self._declared = declared

    def train(self, mode: bool = True) -> RegBN:
        if not mode:
            self._work = None  # the scratch W_batch only serves training steps
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._work = None
        # The λ⁺ history and the Adam moments live in the solve dtype of their device: float64,
        # or float32 where the device has none (MPS), which they must be cast to before the move.
        target = fn(torch.zeros(()))
        if solve_dtype(target.device) != torch.float64:
            for name in self._SOLVE_DTYPE_BUFFERS:
                setattr(self, name, getattr(self, name).float())
        before = {name: getattr(self, name) for name in self._SOLVE_DTYPE_BUFFERS}
        module = super()._apply(fn, *args, **kwargs)
        # A model.half() must not round them (λ⁺ may exceed float16's range): they follow the
        # move, from their values before it, but keep the solve dtype.
        for name, old in before.items():
            buf = getattr(self, name)
            if buf.dtype != solve_dtype(buf.device):
                setattr(self, name, old.to(buf.device, solve_dtype(buf.device)))
        return module

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_work": None}

    def __deepcopy__(self, memo: dict) -> RegBN:
        """copy.deepcopy, also of a lazy layer: torch's UninitializedBuffer has no deep copy of
        its own, so the copy's is created here and the rest is copied as usual."""
        w = self._buffers.get("W")
        if isinstance(w, nn.parameter.UninitializedTensorMixin) and id(w) not in memo:
            memo[id(w)] = nn.parameter.UninitializedBuffer(device=w.device, dtype=w.dtype)
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    def has_uninitialized_params(self) -> bool:
        """True for a lazy layer that has seen neither a batch nor a checkpoint."""
        return self.f_shape is None

    # ------------------------------------------------------------------ resets
    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Zero the running W and the Adam moments, restart the batch counter, clear the λ⁺
        history and reset the input BatchNorm statistics, as ``nn.BatchNorm`` does.

        After ``to_empty()`` (a model built on the meta device) these buffers hold whatever the
        memory held: call this (or :meth:`reset_parameters`) before training.
        """
        self._work = None
        if self.f_shape is not None:
            self.W.zero_()
        self.adam_m.zero_()
        self.adam_v.zero_()
        self.num_batches_tracked.zero_()
        self.lambda_history.fill_(math.nan)
        for norm in self._norms():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.reset_running_stats()

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and the affine norms' scale to 1 and shift to 0."""
        self.reset_running_stats()
        for norm in self._norms():
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()

    def _norms(self) -> list[nn.Module]:
        names = ("norm_f", "norm_g", "norm_f_out", "norm_g_out")
        return [self._modules[n] for n in names if n in self._modules]

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.f_shape is not None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # Not yet materialised: W is saved uninitialised, as nn.LazyLinear saves its weight.
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                lazy = isinstance(buf, nn.parameter.UninitializedTensorMixin)
                destination[prefix + name] = buf if keep_vars or lazy else buf.detach()
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        w = state_dict.get(prefix + "W")
        if isinstance(w, nn.parameter.UninitializedTensorMixin):
            if self.f_shape is not None:
                error_msgs.append(
                    f"RegBN {prefix!r}: the checkpoint holds a lazy RegBN that never saw a batch, "
                    f"but this layer has shapes f {shape_str(self.f_shape)}, g "
                    f"{shape_str(self.g_shape)}; load it into a lazy RegBN() or train first"
                )
                return
            # Lazy into lazy: W stays uninitialised; the other buffers load as usual.
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "W"}
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs,
            )
            if prefix + "W" in missing_keys:
                missing_keys.remove(prefix + "W")
            return
        shapes = _decode_shapes(state_dict.get(prefix + "_extra_state"))
        if self.f_shape is None and shapes is not None:
            self._build(
                shapes[0],
                shapes[1],
                device=self.adam_m.device,
                dtype=w.dtype if isinstance(w, Tensor) else None,
            )
            self._declared = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def get_extra_state(self) -> Tensor:
        """The feature shapes as an int64 tensor ``[len(f), *f, len(g), *g]`` (empty when lazy).

        A tensor, not a dict, so that tools that walk the state dict as tensors (``jit.trace``,
        the ONNX exporters) accept the layer.
        """
        if self.f_shape is None:
            return torch.zeros(0, dtype=torch.long)
        fs, gs = self.f_shape, self.g_shape
        return torch.tensor([len(fs), *fs, len(gs), *gs], dtype=torch.long)

    def set_extra_state(self, state) -> None:
        shapes = _decode_shapes(state)
        if shapes is None:
            return
        for key, saved, mine in zip(
            ("f_shape", "g_shape"), shapes, (self.f_shape, self.g_shape), strict=True
        ):
            if mine is not None and tuple(saved) != tuple(mine):
                raise ValueError(
                    f"RegBN: the checkpoint was saved for {key} {shape_str(saved)} but this layer "
                    f"has {shape_str(mine)}; build the layer with the checkpoint's shapes"
                )

    # ------------------------------------------------------------------ introspection
    @property
    def last_lambda(self) -> float | None:
        """λ⁺ of the last training batch (None before the first)."""
        value = float(self.lambda_history[-1])
        return None if math.isnan(value) else value

    def extra_repr(self) -> str:
        if self.f_shape is None:
            shapes = "f=lazy, g=lazy"
        else:
            shapes = (
                f"f=(B, {', '.join(map(str, self.f_shape))}), "
                f"g=(B, {', '.join(map(str, self.g_shape))}), "
                "W={}×{}".format(*self._w_shape(self.f_shape, self.g_shape))
            )
        channel = ", projection='channel'" if self.projection == "channel" else ""
        return (
            f"{shapes}, lambda_rule={self.lambda_rule!r}, momentum={self.momentum}, "
            f"normalize_input={self.normalize_input}, normalize_output={self.normalize_output}"
            f"{channel}"
        )

    # ------------------------------------------------------------------ validation
    def _check(self, f: Tensor, g: Tensor) -> None:
        for name, x in (("f", f), ("g", g)):
            if not isinstance(x, Tensor):
                raise TypeError(f"RegBN: {name} must be a torch.Tensor; got {type(x).__name__}")
            if not (x.is_floating_point()):
                raise TypeError(
                    f"RegBN: {name} must be a floating-point tensor; got dtype {x.dtype}. "
                    f"Convert it with {name}.float()"
                )
            if x.dim() < 2:
                raise ValueError(
                    f"RegBN: {name} must be (B, C, *spatial) with a batch dim; got shape "
                    f"{shape_str(x.shape)}. Add the batch dim, e.g. {name}.unsqueeze(0)"
                )
        if f.shape[0] != g.shape[0]:
            raise ValueError(
                f"RegBN: f and g must hold the same samples, so their batch sizes (dim 0) must "
                f"match; got f {shape_str(f.shape)} and g {shape_str(g.shape)}"
            )
        for name, x, declared in (("f", f, self.f_shape), ("g", g, self.g_shape)):
            if declared is not None and tuple(x.shape[1:]) != declared:
                raise ValueError(
                    f"RegBN: {name} must have shape (B, {', '.join(map(str, declared))}) as "
                    f"declared by {name}_num_channels/{name}_layer_dim; got "
                    f"{shape_str(x.shape)}. Pass the declared shape or build the layer for this "
                    f"one"
                )
        device = self.adam_m.device
        if (f.device != device or g.device != device) and not (_is_symbolic(f) or _is_symbolic(g)):
            raise ValueError(
                f"RegBN: f ({f.device}) and g ({g.device}) must be on the layer's device "
                f"({self.adam_m.device}); move the layer with layer.to(device)"
            )

    @staticmethod
    def _check_training_batch(f: Tensor, g: Tensor) -> None:
        """A training batch (the global one, when synchronised) must allow a solve."""
        if f.shape[0] < 2:
            raise ValueError(
                "RegBN: a training batch needs at least 2 samples to estimate the projection; "
                f"got a batch of {f.shape[0]}. Use a larger batch, or call layer.eval() for "
                "single-sample inference"
            )
        # A NaN or Inf anywhere reaches the sum; only then pay for the element-wise test.
        if bool(torch.isfinite(f.sum() + g.sum())):
            return
        for name, x in (("f", f), ("g", g)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"RegBN: training input {name} holds non-finite values (NaN or Inf); the "
                    f"batch was rejected and no buffer changed. Check the upstream layers or "
                    f"the data"
                )

    def _gather(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor, slice | None]:
        """The batch a training step solves over: this process's own (see SyncRegBN)."""
        return f, g, None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        f: Tensor,
        g: Tensor,
        is_training: bool | None = None,
        n_epoch: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(f_r, g_out)``.

        Args:
            f: (B, f_num_channels, *f_layer_dim) features to normalise.
            g: (B, g_num_channels, *g_layer_dim) features whose linear effect is removed.
            is_training: overrides ``self.training`` when given (official keyword).
            n_epoch: accepted for compatibility with the official module; not needed.
            steps_per_epoch: accepted for compatibility with the official module; not needed.
        """
        if isinstance(f, fx.Proxy) or isinstance(g, fx.Proxy):
            return self._record_call(f, g, is_training)
        training = self.training if is_training is None else bool(is_training)
        self._validate(f, g, training)
        if self.f_shape is not None:
            return self._forward(f, g, training)
        if _is_symbolic(f) or _is_symbolic(g) or torch.compiler.is_exporting():
            raise ValueError(
                "RegBN: a lazy layer takes its shapes and its W from a first real batch, and "
                f"this one has seen none (f {shape_str(f.shape)}, g {shape_str(g.shape)} came "
                "as fake, meta or exported tensors). Run one batch or load a checkpoint first, "
                "or build the layer with its dims"
            )
        declared = self._declared
        self._materialize(f, g)
        try:
            self._check(f, g)
            return self._forward(f, g, training)
        except BaseException:
            # A rejected first batch must not fix a lazy layer's shapes.
            self._unmaterialize(declared)
            raise

    def _record_call(self, f, g, is_training: bool | None) -> tuple:
        """Under any torch.fx tracer the layer is one ``call_module`` node (a leaf): its
        training step cannot be traced, and its eval maths belongs to ``regbn.fold``."""
        tracer = (f if isinstance(f, fx.Proxy) else g).tracer
        kwargs = {} if is_training is None else {"is_training": is_training}
        out = tracer.create_proxy("call_module", tracer.path_of_module(self), (f, g), kwargs)
        return out[0], out[1]

    def _validate(self, f: Tensor, g: Tensor, training: bool) -> None:
        """Check the inputs before anything else runs (SyncRegBN agrees on it across ranks)."""
        if not torch.jit.is_tracing():
            return self._check(f, g)
        # The shape checks hold for the traced example; a trace cannot record them, and its
        # warning that they become constants is about them alone, not about the maths.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self._check(f, g)

    def __prepare_scriptable__(self):
        raise TypeError(
            "RegBN cannot be compiled by torch.jit.script: its training step solves for λ⁺ on "
            "the host. For deployment put the model in eval mode and use torch.export.export "
            "(or torch.jit.trace, or torch.onnx.export(..., dynamo=True)), or turn every RegBN "
            "into plain torch ops with regbn.fold(model)"
        )

    def _forward(self, f: Tensor, g: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if not training:
            return self._eval_forward(f, g)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise ValueError(
                "RegBN: a layer in training mode cannot be exported or traced: λ⁺ comes from a "
                "data-dependent solve on every batch, so no graph can hold it. Call model.eval() "
                "before torch.export / torch.jit.trace / torch.onnx.export (the eval maths, "
                "f_r = F − G·W with the running W, exports), or use regbn.fold(model)"
            )
        if _is_symbolic(f) or _is_symbolic(g):
            # Shape-only execution (fake or meta tensors, as in regbn's shape propagation): the
            # eval maths gives the right shapes and dtypes and changes no buffer.
            return self._eval_forward(f, g)
        if _functorch_active():
            raise ValueError(
                "RegBN: a layer in training mode cannot run under torch.func transforms (vmap, "
                "grad, jacrev, ...): each training batch updates the running W, a side effect "
                "the transforms forbid. Call layer.eval() first, or compute the training step "
                "outside torch.func"
            )
        return self._train_forward(f, g)

    def _compute_dtype(self, f: Tensor) -> torch.dtype:
        return f.dtype if f.dtype in (torch.float32, torch.float64) else torch.float32

    def _autocast_off(self, f: Tensor):
        """Autocast disabled around the maths (the solve and the norms need float32 at least);
        the second value says whether it was on, in which case the outputs stay float32."""
        on = _autocast_enabled(f.device.type)
        guard = torch.autocast(device_type=f.device.type, enabled=False) if on else None
        return guard or contextlib.nullcontext(), on

    def _eval_forward(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        guard, autocast = self._autocast_off(f)
        out_dtype = f.dtype
        with guard:
            norms = [norm_spec(m) for m in self._norms()]
            f_r, g_n = eval_maths(
                f,
                g,
                self.W,
                norms,
                self.f_shape,
                self.g_shape,
                self._compute_dtype(f),
                self.projection,
            )
        if not autocast and f_r.dtype != out_dtype:
            f_r, g_n = f_r.to(out_dtype), g_n.to(out_dtype)
        return f_r, g_n

    def _train_forward(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        guard, autocast = self._autocast_off(f)
        out_dtype = f.dtype
        dtype = self._compute_dtype(f)
        with guard:
            f_r, g_n = self._train_step(f.to(dtype), g.to(dtype))
        if not autocast and f_r.dtype != out_dtype:
            f_r, g_n = f_r.to(out_dtype), g_n.to(out_dtype)
        return f_r, g_n

    def _norm(self, norm: nn.Module, x: Tensor, training: bool) -> Tensor:
        """One norm on x in training (batch statistics, updated running ones) or eval form.

        Computed in x's dtype: a float16 or bfloat16 layer's norm parameters and statistics are
        cast to it (the CPU has no mixed-dtype norms), and updated statistics are written back.
        """
        if not training or isinstance(norm, nn.LayerNorm | nn.Identity):
            return _apply_spec(norm_spec(norm), x, x.dtype)
        tensors = [t for t in (*norm.parameters(), norm.running_mean) if t is not None]
        if all(t.dtype == x.dtype for t in tensors):
            with _mode(norm, True):
                return norm(x)
        # BatchNorm training in x's dtype with statistics kept in the layer's (nn.BatchNorm's
        # own bookkeeping: the counter, and a cumulative average when momentum is None).
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
        momentum = norm.momentum
        if momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
        mean, var = norm.running_mean.to(x.dtype), norm.running_var.to(x.dtype)
        w = None if norm.weight is None else norm.weight.to(x.dtype)
        b = None if norm.bias is None else norm.bias.to(x.dtype)
        y = TF.batch_norm(x, mean, var, w, b, True, momentum, norm.eps)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        return y

    def _norm_state(self) -> list[tuple[Tensor, Tensor]]:
        if not self.normalize_input:
            return []
        return [(b, b.clone()) for m in (self.norm_f, self.norm_g) for b in m.buffers()]

    def _train_step(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Solve one training batch; buffers change only once every output is known finite."""
        f, g, rows = self._gather(f, g)
        self._check_training_batch(f, g)
        saved = self._norm_state()
        try:
            f_n = self._norm(self.norm_f, f, True)
            g_n = self._norm(self.norm_g, g, True)
            channel = self.projection == "channel"
            sol = solve_batch(
                as_rows(f_n, f.shape[1:], channel),
                as_rows(g_n, g.shape[1:], channel),
                self.lambda_rule,
                self.sigma_THR,
                self.sigma_MIN,
            )
            # D = W_batch − W, written where W_batch was formed: one Dg×Df pass fewer than lerp.
            D = sol.projection(out=self._workspace()).sub_(self.W)
            d = _mean_abs(D)
            f_r = self._norm(self.norm_f_out, from_rows(sol.f_r, f.shape[1:], channel), True)
            g_out = self._norm(self.norm_g_out, g_n, True)
            stats = [live for live, _ in saved if live.is_floating_point()]
            self._check_finite([sol.f_r, f_r, g_out, d, *stats], f, g)
            if self.verbose:
                norm2 = float((D + self.W).square().sum())
                print(f"RegBN: lambda+={sol.lam:.6g}  ||W_batch||_F^2={norm2:.6g}")
        except BaseException:
            # A failed batch leaves every buffer as it was, input-norm statistics included.
            for live, copy in saved:
                live.copy_(copy)
            raise
        self._update_running(D, d, sol.lam)
        if rows is not None:
            f_r, g_out = f_r[rows], g_out[rows]
        return f_r, g_out

    def _check_finite(self, outs: list[Tensor], f: Tensor, g: Tensor) -> None:
        """One reduction and one sync on success: a NaN or Inf anywhere in ``outs`` (the
        solution, the outputs, the updated input-norm statistics) makes their sum non-finite.
        The sum runs in each tensor's own precision (float32 at least), so no copy is made; only
        when it is not finite, which a sum of huge finite entries can also be, is every entry
        tested. f and g only serve the message."""
        total = sum(x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x in outs)
        if not math.isfinite(float(total)) and not all(
            bool(torch.isfinite(x.detach()).all()) for x in outs
        ):
            hint = "" if self.normalize_input else " or set normalize_input=True"
            raise ValueError(
                f"RegBN: the batch solution is not finite although the inputs are (f spans "
                f"|x| ≤ {float(f.abs().max()):.3g}, g spans |x| ≤ {float(g.abs().max()):.3g}): "
                f"the solve, the norms or the input-norm running statistics overflowed. The "
                f"batch was rejected and no buffer changed. Rescale the inputs{hint}"
            )

    def _workspace(self) -> Tensor:
        """A Dg×Df scratch tensor like W, kept across training steps (never saved or moved)."""
        W, work = self.W, self._work
        same = work is not None and work.shape == W.shape and work.dtype == W.dtype
        if not (same and work.device == W.device) or (
            work.is_inference() and not torch.is_inference_mode_enabled()
        ):
            with torch.inference_mode(False):
                work = self._work = torch.empty_like(W)
        return work

    @torch.no_grad()
    def _update_running(self, D: Tensor, d: Tensor, lam: float) -> None:
        """Paper eq. 6: W ← (1 − η) W + η W_batch with an Adam-like η; t counts from 1.

        ``D`` is W_batch − W and ``d`` its mean absolute entry.
        """
        t = int(self.num_batches_tracked) + 1
        d = d.to(self.adam_m.dtype).reshape(1)
        # m ← β1 m + (1 − β1) d and v ← β2 v + (1 − β2) d², as lerps. Written through 1-element
        # views: torch.compile drops in-place updates of a 0-dim float64 CPU tensor (it treats
        # one as a Python float), and the running W would silently drift from eager's.
        m, v = self.adam_m.view(1), self.adam_v.view(1)
        m.lerp_(d, 1 - self.beta1)
        v.lerp_(d * d, 1 - self.beta2)
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        eta = m_hat.div_(v_hat.sqrt_().add_(1e-8)).mul_(self.momentum)
        # η stays a tensor: no host sync on an accelerator.
        self.W.addcmul_(D, eta.to(self.W.dtype))
        self.num_batches_tracked.add_(1)
        self.lambda_history.copy_(torch.roll(self.lambda_history, -1))
        self.lambda_history[-1] = lam
