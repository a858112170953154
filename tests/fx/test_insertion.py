from __future__ import annotations

import copy
import io
import math
import os
import pickle
import re
import shutil

import pytest
import torch
import torch.fx as fx
from torch import nn

import regbn
from regbn.fx import insert, remove

from .conftest import CASES, PMR, B, Case, HandEditable, LateConcat, ThreeModal

ATOL = 1e-5


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _layers(patched: fx.GraphModule) -> list[nn.Module]:
    n = len([m for m in dict(patched.named_children()) if re.fullmatch(r"regbn_\d+", m)])
    return [getattr(patched, f"regbn_{i}") for i in range(n)]


def _hand_edited(case: Case, model: nn.Module, patched: fx.GraphModule) -> nn.Module:
    """The same model with the same RegBN layers written into forward by hand."""
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList(copy.deepcopy(layer) for layer in _layers(patched))
    return hand


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 0.5).square().mean()


# --------------------------------------------------------------------------- against hand edits


def test_patched_equals_hand_edited(case: Case):
    model = case.make()
    inputs = case.inputs()
    patched = insert(model, case.pairs, inputs)
    hand = _hand_edited(case, model, patched)
    assert isinstance(patched, type(model)) and not isinstance(patched, fx.GraphModule)
    assert len(_layers(patched)) == len(case.pairs)
    for layer in _layers(patched):
        assert isinstance(layer, regbn.RegBN)

    opt_p = torch.optim.SGD(patched.parameters(), lr=0.05)
    opt_h = torch.optim.SGD(hand.parameters(), lr=0.05)
    for _ in range(3):
        batch = case.inputs()
        out_p, out_h = case.call(patched, batch), case.call(hand, batch)
        torch.testing.assert_close(out_p, out_h, atol=ATOL, rtol=1e-4)
        for opt, out in ((opt_p, out_p), (opt_h, out_h)):
            opt.zero_grad()
            _loss(out).backward()
            opt.step()
    for mine, theirs in zip(_layers(patched), hand.hand, strict=True):
        assert int(mine.num_batches_tracked) == 3
        torch.testing.assert_close(mine.W, theirs.W, atol=ATOL, rtol=1e-4)
        assert mine.W.abs().sum() > 0
    patched.eval()
    hand.eval()
    batch = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            case.call(patched, batch), case.call(hand, batch), atol=ATOL, rtol=1e-4
        )


def test_backward_reaches_every_weight(case: Case):
    model = case.make()
    inputs = case.inputs()
    _loss(case.call(model, inputs)).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    patched = insert(model, case.pairs, inputs)
    _loss(case.call(patched, inputs)).backward()
    got = {n for n, p in patched.named_parameters() if p.grad is not None}
    assert reached <= got


def test_model_left_unchanged(case: Case):
    model = case.make()
    before = _state(model)
    forward = model.forward
    modules = dict(model.named_modules())
    flags = {n: m.training for n, m in model.named_modules()}
    inputs = case.inputs()
    patched = insert(model, case.pairs, inputs)
    assert _same_state(before, _state(model))
    assert model.forward == forward
    assert dict(model.named_modules()) == modules
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert not any(name.startswith("regbn_") for name in modules)
    assert patched is not model


def test_state_dict_keys_and_values_kept(case: Case):
    model = case.make()
    patched = insert(model, case.pairs, case.inputs())
    original, mine = model.state_dict(), patched.state_dict()
    for key, value in original.items():
        assert key in mine, key
        assert torch.equal(value, mine[key])
    extra = {k.split(".")[0] for k in mine.keys() - original.keys()}
    assert extra == {f"regbn_{i}" for i in range(len(case.pairs))}
    # parameters are shared, not copied
    assert patched.get_parameter(next(iter(dict(model.named_parameters())))) is next(
        iter(model.parameters())
    )


def test_checkpoint_reloads_into_fresh_insert_strict(case: Case):
    model = case.make()
    patched = insert(model, case.pairs, case.inputs())
    for _ in range(2):
        case.call(patched, case.inputs())
    buf = io.BytesIO()
    torch.save(patched.state_dict(), buf)
    buf.seek(0)
    fresh = insert(case.make(), case.pairs, case.inputs())
    fresh.load_state_dict(torch.load(buf), strict=True)
    patched.eval()
    fresh.eval()
    batch = case.inputs()
    with torch.no_grad():
        assert torch.equal(case.call(patched, batch), case.call(fresh, batch))


def test_deepcopy_and_pickle(case: Case):
    model = case.make()
    patched = insert(model, case.pairs, case.inputs())
    patched.eval()
    batch = case.inputs()
    with torch.no_grad():
        expected = case.call(patched, batch)
        for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
            assert torch.equal(case.call(clone, batch), expected)
            assert clone.state_dict().keys() == patched.state_dict().keys()


def test_remove_restores_the_model(case: Case):
    model = case.make()
    model.eval()
    patched = insert(model, case.pairs, case.inputs())
    restored = remove(patched)
    assert not [m for m in dict(restored.named_children()) if m.startswith("regbn_")]
    assert "regbn_0" in dict(patched.named_children())  # remove does not touch its argument
    batch = case.inputs()
    with torch.no_grad():
        assert torch.equal(case.call(restored, batch), case.call(model, batch))
    assert restored.state_dict().keys() == model.state_dict().keys()
    # provenance meta does not survive pickling; remove still finds the layers
    again = remove(pickle.loads(pickle.dumps(patched)))
    assert not [m for m in dict(again.named_children()) if m.startswith("regbn_")]
    with torch.no_grad():
        assert torch.equal(case.call(again, batch), case.call(model, batch))


def test_public_exports():
    assert regbn.insert is insert and regbn.remove is remove
    assert regbn.find_fusions is regbn.fx.find_fusions


# --------------------------------------------------------------------------- behaviour


def test_training_mode_preserved_and_propagates():
    model = LateConcat().eval()
    patched = insert(model, [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12)))
    assert not patched.training and not patched.regbn_0.training
    patched.train()
    assert patched.regbn_0.training
    model2 = LateConcat()
    assert insert(model2, [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12))).training


def test_copy_true_is_independent():
    model = LateConcat()
    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    patched = insert(model, [("enc_a", "enc_b")], inputs, copy=True)
    with torch.no_grad():
        patched.enc_a.weight.add_(1.0)
    assert not torch.equal(patched.enc_a.weight, model.enc_a.weight)
    shared = insert(model, [("enc_a", "enc_b")], inputs)
    assert shared.enc_a.weight is model.enc_a.weight


def test_regbn_kwargs_reach_every_layer():
    model = ThreeModal()
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    patched = insert(
        model,
        [("enc_a", "enc_c"), ("enc_b", "enc_c")],
        inputs,
        momentum=0.5,
        lambda_rule="official",
        normalize_output=False,
    )
    for layer in _layers(patched):
        assert layer.momentum == 0.5 and layer.lambda_rule == "official"
        assert not layer.normalize_output
    assert patched.regbn_0.f_shape == (4,) and patched.regbn_0.g_shape == (4,)


def test_layers_named_in_order_of_pairs_and_chained():
    model = ThreeModal()
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    patched = insert(model, [("enc_b", "enc_c"), ("enc_a", "enc_c")], inputs)
    calls = {n.target: n for n in patched.graph.nodes if n.op == "call_module"}
    assert [a.name for a in calls["regbn_0"].args] == ["enc_b", "enc_c"]
    # the second pair reads c in its normalised form: regbn_0's second output
    g_arg = calls["regbn_1"].args[1]
    assert g_arg.target is __import__("operator").getitem and g_arg.args == (calls["regbn_0"], 1)


def test_prefixes_and_input_names():
    model = PMR()
    inputs = (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28))
    a = insert(model, [("input:gray", "input:colored")], inputs)
    b = insert(model, [("module:gray_net.fc", "node:colored_net_fc")], inputs)
    assert a.regbn_0.f_shape == (1, 28, 28) and a.regbn_0.g_shape == (3, 28, 28)
    assert b.regbn_0.f_shape == (16,)


class ThreeWay(HandEditable):
    """Three modalities at one cat: one layer per pair, the earlier operand normalised with
    respect to the later, in operand order (later pairs read what earlier pairs normalised)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a, self.enc_b, self.enc_c = nn.Linear(5, 4), nn.Linear(6, 4), nn.Linear(7, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, a, b, c):
        fa, fb, fc = self.enc_a(a), self.enc_b(b), self.enc_c(c)
        fa, fb = self._rb(0, fa, fb)
        fa, fc = self._rb(1, fa, fc)
        fb, fc = self._rb(2, fb, fc)
        return self.head(torch.cat([fa, fb, fc], 1))


def test_pairs_auto_uses_find_fusions():
    model = ThreeWay()
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
    fusions = regbn.fx.find_fusions(model, inputs)
    assert [f.pair for f in fusions] == [("enc_a", "enc_b"), ("enc_a", "enc_c"), ("enc_b", "enc_c")]
    assert {f.name for f in fusions} == {"cat"}  # one fusion, one record per pair
    patched = insert(model, "auto", inputs)
    assert len(_layers(patched)) == 3
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList(copy.deepcopy(layer) for layer in _layers(patched))
    for training in (True, True, False):
        patched.train(training)
        hand.train(training)
        x = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))
        torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)


def test_graph_module_accepted_and_not_mutated():
    model = LateConcat()
    gm = fx.symbolic_trace(model)
    code = gm.code
    patched = insert(gm, [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12)))
    assert gm.code == code and "regbn_0" not in dict(gm.named_children())
    assert "regbn_0" in patched.code


def test_input_shapes_on_meta_model():
    with torch.device("meta"):
        model = PMR()
    patched = insert(
        model, [("gray_net.fc", "colored_net.fc")], input_shapes=[(B, 1, 28, 28), (B, 3, 28, 28)]
    )
    assert patched.regbn_0.W.device.type == "meta"
    assert patched.regbn_0.W.shape == (16, 16)


def test_float64_model_gets_float64_layer():
    model = LateConcat().double()
    inputs = (torch.randn(B, 10, dtype=torch.float64), torch.randn(B, 12, dtype=torch.float64))
    patched = insert(model, [("enc_a", "enc_b")], inputs)
    assert patched.regbn_0.W.dtype == torch.float64
    assert patched(*inputs).dtype == torch.float64


def test_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    model = PMR()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28))
        loss = nn.functional.cross_entropy(model(*x), torch.randint(0, 10, (B,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "pretrained.pt")
    saved = torch.load(tmp_path / "pretrained.pt")
    rebuilt = PMR()
    rebuilt.load_state_dict(saved)
    patched = insert(
        rebuilt,
        [("gray_net.fc", "colored_net.fc")],
        (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28)),
    )
    state = patched.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # an original checkpoint loads into the patched model (strict=False: the layer is new)
    missing, unexpected = patched.load_state_dict(saved, strict=False)
    assert not unexpected and all(k.startswith("regbn_0.") for k in missing)
    # BatchNorm statistics were not disturbed by shape propagation
    assert int(patched.gray_net.bn.num_batches_tracked) == 3


def test_unused_parameters_keep_their_keys():
    class WithUnused(LateConcat):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0))
            self.register_buffer("scratch", torch.zeros(1), persistent=False)

    model = WithUnused()
    patched = insert(model, [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12)))
    keys = patched.state_dict().keys()
    assert {"spare.weight", "spare.bias", "table"} <= keys
    assert "scratch" not in keys
    fresh = insert(WithUnused(), [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12)))
    fresh.load_state_dict(patched.state_dict(), strict=True)


def _compiled_matches(backend: str) -> None:
    model = LateConcat()
    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    patched = insert(model, [("relu", "relu_1")], inputs)
    patched(*inputs)  # one training batch so W is non-zero
    patched.eval()
    compiled = torch.compile(patched, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), patched(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_eval():
    # The default backend (inductor) builds C++: ~30 s the first time on two cores, ~3 s with
    # its cache warm. REGBN_FAST_COMPILE_TEST=1 swaps in aot_eager (dynamo + AOTAutograd only).
    if os.environ.get("REGBN_FAST_COMPILE_TEST"):
        _compiled_matches("aot_eager")
        return
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's inductor backend needs a C compiler; none on this machine")
    _compiled_matches("inductor")


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def pmr():
    return PMR(), (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28))


BAD_PAIRS = [
    (
        [("gray_net.fcc", "colored_net.fc")],
        r"pair 0: 'gray_net.fcc' is not a tensor of this model; did you mean 'gray_net.fc'.*"
        r"Run regbn\.inspect\(model, \.\.\.\) to list them",
    ),
    (
        [("gray_net.fc", "colored_net.fc"), ("gray_net.fc", "nowhere")],
        r"pair 1: 'nowhere' is not a tensor of this model",
    ),
    (
        [("gray", "gray_net.fc")],
        r"pair 0: 'gray_net\.fc' is computed from 'gray' \(gray -> .* -> gray_net_fc\).*cycle",
    ),
    ([("gray", "input:gray")], r"pair 0: f and g are the same tensor"),
    ([("gray_net.fc", "head")], r"pair 0: 'head' is computed from 'gray_net.fc'"),
    ([("module:gray", "colored")], r"pair 0: 'module:gray' is not a tensor of this model"),
    ([("gray_net.bn.weight", "colored")], r"'gray_net.bn.weight' is not a tensor of this model"),
]


@pytest.mark.parametrize("pairs, message", BAD_PAIRS)
def test_bad_pairs(pmr, pairs, message):
    model, inputs = pmr
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        insert(model, pairs, inputs)
    assert _same_state(before, _state(model))
    assert not any(n.startswith("regbn_") for n, _ in model.named_modules())


class Ambiguous(nn.Module):
    """forward(self, tab) with a module self.tab: 'tab' names two tensors."""

    def __init__(self):
        super().__init__()
        self.tab = nn.Linear(4, 4)
        self.img = nn.Linear(6, 4)
        self.shared = nn.Linear(4, 4)
        self.split = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, tab, image):
        t = self.tab(tab)
        i = self.img(image)
        s1, s2 = self.shared(t), self.shared(i)  # one module, two calls
        a, _b = self.split(s1).chunk(2, dim=1)
        return torch.cat([s1, s2, a], 1)


def test_ambiguous_name_lists_candidates_and_prefix_resolves():
    model = Ambiguous()
    inputs = (torch.randn(B, 4), torch.randn(B, 6))
    with pytest.raises(ValueError, match=r"'tab' is ambiguous.*'input:tab'.*'module:tab'"):
        insert(model, [("tab", "img")], inputs)
    patched = insert(model, [("module:tab", "img")], inputs)
    assert patched.regbn_0.f_shape == (4,)
    patched = insert(model, [("input:tab", "input:image")], inputs)
    assert patched.regbn_0.g_shape == (6,)


def test_module_called_twice_is_ambiguous():
    model = Ambiguous()
    inputs = (torch.randn(B, 4), torch.randn(B, 6))
    with pytest.raises(ValueError, match=r"'shared' is ambiguous.*call 0.*node:shared\b.*call 1"):
        insert(model, [("shared", "img")], inputs)
    patched = insert(model, [("node:shared", "node:shared_1")], inputs)
    patched(*inputs)


@pytest.mark.parametrize(
    "pairs, exc, message",
    [
        ("everything", ValueError, r"pairs must be 'auto' or a list of \(f, g\) name pairs"),
        ([], ValueError, r"pairs is empty"),
        ([("tab",)], TypeError, r"pair 0: each pair must be two names \(f, g\).*got \('tab',\)"),
        ([("tab", 3)], TypeError, r"pair 0: each pair must be two names"),
        (42, TypeError, r"pairs must be 'auto' or a list"),
        ([("unused", "img")], ValueError, r"'unused' is not a tensor.*forward never calls it"),
        ([("chunk", "img")], ValueError, r"pair 0: 'chunk' \(node chunk\) is a tuple.*getitem"),
    ],
)
def test_bad_pair_arguments(pairs, exc, message):
    model = Ambiguous()
    with pytest.raises(exc, match=message):
        insert(model, pairs, (torch.randn(B, 4), torch.randn(B, 6)))


def test_non_tensor_and_bad_shapes_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(6, 4)

        def forward(self, x, y, ids):
            pair = (self.a(x), self.b(y))
            return pair[0].sum(1) + pair[1].sum(1) + ids.sum(), x.shape

    model = Odd()
    inputs = (torch.randn(B, 4), torch.randn(B, 6), torch.arange(B))
    with pytest.raises(ValueError, match=r"'getattr_1' \(node getattr_1\) is not a tensor"):
        insert(model, [("getattr_1", "b")], inputs)
    with pytest.raises(ValueError, match=r"shaped \(batch, channels, \.\.\.\); 'sum_1' has shape"):
        insert(model, [("sum_1", "b")], inputs)
    with pytest.raises(ValueError, match=r"'ids' holds torch.int64 values"):
        insert(model, [("a", "ids")], inputs)

    class TwoHeads(nn.Module):
        def forward(self, x, y):
            return x * 2, y * 2

    with pytest.raises(ValueError, match=r"batch sizes differ: 'mul' has shape \(8, 4\)"):
        insert(TwoHeads(), [("mul", "mul_1")], {"x": torch.randn(B, 4), "y": torch.randn(5, 6)})


def test_missing_inputs_and_shape_failure():
    model = LateConcat()
    with pytest.raises(ValueError, match=r"needs example_inputs .* or input_shapes"):
        insert(model, [("relu", "relu_1")])
    with pytest.raises(ValueError, match=r"cannot infer RegBN dims.*node 'enc_a'"):
        insert(model, [("relu", "relu_1")], input_shapes=[(B, 11), (B, 12)])


def test_auto_without_fusion():
    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + x

    with pytest.raises(ValueError, match=r"pairs='auto': found no fusion"):
        insert(Single(), "auto", (torch.randn(B, 3),))


def test_bad_regbn_kwargs_leave_model_untouched(pmr):
    model, inputs = pmr
    before = _state(model)
    with pytest.raises(TypeError, match=r"regbn_kwargs"):
        insert(model, [("gray_net.fc", "colored_net.fc")], inputs, bogus=1)
    with pytest.raises(ValueError, match=r"max_projection_bytes"):
        insert(model, [("gray", "colored")], inputs, max_projection_bytes=1000)
    assert _same_state(before, _state(model))


def test_untraceable_model_in_insert():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x, y):
            if x.mean() > 0:
                return self.a(x) + y
            return y

    with pytest.raises(
        ValueError,
        match=r"(?s)tracing failed in the top-level forward of Branchy.*"
        r"test_insertion.py:\d+.*data-dependent.*leaf_modules.*concrete_args",
    ):
        insert(Branchy(), [("x", "y")], (torch.randn(B, 3), torch.randn(B, 3)))


def test_all_cases_are_covered():
    assert len(CASES) >= 10


class Specialised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(5, 4)

    def forward(self, input, y, double: bool = False):  # noqa: A002 - the name is the point
        h = self.a(input) + self.b(y)
        return h * 2 if double else h


def test_concrete_args_and_renamed_inputs():
    inputs = (torch.randn(B, 3), torch.randn(B, 5))
    patched = insert(Specialised(), [("a", "b")], inputs, concrete_args={"double": True})
    assert patched(*inputs).shape == (B, 4)  # the specialised argument defaults to its value
    # fx names the placeholder 'input_1'; the argument name 'input' still resolves
    patched = insert(
        Specialised(),
        [("input", "y")],
        {"input": inputs[0], "y": inputs[1]},
        concrete_args={"double": False},
    )
    assert patched.regbn_0.f_shape == (3,)


def test_container_input_suggests_its_entries():
    from .conftest import DictInput

    inputs = {"batch": {"audio": torch.randn(B, 20), "image": torch.randn(B, 3, 5, 5)}}
    with pytest.raises(ValueError, match=r"'batch' \(node batch\) is a dict.*\"batch\['audio'\]\""):
        insert(DictInput(), [("batch", "audio_enc")], inputs)


def test_name_inside_a_leaf_module():
    from .conftest import ConvBranch

    model = PMR()
    inputs = (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28))
    with pytest.raises(ValueError, match=r"'gray_net.fc' .*inside 'gray_net', which is traced as"):
        insert(model, [("gray_net.fc", "colored_net")], inputs, leaf_modules=[ConvBranch])
    patched = insert(model, [("gray_net", "colored_net")], inputs, leaf_modules=[ConvBranch])
    assert patched.regbn_0.f_shape == (16,)


# --------------------------------------------------------------------------- arguments


class TokensAndImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.image = nn.Linear(9, 6)
        self.head = nn.Linear(12, 2)

    def forward(self, input_ids, pixels):
        t = self.embed(input_ids).mean(1)
        return self.head(torch.cat([t, self.image(pixels)], 1))


def test_input_dtypes_describe_token_ids():
    model = TokensAndImage()
    patched = insert(
        model,
        [("mean", "image")],
        input_shapes=[(B, 5), (B, 9)],
        input_dtypes=[torch.int64, None],
    )
    assert patched.regbn_0.f_shape == (6,) and patched.regbn_0.g_shape == (6,)
    ids = torch.randint(0, 50, (B, 5))
    assert patched(ids, torch.randn(B, 9)).shape == (B, 2)


def test_modalities_reach_the_auto_pairs():
    model = ThreeModal()
    inputs = (torch.randn(B, 5), torch.randn(B, 6), torch.randn(B, 7))

    def layer_inputs(**kwargs) -> list[str]:
        patched = insert(model, "auto", inputs, **kwargs)
        call = next(n for n in patched.graph.nodes if n.target == "regbn_0")
        return [a.name for a in call.args]

    # a and b grouped into one modality: the concat fuses {a, b} with {c}
    assert layer_inputs(modalities={"ab": ["a", "b"], "c": ["c"]}) == ["enc_a", "enc_c"]
    assert layer_inputs() == ["enc_a", "enc_b"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"momentun": 0.1}, TypeError, r"argument 'momentun'; did you mean 'momentum'\?"),
        ({"input_shape": [(B, 10)]}, TypeError, r"'input_shape'; did you mean 'input_shapes'"),
        ({"f_num_channels": 3}, TypeError, r"'f_num_channels' is inferred from the shapes"),
    ],
)
def test_unknown_keyword_is_a_type_error_naming_it(kwargs, exc, message):
    model = LateConcat()
    before = _state(model)
    with pytest.raises(exc, match=message):
        insert(model, [("relu", "relu_1")], (torch.randn(B, 10), torch.randn(B, 12)), **kwargs)
    assert _same_state(before, _state(model))


class KeywordsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, **inputs):
        return self.a(inputs["x"]) + self.b(inputs["y"])


class StarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, *xs):
        return self.a(xs[0]) + self.b(xs[1])


def test_var_arguments_get_a_wrapper_as_the_fix():
    x, y = torch.randn(B, 4), torch.randn(B, 5)
    # forward(**inputs) fed a dict: traced with exactly the example's keys, nothing to add
    model = KeywordsOnly()
    patched = insert(model, [("a", "b")], {"x": x, "y": y})
    assert isinstance(patched, KeywordsOnly) and patched(x=x, y=y).shape == (B, 3)
    assert [n.name for n in patched.graph.nodes if n.op == "placeholder"] == ["x", "y"]
    with pytest.raises(ValueError, match=r"(?s)takes \*xs.*class Named"):
        insert(StarArgs(), [("a", "b")], (x, y))

    class Named(nn.Module):  # the fix the message shows
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return self.model(x=x, y=y)

    patched = insert(Named(KeywordsOnly()), [("model.a", "model.b")], (x, y))
    assert patched(x, y).shape == (B, 3)


# --------------------------------------------------------------------------- layers already there


class WithOwnRegBN(nn.Module):
    """A model written with a RegBN layer of its own, named like insert's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a, self.enc_b = nn.Linear(10, 6), nn.Linear(12, 5)
        self.regbn_0 = regbn.RegBN(6, 5, [], [])
        self.head = nn.Linear(11, 3)

    def forward(self, a, b):
        fa, fb = self.regbn_0(torch.relu(self.enc_a(a)), torch.relu(self.enc_b(b)))
        return self.head(torch.cat([fa, fb], 1))


def test_remove_keeps_the_models_own_regbn_and_warns():
    model = WithOwnRegBN().eval()
    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    with pytest.warns(UserWarning, match=r"already holds RegBN layers \['regbn_0'\]"):
        patched = insert(model, [("enc_a", "enc_b")], inputs)
    assert "regbn_1" in dict(patched.named_children()) and patched.regbn_0 is model.regbn_0
    with pytest.warns(UserWarning, match=r"remove: kept the RegBN layers \['regbn_0'\]"):
        restored = remove(patched)
    assert "regbn_1" not in dict(restored.named_children()) and restored.regbn_0 is model.regbn_0
    with torch.no_grad():
        assert torch.equal(restored(*inputs), model(*inputs))
    for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        with pytest.warns(UserWarning, match=r"kept the RegBN layers \['regbn_0'\]"):
            assert "regbn_1" not in dict(remove(clone).named_children())


def test_insert_on_a_patched_model_warns_and_adds_after():
    model = LateConcat()
    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    patched = insert(model, [("relu", "relu_1")], inputs)
    with pytest.warns(UserWarning, match=r"already holds RegBN layers \['regbn_0'\]"):
        twice = insert(patched, [("enc_a", "enc_b")], inputs)
    assert {"regbn_0", "regbn_1"} <= set(dict(twice.named_children()))
    once = remove(twice)
    assert not [m for m in dict(once.named_children()) if m.startswith("regbn_")]


# --------------------------------------------------------------------------- more graph shapes
class _UsesGTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        f, g = self.a(x), self.b(y)
        return torch.cat([f, g], 1) + torch.cat([g, g], 1)


def test_every_later_use_reads_the_normalised_pair():
    x = (torch.randn(4, 3), torch.randn(4, 3))
    model = _UsesGTwice()
    patched = insert(model, [("a", "b")], x)
    f_r, g_out = regbn.RegBN(3, 3, [], [])(model.a(x[0]), model.b(x[1]))
    want = torch.cat([f_r, g_out], 1) + torch.cat([g_out, g_out], 1)
    torch.testing.assert_close(patched(*x), want)


class _GFeedsF(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        g = self.b(y)
        f = self.a(g + x)
        return torch.cat([f, g], 1)


def test_g_feeding_f_is_a_valid_pair():
    model = _GFeedsF()
    x = (torch.randn(4, 3), torch.randn(4, 3))
    patched = insert(model, [("a", "b")], x)
    g = model.b(x[1])
    f_r, g_out = regbn.RegBN(3, 3, [], [])(model.a(g + x[0]), g)
    torch.testing.assert_close(patched(*x), torch.cat([f_r, g_out], 1))


def test_a_graph_module_from_a_custom_tracer_is_used_as_it_is():
    model = PMR()
    inputs = (torch.randn(B, 1, 28, 28), torch.randn(B, 3, 28, 28))

    class WholeBranches(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return qualname in ("gray_net", "colored_net") or super().is_leaf_module(m, qualname)

    custom = fx.GraphModule(model, WholeBranches().trace(model))
    patched = insert(custom, [("gray_net", "colored_net")], inputs)
    targets = [n.target for n in patched.graph.nodes if n.op == "call_module"]
    assert "gray_net" in targets and not any(str(t).startswith("gray_net.") for t in targets)
    assert patched(*inputs).shape == model(*inputs).shape


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(2, 2)
        self.b.weight = self.a.weight  # tied
        self.bn = nn.BatchNorm1d(3)
        self.p = nn.Parameter(torch.zeros(3))

    def forward(self, x, y):
        return torch.cat([self.bn(self.a(x)) + self.p, self.b(y)], 1)


def test_tied_weights_keep_their_keys_through_insert_and_remove():
    model = _Tied()
    x = (torch.randn(4, 3), torch.randn(4, 3))
    original = model.state_dict()
    for copy_model in (False, True):
        patched = insert(model, [("bn", "b")], x, copy=copy_model)
        mine = patched.state_dict()
        assert all(k in mine and torch.equal(mine[k], v) for k, v in original.items())
        assert set(remove(patched).state_dict()) == set(original)
    assert int(model.bn.num_batches_tracked) == 0  # insert ran nothing on the caller's buffers


# ---------------------------------------------------------------------------------------------
# min_dependence: RegBN only where the branches depend
# ---------------------------------------------------------------------------------------------


class TwoFusions(nn.Module):
    """x meets y (dependent in the batches below) at add, and z (independent) at mul."""

    def __init__(self) -> None:
        super().__init__()
        self.fx_a, self.fx_b = nn.Linear(6, 4), nn.Linear(6, 4)
        self.fy, self.fz = nn.Linear(4, 4), nn.Linear(3, 4)

    def forward(self, x, y, z):
        return self.fx_a(x) + self.fy(y), self.fx_b(x) * self.fz(z)


def _three_batches(n_batches: int = 3, size: int = 64) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 6, generator=gen)
        y = x[:, :4] + 0.1 * torch.randn(size, 4, generator=gen)
        out.append((x, y, torch.randn(size, 3, generator=gen)))
    return out


def test_min_dependence_skips_an_independent_pair_and_keeps_a_dependent_one():
    torch.manual_seed(0)
    model, batches = TwoFusions(), _three_batches()
    with pytest.warns(UserWarning, match=r"min_dependence=0\.2: skipped 1 of 2 pairs") as record:
        patched = insert(model, "auto", batches[0], batches=batches, min_dependence=0.2)
    (message,) = [str(w.message) for w in record if "min_dependence" in str(w.message)]
    assert "by 'fz'" in message and "fy'" not in message  # the independent pair, named
    assert "above -0.0" in message or "above 0.0" in message  # its number, near zero
    (layer,) = [m for m in patched.modules() if isinstance(m, regbn.RegBN)]
    call = next(n for n in patched.graph.nodes if n.op == "call_module" and n.target == "regbn_0")
    assert "fy" in {str(a.target) for a in call.args}  # the dependent pair
    out = patched(*batches[0])
    assert out[0].shape == (64, 4)
    # Explicit pairs are measured too; with none reaching the bar there is nothing to insert.
    with pytest.raises(regbn.RegBNValueError, match=r"^regbn\.insert: min_dependence=0\.5: no "):
        insert(model, [("fx_b", "fz")], batches[0], batches=batches, min_dependence=0.5)
    kept = insert(model, [("fx_a", "fy")], batches[0], batches=batches, min_dependence=0.5)
    assert sum(isinstance(m, regbn.RegBN) for m in kept.modules()) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_dependence": 0.1}, regbn.RegBNValueError, "min_dependence needs batches"),
        ({"batches": "B"}, regbn.RegBNValueError, "batches is only used to measure"),
        ({"batches": "B", "min_dependence": "x"}, regbn.RegBNTypeError, "min_dep.* a number"),
        ({"batches": "B", "min_dependence": math.nan}, regbn.RegBNValueError, "min_dep.* finite"),
        ({"batches": [(1, 2, 3)], "min_dependence": 0.1}, regbn.RegBNTypeError, "batch 0 holds"),
    ],
)
def test_min_dependence_bad_arguments(kwargs, error, match):
    batches = _three_batches(1, 8)
    kwargs = {k: batches if v == "B" else v for k, v in kwargs.items()}
    with pytest.raises(error, match=r"^regbn\.insert: " + match):
        insert(TwoFusions(), "auto", batches[0], **kwargs)


def test_errors_reach_the_caller_without_internal_chains():
    """A typo or an untraceable model shows its message under the user's own call: no chained
    torch.fx traceback, at most the one frame that re-raises it; the cause stays on .original."""
    import traceback

    from regbn.fx.tracing import TraceError

    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    with pytest.raises(ValueError, match="did you mean") as caught:
        insert(LateConcat(), [("enc_aa", "enc_b")], inputs)
    err = caught.value
    assert err.__cause__ is None and err.__suppress_context__
    frames = [f for f in traceback.extract_tb(caught.tb) if "/regbn/" in f.filename]
    assert len(frames) == 1

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError) as caught:
        regbn.inspect(Untraceable(), input_shapes=[(2, 3)])
    err = caught.value
    assert err.__cause__ is None and err.__suppress_context__
    assert isinstance(err.original, Exception) and not isinstance(err.original, TraceError)
    shown = "".join(traceback.format_exception(err))
    assert "torch/fx" not in shown and shown.count("Traceback") == 1


def test_no_fusion_hint_names_the_models_own_inputs():
    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

        def forward(self, audio, video):
            return self.a(audio), self.b(video)

    with pytest.raises(ValueError, match=r"found no fusion.*modalities=\{'m0': \['audio'\], "
                       r"'m1': \['video'\]\}") as caught:
        insert(Separate(), "auto", (torch.randn(B, 4), torch.randn(B, 3)))
    assert "input_ids" not in str(caught.value)


def test_warnings_point_at_the_callers_line():
    """insert's warnings name the line that called it, not a frame inside regbn."""
    inputs = (torch.randn(B, 10), torch.randn(B, 12))
    with pytest.warns(UserWarning, match="learnable parameters") as caught:
        insert(LateConcat(), [("enc_a", "enc_b")], inputs, affine=True)
    assert {w.filename for w in caught} == {__file__}
