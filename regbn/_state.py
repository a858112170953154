"""RegBN's shapes and state: building the norms and W for the feature shapes, lazy layers
(shapes from the first batch or a checkpoint), the state dict and extra state, pickling and
deep copies.

:class:`StateMixin` holds these so that :mod:`regbn.layer` keeps the training step and the
running update.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _checks
from ._format import shape_str
from ._norms import input_norm, output_norm
from ._spectrum import solve_dtype
from .errors import RegBNValueError

__all__ = ["NORMS", "StateMixin", "mean_abs"]

# torch's type stubs omit this base class of UninitializedBuffer and UninitializedParameter.
_UNINITIALIZED: type = getattr(nn.parameter, "UninitializedTensorMixin")  # noqa: B009

NORMS = ("norm_f", "norm_g", "norm_f_out", "norm_g_out")


# The projection's code in the saved extra state, then the options that change what the layer
# computes in eval, as bits of one int.
_PROJECTION_CODES = {"full": 0, "channel": 1}
EVAL_OPTIONS = ("normalize_input", "normalize_output", "affine")
_HISTORY = 32  # λ⁺ values kept in the ``lambda_history`` buffer

Shapes = tuple[tuple[int, ...], tuple[int, ...]]


def _encode(shapes: Shapes | None, projection: str, options: int) -> Tensor:
    """The current extra state: ``[len(f), *f, len(g), *g, projection, options]``, or
    ``[-1, projection, options]`` while the shapes are unknown."""
    code = _PROJECTION_CODES[projection]
    if shapes is None:
        return torch.tensor([-1, code, options], dtype=torch.long)
    fs, gs = shapes
    return torch.tensor([len(fs), *fs, len(gs), *gs, code, options], dtype=torch.long)


def _option_bits(layer: nn.Module) -> int:
    return sum(int(bool(getattr(layer, name))) << i for i, name in enumerate(EVAL_OPTIONS))


def _decode(state, prefix: str = "") -> tuple[Shapes | None, str, dict[str, bool]]:
    """(f_shape, g_shape) (None while lazy), the projection and the eval options of an extra
    state in the current layout (:func:`_encode`); anything else is refused."""
    v = state.tolist() if isinstance(state, Tensor) and state.dtype == torch.long else None
    if v is None or state.dim() != 1:
        raise _refusal(state, prefix, "it is not a 1-D int64 tensor")
    shapes: Shapes | None = None
    rest = v[1:]
    if v[:1] != [-1]:
        nf = v[0] if v else 0
        ng = v[1 + nf] if 1 <= nf < len(v) - 1 else 0
        fs, gs = tuple(v[1 : 1 + nf]), tuple(v[2 + nf : 2 + nf + ng])
        if ng < 1 or len(gs) != ng or min(fs + gs) < 1:
            raise _refusal(state, prefix, "its feature shapes are not lists of positive sizes")
        shapes, rest = (fs, gs), v[2 + nf + ng :]
    names = {code: name for name, code in _PROJECTION_CODES.items()}
    if len(rest) != 2 or rest[0] not in names or not 0 <= rest[1] < 1 << len(EVAL_OPTIONS):
        raise _refusal(state, prefix, "it does not end in a projection code and option bits")
    options = {name: bool(rest[1] >> i & 1) for i, name in enumerate(EVAL_OPTIONS)}
    return shapes, names[rest[0]], options


def _refusal(state, prefix: str, why: str) -> RegBNValueError:
    return RegBNValueError(
        f"RegBN {prefix!r}: a checkpoint of version {StateMixin._version} (its state_dict."
        "_metadata says so) holds an int64 _extra_state [len(f), *f, len(g), *g, projection, "
        f"options] (or [-1, projection, options] when lazy), but {why}: got {state!r}. An extra "
        "state in an older regbn's layout loads under version 1, which that regbn's state dict "
        "says: keep its metadata, or save the layer again with this regbn"
    )


def _from_v1(state, layer: StateMixin) -> Tensor:
    """Version 1 to 2: the extra state in the current layout.

    Version 1 is what torch records for a module class without ``_version`` (``nn.Module``'s
    own, 1), so it covers every layout written before RegBN had one, told apart by type and
    length: a dict ``{"f_shape", "g_shape"}`` (None in both when lazy); an int64 tensor
    ``[len(f), *f, len(g), *g]`` (empty when lazy); the same followed by the projection code
    (``[-1, code]`` when lazy); the same followed by the eval options' bits, the current layout.
    What a layout lacks (the projection, the options) was not recorded, so it is taken from
    the layer that loads it: nothing to check, as before versions.
    """
    options, projection = _option_bits(layer), layer.projection
    shapes: Shapes | None = None
    if isinstance(state, dict):
        f, g = state.get("f_shape"), state.get("g_shape")
        if f is not None and g is not None:
            shapes = (tuple(f), tuple(g))
    elif isinstance(state, Tensor) and state.numel() > 0:
        v = [int(x) for x in state.reshape(-1).tolist()]
        rest = v[1:]
        if v[0] != -1:
            nf = v[0]
            if not 0 < nf < len(v) - 1:  # a layout no regbn wrote; the strict read refuses it
                return state
            ng = v[1 + nf]
            shapes = (tuple(v[1 : 1 + nf]), tuple(v[2 + nf : 2 + nf + ng]))
            rest = v[2 + nf + ng :]
        names = {code: name for name, code in _PROJECTION_CODES.items()}
        projection = names.get(rest[0], projection) if rest else projection
        options = rest[1] if len(rest) > 1 else options
    return _encode(shapes, projection, options)


# Version n's extra state to version n + 1's, for each version before the current one.
_MIGRATIONS = {1: _from_v1}


class StateMixin(nn.Module):
    """Buffers, shapes, lazy materialisation, state-dict, extra-state, pickling and deepcopy
    hooks of :class:`regbn.RegBN`.

    Checkpoints are versioned as torch's norms are: torch writes the class's ``_version`` into
    ``state_dict()._metadata[prefix]["version"]``, and :meth:`_load_from_state_dict` reads an
    older version's ``_extra_state`` through one migration per version (``_MIGRATIONS``):

    =======  =================================================  ==================================
    version  written by                                         ``_extra_state``
    =======  =================================================  ==================================
    1        regbn before ``_version`` (torch records           four layouts, read by
             ``nn.Module._version``, 1); also a state dict      :func:`_from_v1`: the shapes as a
             whose metadata was lost (``dict(state)``)          dict; then as an int64 tensor;
                                                                then + projection; then + eval
                                                                options (= version 2)
    2        this regbn                                         int64 ``[len(f), *f, len(g), *g,
                                                                projection, options]``, or ``[-1,
                                                                projection, options]`` when lazy;
                                                                read strictly
    =======  =================================================  ==================================
    """

    _version = 2
    # The Adam moments and the λ⁺ history stay in the solve dtype of their device (RegBN._apply).
    _SOLVE_DTYPE_BUFFERS = ("adam_m", "adam_v", "lambda_history")

    f_shape: tuple[int, ...] | None
    g_shape: tuple[int, ...] | None
    _declared: tuple | None
    W: Tensor
    norm_f: nn.Module
    norm_g: nn.Module
    norm_f_out: nn.Module
    norm_g_out: nn.Module
    adam_m: Tensor
    adam_v: Tensor
    num_batches_tracked: Tensor
    lambda_history: Tensor
    _work: Tensor | None
    lambda_rule: str
    momentum: float
    projection: str
    normalize_input: bool
    normalize_output: bool
    affine: bool
    max_projection_bytes: int

    def _register_buffers(self) -> None:
        """Register every buffer of the layer; the one place that lists them, their dtypes and
        whether a checkpoint holds them (in state-dict order; W last, uninitialised until the
        shapes are known)."""
        self.register_buffer("adam_m", torch.zeros((), dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "lambda_history", torch.full((_HISTORY,), math.nan, dtype=torch.float64)
        )
        # Not saved: why the last batch run as one graph (torch.compile, CUDA-graph capture)
        # was rejected, 0 when none was (see RegBN.check_status).
        self.register_buffer("rejected", torch.zeros(1, dtype=torch.int32), persistent=False)
        self._set_W(None)

    def _set_W(self, W: Tensor | None) -> None:
        """(Re)assign W; None makes it uninitialised, as a lazy layer's before its shapes."""
        self.register_buffer("W", nn.parameter.UninitializedBuffer() if W is None else W)

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
        _checks.check_projection_size(
            f_shape, g_shape, self.projection, self._w_shape(f_shape, g_shape),
            dtype.itemsize, self.max_projection_bytes,
        )
        fc, *fs = f_shape
        gc, *gs = g_shape
        # Built outside inference mode: an inference tensor as a buffer or parameter would break
        # every later training step.
        with torch.inference_mode(False):
            norms = {
                "norm_f": input_norm(self.normalize_input, fc, fs, self.affine),
                "norm_g": input_norm(self.normalize_input, gc, gs, self.affine),
                "norm_f_out": output_norm(self.normalize_output, fc, fs, self.affine),
                "norm_g_out": output_norm(self.normalize_output, gc, gs, self.affine),
            }
            if device is not None:
                for m in norms.values():
                    m.to(device)
            W = torch.zeros(*self._w_shape(f_shape, g_shape), device=device, dtype=dtype)
        for name, m in norms.items():
            setattr(self, name, m)
        self._set_W(W)
        self.f_shape, self.g_shape = f_shape, g_shape

    def _materialize(self, f: Tensor, g: Tensor) -> None:
        """Fix a lazy layer's shapes (and W's dtype) from its first batch."""
        assert self._declared is not None
        fc, gc, fl, gl = self._declared
        f_shape = tuple(f.shape[1:]) if fc is None else _checks.as_shape("f", fc, fl)
        g_shape = tuple(g.shape[1:]) if gc is None else _checks.as_shape("g", gc, gl)
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        self._build(f_shape, g_shape, device=self.adam_m.device, dtype=dtype)
        self._declared = None

    def _unmaterialize(self, declared: tuple | None) -> None:
        """Make the layer lazy again (its first batch was rejected)."""
        for name in NORMS:
            if name in self._modules:
                delattr(self, name)
        self._set_W(None)
        self.f_shape = self.g_shape = None
        self._declared = declared

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
            reset = getattr(norm, "reset_parameters", None)
            if callable(reset):
                reset()

    def _norms(self) -> list[nn.Module]:
        # A plain comprehension: torch.export's strict tracer cannot read a walrus's cell.
        found = [self._modules.get(n) for n in NORMS]
        return [m for m in found if m is not None]

    # ------------------------------------------------------------------ introspection
    @property
    def last_lambda(self) -> float | None:
        """λ⁺ of the last training batch (None before the first)."""
        value = float(self.lambda_history[-1])
        return None if math.isnan(value) else value

    def extra_repr(self) -> str:
        if self.f_shape is None or self.g_shape is None:
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

    # ------------------------------------------------------------------ checkpoints
    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_work": None}

    def __deepcopy__(self, memo: dict) -> StateMixin:
        """copy.deepcopy, also of a lazy layer: torch's UninitializedBuffer has no deep copy of
        its own, so the copy's is created here and the rest is copied as usual."""
        w = self._buffers.get("W")
        if w is not None and isinstance(w, _UNINITIALIZED) and id(w) not in memo:
            # The stub of UninitializedBuffer omits its device and dtype arguments.
            memo[id(w)] = nn.parameter.UninitializedBuffer(  # type: ignore[call-arg]
                device=w.device, dtype=w.dtype
            )
        # copy's own reconstruction from __reduce_ex__, private and absent from typeshed.
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.f_shape is not None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # Not yet materialised: W is saved uninitialised, as nn.LazyLinear saves its weight.
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                lazy = isinstance(buf, _UNINITIALIZED)
                destination[prefix + name] = buf if keep_vars or lazy else buf.detach()
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "_extra_state"
        shapes, projection, options = None, self.projection, {}
        if key in state_dict:
            state = self._migrate(state_dict[key], local_metadata.get("version"), prefix)
            state_dict = {**state_dict, key: state}
            shapes, projection, options = _decode(state, prefix)
        w = state_dict.get(prefix + "W")
        for name, saved in options.items():
            mine = getattr(self, name)
            if saved != mine:
                # Eval outputs would differ from the saved model's; training-only options
                # (lambda_rule, momentum, ...) may differ, to fine-tune with new settings.
                raise RegBNValueError(
                    f"RegBN {prefix!r}: the checkpoint was saved with {name}={saved} but this "
                    f"layer has {name}={mine}; build it with RegBN(..., {name}={saved}) (in "
                    f"regbn.insert, pass {name}={saved}) to load it"
                )
        if projection != self.projection:
            # Raised before torch loads this layer's norms (its children), so nothing changes.
            raise RegBNValueError(
                f"RegBN {prefix!r}: the checkpoint was saved with projection={projection!r} but "
                f"this layer has projection={self.projection!r}; build it with "
                f"RegBN(..., projection={projection!r}) to load it"
            )
        if isinstance(w, _UNINITIALIZED):
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

    def _migrate(self, state, version: int | None, prefix: str):
        """A saved extra state of ``version`` in the current layout (see the class docstring)."""
        # A state dict copied into a plain dict loses torch's metadata, and with it the
        # version; version 1's reader reads every layout, the current one included.
        version = 1 if version is None else version
        if version > self._version:
            raise RegBNValueError(
                f"RegBN {prefix!r}: the checkpoint is of version {version} (in "
                f"state_dict._metadata), newer than this regbn reads (up to {self._version}); "
                "upgrade regbn to load it"
            )
        for v in range(version, self._version):
            state = _MIGRATIONS[v](state, self)
        return state

    def get_extra_state(self) -> Tensor:
        """The feature shapes, the projection and the eval options as an int64 tensor
        ``[len(f), *f, len(g), *g, projection, options]`` (``[-1, projection, options]`` when
        lazy; projection 0 is "full", 1 "channel"; options: bit 0 normalize_input, bit 1
        normalize_output, bit 2 affine).

        A tensor, not a dict, so that tools that walk the state dict as tensors (``jit.trace``,
        the ONNX exporters) accept the layer.
        """
        fs, gs = self.f_shape, self.g_shape
        shapes = None if fs is None or gs is None else (fs, gs)
        return _encode(shapes, self.projection, _option_bits(self))

    def set_extra_state(self, state) -> None:
        """Check the saved shapes against the layer's (the state comes migrated to the current
        layout by :meth:`_load_from_state_dict`)."""
        shapes, _, _ = _decode(state)
        if shapes is None:
            return
        for key, saved, mine in zip(
            ("f_shape", "g_shape"), shapes, (self.f_shape, self.g_shape), strict=True
        ):
            if mine is not None and tuple(saved) != tuple(mine):
                raise RegBNValueError(
                    f"RegBN: the checkpoint was saved for {key} {shape_str(saved)} but this layer "
                    f"has {shape_str(mine)}; build the layer with the checkpoint's shapes"
                )

    def _workspace(self) -> Tensor:
        """A Dg×Df scratch tensor like W, kept across training steps (never saved or moved)."""
        W, work = self.W, self._work
        if (
            work is None
            or (work.shape, work.dtype, work.device) != (W.shape, W.dtype, W.device)
            or (work.is_inference() and not torch.is_inference_mode_enabled())
        ):
            with torch.inference_mode(False):
                work = self._work = torch.empty_like(W)
        return work

    def _w_max(self) -> Tensor:
        """max|W| (0-dim, on W's device), for the fused checks of a training step.

        Measured on every step (one reduction over W): a bound carried from step to step would
        miss writes that bypass autograd's version counter (``W.data``, NumPy views), and the
        running update would then turn an overflowing W into NaN without a word.
        """
        with torch.no_grad():
            # One pass and no |W| temporary (abs().amax() costs a Dg×Df allocation).
            lo, hi = torch.aminmax(self.W)
            return torch.maximum(hi, lo.neg()).to(solve_dtype(self.W.device))


def mean_abs(D: Tensor, block: int = 1 << 18) -> Tensor:
    """mean |D| (0-dim), for the running update's step size: one pass over D.

    On the CPU each block is summed while it is in cache (|D| through a small reused buffer: a
    Dg×Df temporary costs a pass and page faults); elsewhere one L1 reduction with no
    temporary. The block sums are added in float64 where the device has it.
    """
    if D.device.type != "cpu" or not D.is_contiguous():
        return torch.linalg.vector_norm(D, 1) / max(D.numel(), 1)
    x = D.reshape(-1)
    buf = torch.empty(min(block, x.numel()), dtype=x.dtype)
    sums = [torch.abs(x[i : i + block], out=buf[: min(block, x.numel() - i)]).sum()
            for i in range(0, x.numel(), block)]
    total = torch.stack(sums).sum(dtype=torch.float64) if sums else x.new_zeros(())
    return total / max(x.numel(), 1)
