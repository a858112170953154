"""The RegBN layer: buffers, shapes, normalisations and the running projection."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .solver import LAMBDA_RULES, solve_batch, solve_dtype

__all__ = ["RegBN"]

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


def _autocast_enabled(device_type: str) -> bool:
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


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


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
        momentum: step size of the running update.
        normalize_input: normalise f and g before the solve (BatchNorm{k}d for k ≥ 2 spatial dims,
            else LayerNorm over [C, *spatial]).
        normalize_output: LayerNorm over [C, *spatial] on f_r and on g.
        affine: learnable scale and shift in those normalisations.
        sigma_THR: singular values of G at or below ``sigma_THR * max(s)`` become ``sigma_MIN``.
        sigma_MIN: the value that replaces them (0 drops the direction).
        verbose: print λ⁺ and ‖W_batch‖²_F after every training batch.
        lambda_rule: ``"paper"`` (‖W‖_F = 1) or ``"official"`` (the published code's condition).
        max_projection_bytes: refuse a W (Dg×Df) larger than this many bytes.

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
        for name, value in (
            ("momentum", momentum),
            ("sigma_THR", sigma_THR),
            ("sigma_MIN", sigma_MIN),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"RegBN: {name} must be a finite number >= 0; got {value!r}")
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
        df, dg = math.prod(f_shape), math.prod(g_shape)
        nbytes = df * dg * itemsize
        if nbytes > self.max_projection_bytes:
            raise ValueError(
                f"RegBN: the projection W would be Dg×Df = {dg}×{df} ({nbytes / 2**20:.1f} MiB), "
                f"more than max_projection_bytes={self.max_projection_bytes} "
                f"({self.max_projection_bytes / 2**20:.1f} MiB). Normalise a smaller tensor, such "
                f"as a pooled one (g {_shape_str(g_shape)}, f {_shape_str(f_shape)} now), or "
                f"raise max_projection_bytes"
            )

    def _build(
        self,
        f_shape: tuple[int, ...],
        g_shape: tuple[int, ...],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dtype = dtype or torch.get_default_dtype()
        self._check_bytes(f_shape, g_shape, dtype.itemsize)
        self.f_shape, self.g_shape = f_shape, g_shape
        fc, *fs = f_shape
        gc, *gs = g_shape
        self.norm_f = _input_norm(self.normalize_input, fc, fs, self.affine)
        self.norm_g = _input_norm(self.normalize_input, gc, gs, self.affine)
        self.norm_f_out = _output_norm(self.normalize_output, fc, fs, self.affine)
        self.norm_g_out = _output_norm(self.normalize_output, gc, gs, self.affine)
        if device is not None:
            for m in (self.norm_f, self.norm_g, self.norm_f_out, self.norm_g_out):
                m.to(device)
        W = torch.zeros(math.prod(g_shape), math.prod(f_shape), device=device, dtype=dtype)
        self.register_buffer("W", W)

    def _materialize(self, f: Tensor, g: Tensor) -> None:
        fc, gc, fl, gl = self._declared
        f_shape = tuple(f.shape[1:]) if fc is None else self._as_shape("f", fc, fl)
        g_shape = tuple(g.shape[1:]) if gc is None else self._as_shape("g", gc, gl)
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        self._build(f_shape, g_shape, device=self.adam_m.device, dtype=dtype)
        self._declared = None

    def _unmaterialize(self, declared: tuple) -> None:
        for name in ("norm_f", "norm_g", "norm_f_out", "norm_g_out"):
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

    def has_uninitialized_params(self) -> bool:
        """True for a lazy layer that has seen neither a batch nor a checkpoint."""
        return self.f_shape is None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        shapes = state_dict.get(prefix + "_extra_state")
        if self.f_shape is None and isinstance(shapes, dict) and "f_shape" in shapes:
            w = state_dict.get(prefix + "W")
            dtype = w.dtype if isinstance(w, Tensor) else None
            self._build(
                tuple(shapes["f_shape"]),
                tuple(shapes["g_shape"]),
                device=self.adam_m.device,
                dtype=dtype,
            )
            self._declared = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def get_extra_state(self) -> dict:
        return {"f_shape": self.f_shape, "g_shape": self.g_shape}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            return
        for key in ("f_shape", "g_shape"):
            saved, mine = state.get(key), getattr(self, key)
            if saved is not None and mine is not None and tuple(saved) != tuple(mine):
                raise ValueError(
                    f"RegBN: the checkpoint was saved for {key} {_shape_str(saved)} but this layer "
                    f"has {_shape_str(mine)}; build the layer with the checkpoint's shapes"
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
                f"W={math.prod(self.g_shape)}×{math.prod(self.f_shape)}"
            )
        return (
            f"{shapes}, lambda_rule={self.lambda_rule!r}, momentum={self.momentum}, "
            f"normalize_input={self.normalize_input}, normalize_output={self.normalize_output}"
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
                    f"{_shape_str(x.shape)}. Add the batch dim, e.g. {name}.unsqueeze(0)"
                )
        if f.shape[0] != g.shape[0]:
            raise ValueError(
                f"RegBN: f and g must hold the same samples, so their batch sizes (dim 0) must "
                f"match; got f {_shape_str(f.shape)} and g {_shape_str(g.shape)}"
            )
        for name, x, declared in (("f", f, self.f_shape), ("g", g, self.g_shape)):
            if declared is not None and tuple(x.shape[1:]) != declared:
                raise ValueError(
                    f"RegBN: {name} must have shape (B, {', '.join(map(str, declared))}) as "
                    f"declared by {name}_num_channels/{name}_layer_dim; got "
                    f"{_shape_str(x.shape)}. Pass the declared shape or build the layer for this "
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
        training = self.training if is_training is None else bool(is_training)
        self._check(f, g)
        if self.f_shape is not None:
            return self._forward(f, g, training)
        declared = self._declared
        self._materialize(f, g)
        try:
            self._check(f, g)
            return self._forward(f, g, training)
        except BaseException:
            # A rejected first batch must not fix a lazy layer's shapes.
            self._unmaterialize(declared)
            raise

    def _forward(self, f: Tensor, g: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if _is_symbolic(f) or _is_symbolic(g):
            # Shape-only execution (meta or fake tensors): outputs have the inputs' shapes.
            return torch.empty_like(f), torch.empty_like(g)
        out_dtype = f.dtype
        autocast = _autocast_enabled(f.device.type)
        guard = (
            torch.autocast(device_type=f.device.type, enabled=False)
            if autocast
            else contextlib.nullcontext()
        )
        with guard:
            if f.dtype not in (torch.float32, torch.float64):
                f = f.float()
            if g.dtype != f.dtype:
                g = g.to(f.dtype)
            if training:
                f_r, g_n = self._train_step(f, g)
            else:
                f_r, g_n = self._eval_step(f, g)
            f_r = self.norm_f_out(f_r)
            g_n = self.norm_g_out(g_n)
        if not autocast and f_r.dtype != out_dtype:
            f_r, g_n = f_r.to(out_dtype), g_n.to(out_dtype)
        return f_r, g_n

    def _normalise_inputs(self, f: Tensor, g: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if not self.normalize_input:
            return f, g
        with _mode(self.norm_f, training), _mode(self.norm_g, training):
            return self.norm_f(f), self.norm_g(g)

    def _eval_step(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        f_n, g_n = self._normalise_inputs(f, g, False)
        B = f.shape[0]
        f_r = torch.addmm(f_n.reshape(B, -1), g_n.reshape(B, -1), self.W.to(f.dtype), alpha=-1)
        return f_r.reshape(f.shape), g_n

    def _norm_state(self) -> list[tuple[Tensor, Tensor]]:
        if not self.normalize_input:
            return []
        return [(b, b.clone()) for m in (self.norm_f, self.norm_g) for b in m.buffers()]

    def _train_step(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        f, g, rows = self._gather(f, g)
        self._check_training_batch(f, g)
        saved = self._norm_state()
        try:
            f_n, g_n = self._normalise_inputs(f, g, True)
            B = f.shape[0]
            sol = solve_batch(
                f_n.reshape(B, -1),
                g_n.reshape(B, -1),
                self.lambda_rule,
                self.sigma_THR,
                self.sigma_MIN,
            )
            # D = W_batch − W, written where W_batch was formed: one Dg×Df pass fewer than lerp.
            D = sol.projection(out=self._workspace()).sub_(self.W)
            d = _mean_abs(D)
            # One reduction and one sync: a NaN or Inf anywhere reaches the (float64) sum.
            total = sol.f_r.detach().sum(dtype=solve_dtype(sol.f_r.device)) + d
            if not math.isfinite(float(total)):
                raise ValueError(
                    f"RegBN: the batch solution is not finite although the inputs are (f spans "
                    f"|x| ≤ {float(f.abs().max()):.3g}, g spans |x| ≤ {float(g.abs().max()):.3g}); "
                    f"the batch was rejected and no buffer changed. Rescale the inputs or set "
                    f"normalize_input=True"
                )
            if self.verbose:
                norm2 = float((D + self.W).square().sum())
                print(f"RegBN: lambda+={sol.lam:.6g}  ||W_batch||_F^2={norm2:.6g}")
        except BaseException:
            # A failed batch leaves every buffer as it was, input-norm statistics included.
            for live, copy in saved:
                live.copy_(copy)
            raise
        self._update_running(D, d, sol.lam)
        f_r = sol.f_r.reshape(f.shape)
        if rows is not None:
            f_r, g_n = f_r[rows], g_n[rows]
        return f_r, g_n

    def _workspace(self) -> Tensor:
        """A Dg×Df scratch tensor like W, kept across training steps (never saved or moved)."""
        W, work = self.W, self._work
        same = work is not None and work.shape == W.shape and work.dtype == W.dtype
        if not (same and work.device == W.device):
            work = self._work = torch.empty_like(W)
        return work

    @torch.no_grad()
    def _update_running(self, D: Tensor, d: Tensor, lam: float) -> None:
        """Paper eq. 6: W ← (1 − η) W + η W_batch with an Adam-like η; t counts from 1.

        ``D`` is W_batch − W and ``d`` its mean absolute entry.
        """
        t = int(self.num_batches_tracked) + 1
        d = d.to(self.adam_m.dtype)
        # m ← β1 m + (1 − β1) d and v ← β2 v + (1 − β2) d², as lerps.
        self.adam_m.lerp_(d, 1 - self.beta1)
        self.adam_v.lerp_(d * d, 1 - self.beta2)
        m_hat = self.adam_m / (1 - self.beta1**t)
        v_hat = self.adam_v / (1 - self.beta2**t)
        eta = m_hat.div_(v_hat.sqrt_().add_(1e-8)).mul_(self.momentum)
        # η stays a tensor: no host sync on an accelerator.
        self.W.addcmul_(D, eta.to(self.W.dtype))
        self.num_batches_tracked.add_(1)
        self.lambda_history.copy_(torch.roll(self.lambda_history, -1))
        self.lambda_history[-1] = lam
