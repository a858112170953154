"""Training mode follows the patched model: code that reads ``self.training`` behaves as in the
original model after ``patched.train()`` and ``patched.eval()``, whatever the mode at insert.

The blocks below mirror torchvision's ``StochasticDepth`` (a function wrapped for fx, so the
mode is a constant argument of one node), ``SqueezeExcitation`` and EfficientNet's ``MBConv``;
torchvision itself is not a dependency. Each patched model is compared with the same model edited
by hand, dropout seeded identically, in both modes.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import regbn

from .conftest import HandEditable

B = 8
ATOL = 1e-5


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth: drop whole rows (or the batch) with probability p."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
    return x * noise.div_(survival)


torch.fx.wrap("stochastic_depth")  # as torchvision does: one call node, `training` an argument


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


def conv_norm_act(c_in: int, c_out: int, k: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(c_out))
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, c: int, expand: int, sd_prob: float) -> None:
        super().__init__()
        wide = c * expand
        self.block = nn.Sequential(
            conv_norm_act(c, wide),
            conv_norm_act(wide, wide, 3, groups=wide),
            SqueezeExcitation(wide, max(1, c // 4)),
            conv_norm_act(wide, c, act=False),
        )
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x):
        result = self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class InlineDropPath(nn.Module):
    """Stochastic depth written inline: in eval mode the graph has none of its nodes."""

    def __init__(self, c: int, p: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.p = p

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            keep = torch.empty_like(y[:, :1, :1, :1]).bernoulli_(1 - self.p)
            y = y * keep / (1 - self.p)
        return x + y


class TwoTowers(HandEditable):
    """RGB and depth towers of MBConv blocks, fused by concat; dropout via self.training."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb_stem = conv_norm_act(3, 8, 3)
        self.depth_stem = conv_norm_act(1, 8, 3)
        self.rgb = nn.Sequential(MBConv(8, 2, 0.3), InlineDropPath(8, 0.4))
        self.depth = nn.Sequential(MBConv(8, 2, 0.5))
        self.rgb_fc = nn.Linear(8, 6)
        self.depth_fc = nn.Linear(8, 5)
        self.head = nn.Linear(11, 3)

    def forward(self, rgb, depth):
        a = self.rgb(self.rgb_stem(rgb)).mean((2, 3))
        b = self.depth(self.depth_stem(depth)).mean((2, 3))
        a = self.rgb_fc(F.dropout(a, 0.5, self.training))
        b = self.depth_fc(F.dropout(b, 0.5, self.training))
        a, b = self._rb(0, a, b)
        return self.head(torch.cat([a, b], 1))


class FunctionalDropout(HandEditable):
    """Only F.dropout(..., self.training): the two modes' graphs differ in one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(6, 5)
        self.enc_b = nn.Linear(7, 4)
        self.head = nn.Linear(9, 2)

    def forward(self, a, b):
        fa = F.dropout(torch.relu(self.enc_a(a)), 0.5, self.training)
        fb = torch.relu(self.enc_b(b))
        fa, fb = self._rb(0, fa, fb)
        return self.head(torch.cat([fa, fb], 1))


class NoModeCode(HandEditable):
    """nn.Dropout and BatchNorm are leaves reading their flag at run time: one graph suffices."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5))
        self.enc_b = nn.Linear(7, 4)
        self.head = nn.Linear(9, 2)

    def forward(self, a, b):
        fa, fb = self._rb(0, self.enc_a(a), self.enc_b(b))
        return self.head(torch.cat([fa, fb], 1))


class ModeConstant(HandEditable):
    """A tensor made in forward from self.training: both graphs alike, their constants not."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(6, 5)
        self.enc_b = nn.Linear(7, 4)
        self.head = nn.Linear(9, 2)

    def forward(self, a, b):
        scale = torch.tensor(2.0 if self.training else 0.5)
        fa, fb = self._rb(0, self.enc_a(a) * scale, self.enc_b(b))
        return self.head(torch.cat([fa, fb], 1))


def _towers_inputs():
    return (torch.randn(B, 3, 8, 8), torch.randn(B, 1, 8, 8))


def _linear_inputs():
    return (torch.randn(B, 6), torch.randn(B, 7))


MODELS = {
    "two_towers": (TwoTowers, _towers_inputs, [("rgb_fc", "depth_fc")]),
    "functional_dropout": (FunctionalDropout, _linear_inputs, [("dropout", "relu_1")]),
    "no_mode_code": (NoModeCode, _linear_inputs, [("enc_a", "enc_b")]),
    "mode_constant": (ModeConstant, _linear_inputs, [("mul", "enc_b")]),
}


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _hand(model: HandEditable, patched: fx.GraphModule) -> HandEditable:
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    return hand


def _run(model: nn.Module, inputs, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(*inputs)


def _check_both_modes(patched: fx.GraphModule, hand: nn.Module, inputs) -> None:
    """Train, then eval: the patched model and the hand edit agree step by step."""
    for training, seed in ((True, 1), (True, 2), (False, 3), (True, 4), (False, 5)):
        patched.train(training)
        hand.train(training)
        assert patched.training is training
        got, want = _run(patched, inputs, seed), _run(hand, inputs, seed)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("at_insert", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_follows_train_and_eval_like_a_hand_edit(name: str, at_insert: str):
    make, inputs_fn, pairs = MODELS[name]
    model = make()
    model.train(at_insert == "train")
    if name == "two_towers":
        model.rgb_stem.train(at_insert != "train")  # mixed flags must come back as they were
    flags = _flags(model)
    patched = regbn.insert(model, pairs, inputs_fn())
    hand = _hand(model, patched)
    assert _flags(model) == flags  # the caller's model keeps its mode
    assert patched.training is model.training
    assert isinstance(patched, type(model)) and not isinstance(patched, fx.GraphModule)
    graphs = patched.mode_graphs  # one graph per mode only where the code reads self.training
    assert (graphs[True] is not graphs[False]) is (name != "no_mode_code")
    _check_both_modes(patched, hand, inputs_fn())


def test_eval_is_deterministic_and_train_drops_out():
    model = TwoTowers().train()
    patched = regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
    x = _towers_inputs()
    patched.eval()
    with torch.no_grad():
        assert torch.equal(_run(patched, x, 1), _run(patched, x, 2))
    eval_model = TwoTowers().eval()
    patched_eval = regbn.insert(eval_model, [("rgb_fc", "depth_fc")], _towers_inputs())
    patched_eval.train()
    with torch.no_grad():
        assert not torch.equal(_run(patched_eval, x, 1), _run(patched_eval, x, 2))


def test_layers_and_state_dict_shared_between_modes():
    model = TwoTowers()
    patched = regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
    graphs = patched.mode_graphs
    assert not regbn.fx.tracing.same_graph(graphs[True], graphs[False])
    for graph in graphs.values():
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == "regbn_0"]
        assert len(calls) == 1
    keys = list(patched.state_dict())  # no key twice, no copy of a module for the eval graph
    assert set(keys) == set(model.state_dict()) | {k for k in keys if k.startswith("regbn_0.")}
    assert [k for k in keys if k.startswith("regbn_0.")]
    assert sum(isinstance(m, regbn.RegBN) for m in patched.modules()) == 1
    # what re-tracing sees is the current mode's graph
    patched.eval()
    assert "bernoulli_" not in patched.code
    patched.train()
    assert "bernoulli_" in patched.code


def test_names_resolve_in_the_training_graph():
    model = TwoTowers().eval()
    patched = regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
    train_only = next(n.name for n in patched.mode_graphs[True].nodes if "bernoulli" in n.name)
    with pytest.raises(ValueError, match=rf"{train_only}.*training mode only.*enclosing module"):
        regbn.insert(model, [(f"node:{train_only}", "depth_fc")], _towers_inputs())


def test_deepcopy_pickle_remove_and_insert_again_keep_both_modes():
    model = TwoTowers().eval()
    patched = regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
    x = _towers_inputs()
    for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        assert isinstance(clone, TwoTowers)
        assert clone.mode_graphs[True] is not clone.mode_graphs[False]
        assert clone.state_dict().keys() == patched.state_dict().keys()
        _check_both_modes(clone, _hand(model, clone), x)
    restored = regbn.remove(patched)
    # the model's own class and forward again: both modes as the model has them
    assert type(restored) is TwoTowers and not hasattr(restored, "regbn_0")
    _check_both_modes(restored, copy.deepcopy(model), x)
    with pytest.warns(UserWarning, match=r"already holds RegBN layers \['regbn_0'\]"):
        twice = regbn.insert(patched, [("depth_fc", "rgb_fc")], x)
    assert isinstance(twice, TwoTowers) and hasattr(twice, "regbn_1")
    for graph in twice.mode_graphs.values():
        targets = {n.target for n in graph.nodes if n.op == "call_module"}
        assert {"regbn_0", "regbn_1"} <= targets


def test_graph_module_input_not_mutated_by_insert_or_inspect():
    model = FunctionalDropout().eval()
    gm = regbn.fx.trace(model)
    code, meta = gm.code, [dict(n.meta) for n in gm.graph.nodes]
    flags = _flags(gm)
    regbn.insert(gm, [("dropout", "relu_1")], _linear_inputs())
    regbn.inspect(gm, _linear_inputs())
    assert gm.code == code and [dict(n.meta) for n in gm.graph.nodes] == meta
    assert _flags(gm) == flags


def test_patched_input_not_mutated_by_insert_or_inspect():
    patched = regbn.insert(TwoTowers().eval(), [("rgb_fc", "depth_fc")], _towers_inputs())
    graphs = patched.mode_graphs
    before = {m: [dict(n.meta) for n in g.nodes] for m, g in graphs.items()}
    code, flags = patched.code, _flags(patched)
    with pytest.warns(UserWarning, match="already holds"):
        regbn.insert(patched, [("rgb_fc", "depth_fc")], _towers_inputs())
    regbn.inspect(patched, _towers_inputs())
    assert patched.mode_graphs == graphs and patched.graph is graphs[False]
    assert {m: [dict(n.meta) for n in g.nodes] for m, g in graphs.items()} == before
    assert patched.code == code and _flags(patched) == flags


def test_tracing_leaves_no_tensor_constant_on_the_model():
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y) + torch.arange(4)

    model = Positions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = regbn.insert(model, [("a", "b")], (torch.randn(B, 4), torch.randn(B, 4)))
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]
    graphs = patched.mode_graphs
    assert graphs[True] is graphs[False]  # both traces name the constant alike


def test_mixed_modes_with_mode_dependent_code_warn():
    model = TwoTowers().train()
    model.rgb[1].eval()  # InlineDropPath, traced through: its branch follows the model's mode
    with pytest.warns(UserWarning, match=r"training mode but \['rgb.1'\] are not.*patched.eval"):
        regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
    model.rgb[1].train()
    model.rgb_stem.eval()  # leaves (BatchNorm) read their own flag at run time: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regbn.insert(model, [("rgb_fc", "depth_fc")], _towers_inputs())
