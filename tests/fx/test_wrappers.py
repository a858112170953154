"""torch.compile, DataParallel and DistributedDataParallel models are patched through the module
they wrap, with a warning that says to wrap the result again."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import regbn

from .conftest import LateConcat


def _inputs():
    return (torch.randn(8, 10), torch.randn(8, 12))


PAIRS = [("relu", "relu_1")]


def _check_patched(wrapped: nn.Module, model: nn.Module, attrs: str, rewrap: str) -> None:
    inputs = _inputs()
    with pytest.warns(UserWarning, match=rf"patched model{attrs}, the LateConcat.*{rewrap}"):
        patched = regbn.insert(wrapped, PAIRS, inputs)
    assert isinstance(patched, LateConcat)
    assert patched.state_dict().keys() - model.state_dict().keys() == {
        k for k in patched.state_dict() if k.startswith("regbn_0.")
    }
    reference = regbn.insert(copy.deepcopy(model), PAIRS, inputs)
    reference.load_state_dict(patched.state_dict())
    patched.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(patched(*inputs), reference(*inputs))
    report = regbn.inspect(wrapped, inputs)
    assert any(row.module == "enc_a" for row in report.rows)
    assert [f.kind for f in regbn.find_fusions(wrapped, inputs)] == ["cat"]


def test_torch_compile_patched_through_orig_mod():
    model = LateConcat()
    _check_patched(torch.compile(model), model, r"\._orig_mod", r"torch\.compile\(patched\)")


def test_data_parallel_patched_through_module():
    model = LateConcat()
    _check_patched(nn.DataParallel(model), model, r"\.module", r"nn\.DataParallel\(patched")


def test_distributed_data_parallel_patched_through_module(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = LateConcat()
        _check_patched(
            nn.parallel.DistributedDataParallel(model),
            model,
            r"\.module",
            r"DistributedDataParallel\(patched",
        )
    finally:
        dist.destroy_process_group()


def test_nested_wrappers_unwrap_to_the_model():
    model = LateConcat()
    inner, wrappers = regbn.fx.tracing.unwrap(torch.compile(nn.DataParallel(model)))
    assert inner is model and wrappers == ["torch.compile", "DataParallel"]
    with pytest.warns(
        UserWarning,
        match=r"\._orig_mod\.module.*nn\.DataParallel\(patched, \.\.\.\) "
        r"then torch\.compile\(patched\)",
    ):
        regbn.insert(torch.compile(nn.DataParallel(model)), PAIRS, _inputs())
