"""The RegBN layer: buffers, shapes, normalisations and the running projection."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from . import _checks, _graph
from ._format import shape_str
from ._norms import (
    NormSpec,
    as_rows,
    eval_maths,
    from_rows,
    layer_norm,
    norm_spec,
    run_norm,
)
from ._phases import phase
from ._state import StateMixin, mean_abs
from .errors import RegBNTypeError, RegBNValueError, RegBNWarning
from .solver import NonFiniteGuard, solve_batch, solve_dtype

__all__ = ["RegBN", "NormSpec", "eval_maths", "layer_norm", "norm_spec"]

# ``verbose`` reports each training batch here; enable it with logging.basicConfig(level=INFO)
# or logging.getLogger("regbn").setLevel(logging.INFO) and a handler.
logger = logging.getLogger(__name__)


class RegBN(StateMixin):
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

    torch.compile: ``torch.compile(layer, fullgraph=True)`` (or a whole patched model) compiles
    a training-mode layer into one graph with no host read (:mod:`regbn._graph`): λ⁺ comes from a
    fixed number of safeguarded Newton steps, every decision is a device-side mask, and the
    result equals eager's to round-off. A batch that eager mode refuses with a ``ValueError``
    (non-finite inputs or statistics, a scale that overflows the solve) cannot raise inside a
    compiled step: it is rejected on the device (no buffer changes, as in eager; that call's
    outputs are not to be used), the non-persistent buffer ``rejected`` records why, and the next
    eager call of the layer, or :meth:`check_status`, raises the eager error. A compiled layer
    needs its shapes first (dims given, a batch run eagerly, or a checkpoint loaded).

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
        verbose: log λ⁺ and ‖W_batch‖²_F after every training batch (logger ``regbn.layer``,
            level INFO: e.g. ``logging.basicConfig(level=logging.INFO)``).
        lambda_rule: ``"paper"`` (‖W‖_F = 1) or ``"official"`` (the published code's condition).
        max_projection_bytes: refuse a W (Dg×Df) larger than this many bytes.
        projection: ``"full"`` (the paper's W, Dg×Df, over the flattened features) or
            ``"channel"``: one Cg×Cf W shared over spatial positions, solved over the B·H·W
            (sample, position) rows, when f and g have the same spatial size; an opt-in
            extension for feature maps whose full W cannot fit.

    Returns:
        ``forward(f, g)`` returns ``(f_r, g_out)`` with the shapes of f and g, both in f's
        dtype (float32 for a half-precision f under autocast): f_r is f without the part of
        it that g explains linearly (then LayerNorm'd when ``normalize_output``), g_out is g
        through the layer's norms (``normalize_input``, ``normalize_output``). A
        training-mode call also updates the running W, the Adam moments, the batch counter
        and the λ⁺ history.

    Raises:
        RegBNValueError: at construction, an option out of its range (``beta1``/``beta2``
            outside [0, 1), ``momentum`` outside (0, 1], ``sigma_THR`` outside [0, 1),
            ``sigma_MIN`` negative or not finite, an unknown ``lambda_rule`` or
            ``projection``), dims that are not positive ints, a W larger than
            ``max_projection_bytes``, or ``projection="channel"`` for f and g of different
            spatial sizes (the last two also when a lazy layer takes its shapes). In forward:
            f or g without a batch dim, with other batch sizes, other shapes than declared, or
            on another device than the layer; in training, a batch of fewer than 2 samples,
            non-finite values in f or g, a scale that overflows the solve (the batch is
            rejected, no buffer changes), a training-mode layer under export, tracing or
            ``torch.func``; a lazy layer's first batch of fake or meta tensors; the error of a
            batch a compiled step rejected (see :meth:`check_status`). In
            ``load_state_dict``: a checkpoint saved with other shapes, another projection or
            other eval options (``normalize_input``, ``normalize_output``, ``affine``), or of
            a newer version than this regbn reads.
        RegBNTypeError: f or g not a floating-point tensor; ``torch.jit.script`` of the
            layer.
        RuntimeError: from backward, a second derivative through a training step
            (``create_graph=True``).

    Example:
        >>> layer = RegBN(512, 64, [], [7, 7])
        >>> f_r, g_out = layer(torch.randn(50, 512), torch.randn(50, 64, 7, 7))
        >>> layer.last_lambda  # λ⁺ of that batch
    """

    W: Tensor
    adam_m: Tensor
    adam_v: Tensor
    num_batches_tracked: Tensor
    lambda_history: Tensor
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
                RegBNWarning,
                stacklevel=2,
            )
        _checks.check_options(beta1, beta2, momentum, sigma_THR, sigma_MIN, lambda_rule, projection)
        self.beta1, self.beta2, self.momentum = float(beta1), float(beta2), float(momentum)
        self.sigma_THR, self.sigma_MIN = float(sigma_THR), float(sigma_MIN)
        self.normalize_input, self.normalize_output = bool(normalize_input), bool(normalize_output)
        self.affine, self.verbose = bool(affine), bool(verbose)
        self.lambda_rule = lambda_rule
        self.max_projection_bytes = int(max_projection_bytes)
        self.projection = projection

        self._register_buffers()
        self._status_pending = False

        self.f_shape: tuple[int, ...] | None = None
        self.g_shape: tuple[int, ...] | None = None
        self._work: Tensor | None = None
        if f_num_channels is None or g_num_channels is None:
            # Lazy, like nn.LazyBatchNorm: shapes (and W) come from the first batch or a
            # checkpoint.
            self._declared = (f_num_channels, g_num_channels, f_layer_dim, g_layer_dim)
        else:
            self._declared = None
            self._build(
                _checks.as_shape("f", f_num_channels, f_layer_dim),
                _checks.as_shape("g", g_num_channels, g_layer_dim),
            )

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

    # ------------------------------------------------------------------ validation
    def _check(self, f: Tensor, g: Tensor) -> None:
        _checks.check_inputs(f, g, self.f_shape, self.g_shape, self.adam_m.device)

    @staticmethod
    def _check_training_batch(f: Tensor, g: Tensor) -> None:
        """A training batch (the global one, when synchronised) must allow a solve."""
        _checks.check_training_batch(f, g)

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
        if not torch.compiler.is_compiling() and self.__dict__.get("_status_pending"):
            self.check_status()  # a batch that a compiled step rejected raises here
        training = self.training if is_training is None else bool(is_training)
        self._validate(f, g, training)
        if self.f_shape is not None:
            return self._forward(f, g, training)
        if _checks.is_symbolic(f) or _checks.is_symbolic(g) or torch.compiler.is_exporting():
            raise RegBNValueError(
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
        tracer: Any = (f if isinstance(f, fx.Proxy) else g).tracer
        kwargs = {} if is_training is None else {"is_training": is_training}
        out: Any = tracer.create_proxy("call_module", tracer.path_of_module(self), (f, g), kwargs)
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
        raise RegBNTypeError(
            "RegBN cannot be compiled by torch.jit.script: its training step solves for λ⁺ on "
            "the host. For deployment put the model in eval mode and use torch.export.export "
            "(or torch.jit.trace, or torch.onnx.export(..., dynamo=True)), or turn every RegBN "
            "into plain torch ops with regbn.fold(model)"
        )

    def _forward(self, f: Tensor, g: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if not training:
            return self._eval_forward(f, g)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise RegBNValueError(
                "RegBN: a layer in training mode cannot be exported or traced: λ⁺ comes from a "
                "data-dependent solve on every batch, so no graph can hold it. Call model.eval() "
                "before torch.export / torch.jit.trace / torch.onnx.export (the eval maths, "
                "f_r = F − G·W with the running W, exports), or use regbn.fold(model)"
            )
        if torch.compiler.is_compiling():
            # One graph: every decision on the device, no host read (regbn._graph).
            return self._train_forward(f, g, graph=True)
        if _checks.is_symbolic(f) or _checks.is_symbolic(g):
            # Shape-only execution (fake or meta tensors, as in regbn's shape propagation): the
            # eval maths gives the right shapes and dtypes and changes no buffer.
            return self._eval_forward(f, g)
        if _checks.functorch_active():
            raise RegBNValueError(
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
        on = _checks.autocast_enabled(f.device.type)
        guard = torch.autocast(device_type=f.device.type, enabled=False) if on else None
        return guard or contextlib.nullcontext(), on

    def _eval_forward(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        guard, autocast = self._autocast_off(f)
        out_dtype = f.dtype
        fs, gs = self.f_shape, self.g_shape
        assert fs is not None and gs is not None  # forward materialises a lazy layer first
        with guard:
            norms = [norm_spec(m) for m in self._norms()]
            f_r, g_n = eval_maths(
                f, g, self.W, norms, fs, gs, self._compute_dtype(f), self.projection,
                host=_checks.host_reads(f),
            )
        if not autocast and f_r.dtype != out_dtype:
            f_r, g_n = f_r.to(out_dtype), g_n.to(out_dtype)
        return f_r, g_n

    def _train_forward(self, f: Tensor, g: Tensor, graph: bool = False) -> tuple[Tensor, Tensor]:
        guard, autocast = self._autocast_off(f)
        out_dtype = f.dtype
        dtype = self._compute_dtype(f)
        step = self._graph_step if graph else self._train_step
        with guard:
            f_r, g_n = step(f.to(dtype), g.to(dtype))
        if not autocast and f_r.dtype != out_dtype:
            f_r, g_n = f_r.to(out_dtype), g_n.to(out_dtype)
        return f_r, g_n

    def _norm(self, norm: nn.Module, x: Tensor, training: bool) -> Tensor:
        """One norm on x in training or eval form (:func:`regbn._norms.run_norm`)."""
        return run_norm(norm, x, training)

    def _norm_state(self) -> list[tuple[Tensor, Tensor]]:
        if not self.normalize_input:
            return []
        return [(b, b.clone()) for m in (self.norm_f, self.norm_g) for b in m.buffers()]

    def _train_step(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Solve one training batch; buffers change only once every output is known finite.

        One host read on the common path: the solve reads the spectrum together with the
        checks (the sums of the inputs and of the updated input-norm statistics, a bound on
        the output norms and on the running W); the host then proves from λ⁺ and the spectrum
        that nothing overflows (:meth:`_proven_finite`), else every output is tested. Each
        phase runs under a profiler label ``regbn.<phase>`` (see :mod:`regbn._phases`).
        """
        f, g, rows = self._gather(f, g)
        _checks.check_batch_size(f)
        saved = self._norm_state()
        try:
            with phase("input_norms"):
                f_n = self._norm(self.norm_f, f, True)
                g_n = self._norm(self.norm_g, g, True)
            stats = [live for live, _ in saved if live.is_floating_point()]
            channel = self.projection == "channel"
            with phase("checks"):  # the checks' sums, read with the spectrum by the solve
                guard = self._guard(f, g, stats)
            rows_f, rows_g = as_rows(f_n, f.shape[1:], channel), as_rows(g_n, g.shape[1:], channel)
            args = (rows_f, rows_g, self.lambda_rule, self.sigma_THR, self.sigma_MIN)
            try:
                try:
                    sol = solve_batch(*args, guard=guard)
                except NonFiniteGuard:
                    with phase("checks"):  # which one: a message each (more reads, refusal only)
                        self._check_training_batch(f, g)
                        self._check_finite([*stats, self.W], f, g)
                    # Finite entries whose sum overflowed (1e37 in float32): solve without the
                    # guard; with no guard nothing is proven and every output is tested below.
                    sol = solve_batch(*args)
            except torch.linalg.LinAlgError as err:
                # The Gram of finite inputs overflowed (float64 features of size 1e200).
                raise _checks.solve_failed(f, g, self.normalize_input) from err
            with phase("w_batch"):
                # D = W_batch − W, subtracted by the GEMM that forms W_batch (no Dg×Df pass of
                # its own), then its mean |D| in one pass.
                D = sol.delta(self.W, out=self._workspace())
                d = mean_abs(D)
            with phase("output_norms"):
                f_r = self._norm(self.norm_f_out, from_rows(sol.f_r, f.shape[1:], channel), True)
                g_out = self._norm(self.norm_g_out, g_n, True)
            if not self._proven_finite(sol):
                with phase("checks"):
                    self._check_finite([sol.f_r, f_r, g_out, d, *stats], f, g)
            if self.verbose and logger.isEnabledFor(logging.INFO):
                norm2 = float((D + self.W).square().sum())
                logger.info("RegBN: lambda+=%.6g  ||W_batch||_F^2=%.6g", sol.lam, norm2)
        except BaseException:
            # A failed batch leaves every buffer as it was, input-norm statistics included.
            for live, before in saved:
                live.copy_(before)
            raise
        with phase("running_update"):
            self._update_running(D, d, sol.lam)
        if rows is not None:
            f_r, g_out = f_r[rows], g_out[rows]
        return f_r, g_out

    # ------------------------------------------------------------------ one graph
    def check_status(self) -> None:
        """Raise the error of a training batch that a compiled step rejected.

        Under ``torch.compile`` (and CUDA-graph capture) the training step reads nothing on the
        host, so it cannot raise: a batch that eager mode would refuse (non-finite inputs or
        input-norm statistics, or a scale that overflows the solve) is rejected on the device
        instead. Every buffer keeps its value, as in eager mode, the outputs of that call are
        not to be used, and the non-persistent buffer ``rejected`` records why. The next eager
        call of the layer calls this method; call it yourself after compiled steps to check
        them, e.g. once per epoch (it reads one value from the device).

        Raises:
            RegBNValueError: the eager error of the first rejected batch since the last check;
                the record is then cleared.

        Example::

            >>> step = torch.compile(layer, fullgraph=True)
            >>> f_r, g_out = step(f, g)
            >>> layer.check_status()  # raises if that batch was rejected
        """
        self._status_pending = False
        status = self._buffers.get("rejected")
        if status is None:
            return
        code = int(status.reshape(-1)[0])
        if code == 0:
            return
        status.zero_()
        if code == _graph.REJECT_INPUT:
            raise RegBNValueError(
                "RegBN: a compiled training step was given non-finite values (NaN or Inf) in f, "
                "g or the input-norm statistics; the batch was rejected and no buffer changed. "
                "Check the upstream layers or the data"
            )
        hint = "" if self.normalize_input else " or set normalize_input=True"
        raise RegBNValueError(
            "RegBN: a compiled training step's batch solution was not finite although its "
            "inputs were: the inputs' scale overflowed the solve, the norms or the running W. "
            f"The batch was rejected and no buffer changed. Rescale the inputs{hint}"
        )

    def _graph_step(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The training step with no host read, for torch.compile (:mod:`regbn._graph`).

        The same maths as :meth:`_train_step`; a batch that step would refuse changes no buffer
        here either, and is recorded in ``rejected`` (see :meth:`check_status`).
        """
        f, g, rows = self._gather(f, g)
        _checks.check_batch_size(f)
        # The input norms update copies of their statistics, written back where ok holds.
        (f_n, *new_f), (g_n, *new_g) = (
            _graph.batch_norm_step(self.norm_f, f), _graph.batch_norm_step(self.norm_g, g)
        )
        stats = [s for s in (*new_f, *new_g) if s.is_floating_point()]
        channel = self.projection == "channel"
        rows_f, rows_g = as_rows(f_n, f.shape[1:], channel), as_rows(g_n, g.shape[1:], channel)
        need_grad = torch.is_grad_enabled() and (rows_f.requires_grad or rows_g.requires_grad)
        fr_rows, W_batch, lam, ok = _graph.graph_solve(
            rows_f, rows_g, self.lambda_rule, self.sigma_THR, self.sigma_MIN, self.W.dtype,
            need_grad,
        )
        f_r = self._norm(self.norm_f_out, from_rows(fr_rows.to(rows_f.dtype), f.shape[1:],
                                                    channel), True)
        g_out = self._norm(self.norm_g_out, g_n, True)
        with torch.no_grad():
            dt = self.adam_m.dtype
            inputs_ok = torch.isfinite(
                sum((x.detach().sum(dtype=dt) for x in (f, g, *stats)), torch.zeros((), dtype=dt,
                                                                                     device=f.device))
            )
            D = W_batch - self.W
            # mean |D| (finite only when W and W_batch are), summed in W's precision as the
            # eager step sums its blocks
            d = D.abs().sum().to(dt) / max(D.numel(), 1)
            outs = torch.stack([x.detach().sum(dtype=dt) for x in (fr_rows, f_r, g_out)])
            ok = ok & inputs_ok & torch.isfinite(outs.sum() + d)
            for norm, new in ((self.norm_f, new_f), (self.norm_g, new_g)):
                _graph.write_statistics(norm, new, ok)
            self._update_running_masked(D, d, lam, ok)
            status = self._buffers.get("rejected")
            if status is not None:
                code = torch.where(inputs_ok, _graph.REJECT_SOLUTION, _graph.REJECT_INPUT)
                code = torch.where(ok, 0, code).to(status.dtype)
                status.copy_(torch.where(status == 0, code, status))
        self._status_pending = True
        if rows is not None:
            f_r, g_out = f_r[rows], g_out[rows]
        return f_r, g_out

    @torch.no_grad()
    def _update_running_masked(self, D: Tensor, d: Tensor, lam: Tensor, ok: Tensor) -> None:
        """:meth:`_update_running` where ``ok`` (a device flag) holds, no change elsewhere."""
        m_new, v_new, eta = self._adam(d)
        self.W.copy_(torch.where(ok, torch.addcmul(self.W, D, eta), self.W))
        m, v = self.adam_m.view(1), self.adam_v.view(1)
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        self.num_batches_tracked.add_(ok.to(self.num_batches_tracked.dtype))
        hist = torch.cat([self.lambda_history[1:], lam.to(self.lambda_history.dtype).reshape(1)])
        self.lambda_history.copy_(torch.where(ok, hist, self.lambda_history))

    def _guard(self, f: Tensor, g: Tensor, stats: list[Tensor]) -> Tensor:
        """What the checks read with the spectrum (:func:`regbn._checks.guard_values`)."""
        outs = [m for m in (self.norm_f_out, self.norm_g_out) if isinstance(m, nn.LayerNorm)]
        return _checks.guard_values(f, g, stats, outs, self._w_max())

    def _proven_finite(self, sol) -> bool:
        """Whether no output need be tested (:func:`regbn._checks.proven_finite`)."""
        # f_r and the outputs are in the compute dtype, W_batch and D in W's: the narrower.
        dtype = min(self.W.dtype, sol.f_r.dtype, key=lambda d: torch.finfo(d).max)
        return _checks.proven_finite(sol.bound, sol.guard, dtype)

    def _check_finite(self, outs: list[Tensor], f: Tensor, g: Tensor) -> None:
        """Refuse a batch whose solution, outputs or statistics are not finite."""
        _checks.check_finite(outs, f, g, self.normalize_input)

    @torch.no_grad()
    def _update_running(self, D: Tensor, d: Tensor, lam: float) -> None:
        """Paper eq. 6: W ← (1 − η) W + η W_batch with an Adam-like η; t counts from 1.

        ``D`` is W_batch − W and ``d`` its mean absolute entry. Nothing is read on the host: t
        and η stay on the device.
        """
        m_new, v_new, eta = self._adam(d)
        # Written through 1-element views: torch.compile drops in-place updates of a 0-dim
        # float64 CPU tensor (it treats one as a Python float), and the running W would
        # silently drift from eager's.
        self.adam_m.view(1).copy_(m_new)
        self.adam_v.view(1).copy_(v_new)
        self.W.addcmul_(D, eta)
        self.num_batches_tracked.add_(1)
        self.lambda_history.copy_(torch.roll(self.lambda_history, -1))
        self.lambda_history[-1:].fill_(lam)

    def _adam(self, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(m, v, η) after one more step with mean |D| = ``d``, as 1-element tensors (η in W's
        dtype): m ← β1 m + (1 − β1) d and v ← β2 v + (1 − β2) d² as lerps, η from their
        bias-corrected ratio. Nothing is written: the eager and the masked updates store them."""
        t = self.num_batches_tracked.to(self.adam_m.dtype).reshape(1) + 1
        d = d.to(self.adam_m.dtype).reshape(1)
        m_new = torch.lerp(self.adam_m.view(1), d, 1 - self.beta1)
        v_new = torch.lerp(self.adam_v.view(1), d * d, 1 - self.beta2)
        m_hat = m_new / _bias_correction(self.beta1, t)
        v_hat = v_new / _bias_correction(self.beta2, t)
        eta = m_hat / (v_hat.sqrt() + 1e-8) * self.momentum
        return m_new, v_new, eta.to(self.W.dtype)


def _bias_correction(beta: float, t: Tensor) -> Tensor:
    """1 − βᵗ (Adam's bias correction) for the step count t on the device.

    Written with exp rather than ``torch.pow(beta, t)`` (or expm1): under torch.compile a
    scalar feeding the Dg×Df update of W is computed inside that update's loop, and inductor's
    C++ then calls ``std::pow`` (or ``expm1``) once per vector of W, a 5–7× slower update at
    3136×512; its exp costs nothing there. Equal to ``1 - beta**t`` to round-off.
    """
    if beta == 0.0:
        return torch.ones_like(t)
    return 1 - torch.exp(t * math.log(beta))
