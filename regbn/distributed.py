"""RegBN over the global batch of all ranks, the analogue of ``nn.SyncBatchNorm``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import RegBNTypeError, RegBNValueError
from .layer import RegBN

__all__ = ["SyncRegBN", "convert_sync_regbn"]


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (uneven counts allowed) into the global batch.

    Every rank then computes the same global function, so the gradient of a rank's rows is the
    sum over ranks of the gradients their losses send to those rows: an all-reduce of the
    global gradient, then this rank's slice (what SyncBatchNorm does for its statistics).
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group) -> Tensor:
        ctx.rows, ctx.group = slice(sum(sizes[:rank]), sum(sizes[: rank + 1])), group
        pad = max(sizes) - x.shape[0]
        padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None, None, None


class SyncRegBN(RegBN):
    """A RegBN whose training step solves over the global batch of all ranks.

    Its input normalisation, λ⁺, W_batch, the residual and the running update equal those of
    one process holding the concatenated batch, and so do the input gradients when each rank's
    loss is summed. Eval mode needs no communication. Build it with :func:`convert_sync_regbn`.
    With no process group initialised (or one rank) it is a RegBN.

    Args:
        f_num_channels, g_num_channels, f_layer_dim, g_layer_dim, ...: as `regbn.RegBN`,
            whose constructor it shares.
        process_group: an attribute, not a constructor argument: the ranks whose batches form
            the global batch (None, the default: the world). `convert_sync_regbn` sets it.

    Returns:
        ``forward(f, g)`` returns ``(f_r, g_out)`` for this rank's samples, as `regbn.RegBN`
        does for the global batch.

    Raises:
        RegBNValueError: as `regbn.RegBN`; in training across ranks, a batch refused on any
            rank (every rank raises, naming the refusing ranks and their messages; a
            ``RegBNTypeError`` there becomes this error), or an empty batch on a rank.
        RegBNTypeError: as `regbn.RegBN`, except in a training step across ranks (above).

    Example:
        >>> torch.distributed.init_process_group("nccl")  # one process per GPU (torchrun)
        >>> layer = regbn.convert_sync_regbn(RegBN(512, 64, [], [7, 7])).cuda()
        >>> f_r, g_out = layer(f, g)  # λ⁺ and W_batch from every rank's f and g together
    """

    process_group = None
    _sizes: list[int] | None = None

    def _validate(self, f: Tensor, g: Tensor, training: bool) -> None:
        """Every rank checks its own batch, then all agree: one bad rank fails them all.

        One small collective that every rank joins before anything else, carrying each rank's
        verdict and batch size, so that a shape error on one rank raises the same ValueError
        everywhere instead of leaving the others waiting in the gather.
        """
        group = self.process_group
        if not (training and _active(group)):
            return super()._validate(f, g, training)
        try:
            super()._validate(f, g, training)
            error = None
        except (TypeError, ValueError) as e:
            error = e
        meta = torch.tensor(
            [error is not None, 0 if error is not None else f.shape[0]],
            device=self.adam_m.device,
        )
        metas = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
        dist.all_gather(metas, meta, group=group)
        bad = [r for r, m in enumerate(metas) if int(m[0])]
        if bad:
            messages: list = [None] * len(metas)
            dist.all_gather_object(messages, None if error is None else str(error), group=group)
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in bad)
            raise RegBNValueError(
                f"SyncRegBN: the training batch was refused on rank(s) {bad}, so every rank "
                f"stops here: {detail}"
            )
        self._sizes = [int(m[1]) for m in metas]

    def _gather(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor, slice | None]:
        group = self.process_group
        if not _active(group):
            return f, g, None
        sizes, self._sizes = self._sizes, None
        assert sizes is not None  # _validate gathered them for this step
        if min(sizes) == 0:
            empty = [r for r, n in enumerate(sizes) if n == 0]
            raise RegBNValueError(
                f"SyncRegBN: rank(s) {empty} passed an empty training batch (batch sizes by rank: "
                f"{sizes}); every rank must hold at least one sample. Drop empty batches, e.g. "
                f"DistributedSampler(drop_last=True) or a DataLoader with drop_last=True"
            )
        B = f.shape[0]
        rank = dist.get_rank(group)
        joint = torch.cat([f.reshape(B, -1), g.reshape(B, -1)], dim=1)
        full = _GatherRows.apply(joint, sizes, rank, group)
        Df = f[0].numel()
        F_all = full[:, :Df].reshape(-1, *f.shape[1:])
        G_all = full[:, Df:].reshape(-1, *g.shape[1:])
        start = sum(sizes[:rank])
        return F_all, G_all, slice(start, start + B)


def convert_sync_regbn(module: nn.Module, process_group=None) -> nn.Module:
    """Return ``module`` with every :class:`RegBN` replaced by a :class:`SyncRegBN`.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old ones'
    parameters and buffers, and ``process_group`` (default: the world) is the set of ranks whose
    batches form the global batch. Works on plain models and on models patched by
    :func:`regbn.insert`. With no process group initialised the layers behave as before.

    Args:
        module: a model (or one RegBN layer) holding RegBN layers at any depth.
        process_group: the ``torch.distributed`` group whose ranks' batches are solved
            together; None (the default) is the world. A SyncRegBN already in ``module`` is
            moved to this group.

    Returns:
        ``module`` itself with each RegBN submodule replaced in place; for a RegBN given
        alone, a new SyncRegBN sharing its parameters, buffers and norms.

    Raises:
        RegBNTypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> torch.distributed.init_process_group("nccl")  # one process per GPU (torchrun)
        >>> patched = regbn.insert(model, pairs="auto", example_inputs=(gray, colored))
        >>> model = regbn.convert_sync_regbn(patched).to(rank)
        >>> model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    """
    if not isinstance(module, nn.Module):
        raise RegBNTypeError(
            f"regbn.convert_sync_regbn: module must be a torch.nn.Module; got "
            f"{type(module).__name__}. Pass the model (or the RegBN layer) itself"
        )
    if isinstance(module, RegBN) and not isinstance(module, SyncRegBN):
        out = SyncRegBN.__new__(SyncRegBN)
        out.__dict__.update(module.__dict__)
        out._parameters = dict(module._parameters)
        out._buffers = dict(module._buffers)
        out._modules = dict(module._modules)
        out.process_group = process_group
        return out
    if isinstance(module, SyncRegBN):
        module.process_group = process_group
    for name, child in list(module.named_children()):
        new = convert_sync_regbn(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
