from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import regbn
from regbn.fx import TraceError, trace

from .conftest import PMR, SequentialBranches


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_module_provenance_recorded():
    gm = trace(PMR())
    assert _node(gm, "gray").meta["regbn_module"] is None
    assert _node(gm, "gray_net_conv").meta["regbn_module"] == "gray_net.conv"  # leaf: its target
    assert _node(gm, "relu").meta["regbn_module"] == "gray_net"  # traced through
    assert _node(gm, "cat").meta["regbn_module"] is None
    calls = _node(gm, "gray_net_fc").meta["regbn_module_calls"]
    assert calls == (("gray_net", 0), ("gray_net.fc", 0))
    assert ("gray_net", 0) in _node(gm, "gray_net_fc").meta["regbn_output_of"]


def test_sequential_output_is_its_last_node():
    gm = trace(SequentialBranches())
    last = _node(gm, "branch_a_3")
    assert ("branch_a", 0) in last.meta["regbn_output_of"]


def test_regbn_is_always_a_leaf():
    class WithLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = regbn.RegBN(4, 3)

        def forward(self, f, g):
            return self.norm(f, g)

    gm = trace(WithLayer())
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert mods == ["norm"]


def test_leaf_modules_by_class_and_path():
    gm = trace(PMR(), leaf_modules=["gray_net"])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "gray_net" in targets and "colored_net.conv" in targets
    from .conftest import ConvBranch

    gm = trace(PMR(), leaf_modules=[ConvBranch])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert targets == {"gray_net", "colored_net", "head"}


def test_bad_leaf_modules():
    with pytest.raises(ValueError, match=r"'gray_nett' is not a submodule.*'gray_net'"):
        trace(PMR(), leaf_modules=["gray_nett"])
    with pytest.raises(TypeError, match=r"leaf_modules must hold nn.Module classes"):
        trace(PMR(), leaf_modules=[3])


def test_graph_module_returned_as_is():
    gm = fx.symbolic_trace(PMR())
    assert trace(gm) is gm


def test_shares_parameters_and_keeps_training_flag():
    model = PMR().eval()
    gm = trace(model)
    assert gm.gray_net.fc.weight is model.gray_net.fc.weight
    assert not gm.training
    assert gm.state_dict().keys() == model.state_dict().keys()


def test_concrete_args_and_autowrap():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, double: bool = False):
            y = self.fc(x)
            return y * 2 if double else y

    gm = trace(Flag(), concrete_args={"double": True})
    assert any(n.target.__name__ == "mul" for n in gm.graph.nodes if n.op == "call_function")

    gm = trace(Counting(), autowrap_functions=[count_rows])
    assert any(n.target is count_rows for n in gm.graph.nodes)
    with pytest.raises(TraceError):
        trace(Counting())


def count_rows(x):
    return x.new_full((int(x.shape[0]), 1), 1.0)


class Counting(nn.Module):
    def forward(self, x):
        return x + count_rows(x)


class DataDependentIf(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class IterateProxy(nn.Module):
    def forward(self, x):
        return torch.stack([row * 2 for row in x])


class IntOfShape(nn.Module):
    def forward(self, x):
        return x.view(int(x.shape[0]), -1)


class LenOfProxy(nn.Module):
    def forward(self, x):
        return x.view(len(x), -1)


class RangeOfShape(nn.Module):
    def forward(self, x):
        return sum(x[i] for i in range(x.shape[0]))


class Outer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Identity(), inner)

    def forward(self, x):
        return self.block(self.fc(x))


@pytest.mark.parametrize(
    "inner, why",
    [
        (DataDependentIf, r"data-dependent `if`"),
        (IterateProxy, r"iteration over a traced value"),
        (IntOfShape, r"int\(\) of a traced value"),
        (LenOfProxy, r"len\(\) of a traced tensor"),
        (RangeOfShape, r"used as a Python integer"),
    ],
)
def test_untraceable_model_message(inner, why):
    with pytest.raises(TraceError) as info:
        trace(Outer(inner()))
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert f"tracing failed in 'block.1' ({inner.__name__})" in msg
    assert "test_tracing.py:" in msg and "in forward()" in msg
    assert err.location is not None and err.location.endswith(
        str(int(err.location.rsplit(":", 1)[1]))
    )
    assert err.module_path == "block.1"
    assert "leaf_modules=['block.1']" in msg and "concrete_args=" in msg
    assert f"leaf_modules=[{inner.__name__}] to keep every {inner.__name__}" in msg
    assert __import__("re").search(why, msg)
    assert err.__cause__ is None and err.original is not None  # original kept, message first
    assert "Traceback" not in msg
    # the suggested fix works
    gm = trace(Outer(inner()), leaf_modules=["block.1"])
    assert "block_1" in {n.name for n in gm.graph.nodes}


class BuildsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return nn.AvgPool1d(1)(self.fc(x)[:, None])[:, 0]  # a module made in forward


def test_module_built_in_forward_is_a_trace_error():
    with pytest.raises(TraceError, match=r"(?s)test_tracing.py:\d+.*not an attribute of the "
                       r"model.*build that module in __init__"):
        trace(BuildsInForward())
    # inside a submodule, the public calls keep the builder as one call and say so
    model = Outer(BuildsInForward())
    with pytest.warns(UserWarning, match=r"cannot trace inside BuildsInForward"):
        (fusion,) = regbn.find_fusions(Pair(model), (torch.randn(2, 4), torch.randn(2, 4)))
    assert fusion.kind == "cat"


class Pair(nn.Module):
    def __init__(self, left: nn.Module):
        super().__init__()
        self.left, self.right = left, nn.Linear(4, 4)

    def forward(self, a, b):
        return torch.cat([self.left(a), self.right(b)], 1)
