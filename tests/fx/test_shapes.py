from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import regbn
from regbn.fx import ShapeFailure, propagate_shapes, trace
from regbn.fx.shapes import tensor_record

from .conftest import PMR, Case, DictInput


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...] | None]:
    return {n.name: tensor_record(n).shape for n in gm.graph.nodes}


def _as_shapes(inputs):
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape)
    if isinstance(inputs, dict):
        return {k: _as_shapes(v) for k, v in inputs.items()}
    return [_as_shapes(v) for v in inputs]


def test_real_and_fake_agree(case: Case):
    inputs = case.inputs()
    real = trace(case.make())
    assert propagate_shapes(real, inputs) is None
    fake = trace(case.make())
    assert propagate_shapes(fake, input_shapes=_as_shapes(inputs)) is None
    assert _shapes(real) == _shapes(fake)
    for node in real.graph.nodes:
        if node.op == "call_module":
            assert tensor_record(node).shape is not None or tensor_record(node).nested is not None


def test_pmr_shapes_and_dtypes():
    gm = trace(PMR())
    propagate_shapes(gm, (torch.randn(2, 1, 28, 28), torch.randn(2, 3, 28, 28)))
    shapes = _shapes(gm)
    assert shapes["gray"] == (2, 1, 28, 28)
    assert shapes["gray_net_fc"] == (2, 16)
    assert shapes["cat"] == (2, 32)
    assert all(tensor_record(n).dtype == torch.float32 for n in gm.graph.nodes if n.op != "output")


def test_real_run_changes_nothing():
    model = PMR()
    model.gray_net.bn.eval()  # a mixed training state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    running_mean = model.gray_net.bn.running_mean
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(4, 1, 28, 28), torch.randn(4, 3, 28, 28)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(model.colored_net.bn.num_batches_tracked) == 0
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.gray_net.bn.running_mean is running_mean  # the same tensor object, too


def test_fake_run_changes_nothing_and_keeps_parameters():
    model = PMR()
    weight = model.gray_net.conv.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace(model)
    propagate_shapes(gm, input_shapes=[(2, 1, 28, 28), (2, 3, 28, 28)])
    assert model.gray_net.conv.weight is weight and type(weight) is nn.Parameter
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_meta_model_with_input_shapes():
    with torch.device("meta"):
        model = PMR()
    gm = trace(model)
    assert propagate_shapes(gm, input_shapes=[(64, 1, 28, 28), (64, 3, 28, 28)]) is None
    node = next(n for n in gm.graph.nodes if n.name == "head")
    assert tensor_record(node).shape == (64, 10)
    assert tensor_record(node).device.type == "meta"


def test_dict_inputs_kwargs_and_nested_meta():
    gm = trace(DictInput())
    batch = {"audio": torch.randn(3, 20), "image": torch.randn(3, 3, 5, 5)}
    assert propagate_shapes(gm, {"batch": batch}) is None
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert tensor_record(ph).shape is None
    assert tensor_record(ph).nested == {
        "audio": ((3, 20), torch.float32),
        "image": ((3, 3, 5, 5), torch.float32),
    }
    gm2 = trace(DictInput())
    assert propagate_shapes(gm2, (batch,)) is None  # the same dict, positionally
    assert _shapes(gm) == _shapes(gm2)
    gm3 = trace(DictInput())
    spec = {"batch": {"audio": (3, 20), "image": (3, 3, 5, 5)}}
    assert propagate_shapes(gm3, input_shapes=spec) is None
    assert _shapes(gm3) == _shapes(gm)


def test_input_dtypes_and_integer_inputs():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids, x):
            return self.emb(ids).mean(1) + x

    gm = trace(Embed())
    assert (
        propagate_shapes(gm, input_shapes=[(2, 5), (2, 4)], input_dtypes=[torch.int64, None])
        is None
    )
    assert tensor_record(next(iter(gm.graph.nodes))).dtype == torch.int64
    gm = trace(Embed())
    assert propagate_shapes(gm, input_shapes=[((2, 5), "int64"), (2, 4)]) is None


def test_failure_is_reported_with_partial_meta():
    gm = trace(PMR())
    failure = propagate_shapes(gm, input_shapes=[(2, 1, 32, 32), (2, 3, 28, 28)])
    assert isinstance(failure, ShapeFailure)
    assert failure.node_name == "gray_net_fc"
    assert failure.input_shapes == ((2, 256),)
    assert "gray_net_fc" in str(failure) and "(2, 256)" in str(failure)
    shapes = _shapes(gm)
    assert shapes["flatten"] == (2, 256)  # before the failure
    assert "regbn_tensor" not in next(n for n in gm.graph.nodes if n.name == "cat").meta
    # a real run fails the same way and leaves the model intact
    model = PMR()
    gm = trace(model)
    failure = propagate_shapes(gm, (torch.randn(2, 1, 32, 32), torch.randn(2, 3, 28, 28)))
    assert failure is not None and failure.node_name == "gray_net_fc"
    assert int(model.gray_net.bn.num_batches_tracked) == 0


def test_bad_arguments():
    gm = trace(PMR())
    with pytest.raises(ValueError, match="exactly one of example_inputs"):
        propagate_shapes(gm)
    with pytest.raises(ValueError, match="got 3 positional inputs"):
        propagate_shapes(gm, input_shapes=[(1, 1, 28, 28)] * 3)
    with pytest.raises(ValueError, match="no value for argument 'colored'"):
        propagate_shapes(gm, (torch.randn(1, 1, 28, 28),))
    with pytest.raises(ValueError, match="unknown argument name"):
        propagate_shapes(gm, {"grey": torch.randn(1, 1, 28, 28)})
    with pytest.raises(TypeError, match="expected a shape"):
        propagate_shapes(gm, input_shapes=["2x1x28x28", (1, 3, 28, 28)])


class Layers(nn.Module):
    """Closed-form shape paths next to the ops they skip; real and fake runs must agree."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 0), padding_mode="reflect")
        self.c2same = nn.Conv2d(4, 4, 3, padding="same")
        self.c2valid = nn.Conv2d(4, 2, 3, padding="valid", groups=2)
        self.c3 = nn.Conv3d(1, 2, 2, stride=2)
        self.lin = nn.Linear(5, 7)
        self.ln = nn.LayerNorm([7])
        self.gn = nn.GroupNorm(2, 2)
        self.bn = nn.BatchNorm1d(3)
        self.act = nn.GELU()

    def forward(self, seq, img, vol, tok):
        a = self.bn(self.c1(seq))
        b = self.gn(self.c2valid(self.c2same(self.c2(img))))
        return a, b, self.c3(vol), self.act(self.ln(self.lin(tok)))


def test_closed_form_shapes_match_real_ops():
    inputs = (
        torch.randn(2, 2, 17),
        torch.randn(2, 2, 9, 12),
        torch.randn(2, 1, 5, 6, 7),
        torch.randn(2, 3, 5),
    )
    real, fake = trace(Layers()), trace(Layers())
    assert propagate_shapes(real, inputs) is None
    assert propagate_shapes(fake, input_shapes=[tuple(x.shape) for x in inputs]) is None
    assert _shapes(real) == _shapes(fake)


@pytest.mark.parametrize(
    "bad, node",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), "1"),
        (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(5)), "1"),
        (nn.Sequential(nn.Conv2d(2, 4, 3)), "0"),
        (nn.Sequential(nn.Linear(6, 4)), "0"),
        (nn.Sequential(nn.Conv2d(3, 4, 9)), "0"),
    ],
)
def test_closed_form_paths_still_catch_mismatches(bad, node):
    shape = (2, 4) if isinstance(bad[0], nn.Linear) else (2, 3, 6, 6)
    failure = propagate_shapes(trace(bad), input_shapes=[shape])
    assert failure is not None and failure.target == node


def test_default_dtype_follows_the_model_and_bare_shape():
    gm = trace(nn.Sequential(nn.Linear(4, 3)).double())
    assert propagate_shapes(gm, input_shapes=(2, 4)) is None  # one bare shape, one input
    assert all(tensor_record(n).dtype == torch.float64 for n in gm.graph.nodes if n.op != "output")


class UpdatesItsDict(nn.Module):
    """Updates the dict it receives, as sentence-transformers' SentenceTransformer.forward does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, features):
        features.update({"embedding": self.fc(features["x"])})
        return features


class BuildsADict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = UpdatesItsDict()

    def forward(self, x, y):
        return self.enc({"x": x})["embedding"] * y


class PassesItsDict(BuildsADict):
    def forward(self, batch, y):
        return self.enc(batch)["embedding"] * y


@pytest.mark.parametrize("real", [True, False], ids=["real", "fake"])
def test_a_leaf_that_updates_its_dict_argument(real):
    gm = trace(BuildsADict(), leaf_modules=[UpdatesItsDict])
    if real:
        failure = propagate_shapes(gm, (torch.randn(2, 4), torch.randn(2, 3)))
    else:
        failure = propagate_shapes(gm, input_shapes=[(2, 4), (2, 3)])
    assert failure is None
    assert {n.name: tensor_record(n).shape for n in gm.graph.nodes}["mul"] == (2, 3)


def test_a_leaf_updating_a_dict_input_leaves_the_callers_dict_alone():
    gm = trace(PassesItsDict(), leaf_modules=[UpdatesItsDict])
    batch = {"x": torch.randn(2, 4)}
    assert propagate_shapes(gm, (batch, torch.randn(2, 3))) is None
    assert list(batch) == ["x"]


def test_failure_message_is_whole():
    class Refuses(nn.Module):
        def forward(self, x):
            raise ValueError("the tower wants 4 channels.\nGot 3; pass pixel_values with 4.")

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = Refuses()

        def forward(self, x):
            return self.tower(x)

    gm = trace(Outer(), leaf_modules=[Refuses])
    failure = propagate_shapes(gm, input_shapes=[(2, 3)])
    assert failure.message == (
        "ValueError: the tower wants 4 channels. Got 3; pass pixel_values with 4."
    )
    assert str(failure).endswith("Got 3; pass pixel_values with 4.")


def test_example_inputs_leave_the_random_generator_as_it_was():
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(5, 4)

        def forward(self, x, y):
            return torch.nn.functional.dropout(self.a(x), 0.5, self.training) * self.b(y)

    inputs = (torch.randn(8, 4), torch.randn(8, 5))
    model = Dropping().train()
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    regbn.insert(model, [("a", "b")], inputs)
    regbn.inspect(model, inputs)
    regbn.find_fusions(model, inputs)
    assert torch.equal(torch.rand(3), want)  # a seeded run draws the same numbers after insert


def test_input_dtypes_mirror_a_dict_of_shapes():
    class Batch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.img = nn.Embedding(50, 8), nn.Linear(12, 8)

        def forward(self, batch):
            t = self.emb(batch["input_ids"]) * batch["attention_mask"][..., None]
            return torch.cat([t.sum(1), self.img(batch["pixel_values"]).mean(1)], 1)

    shapes = [{"input_ids": (4, 7), "attention_mask": (4, 7), "pixel_values": (4, 5, 12)}]
    ints = {"input_ids": torch.int64, "attention_mask": "int64"}
    for dtypes in ([ints], {"batch": ints}):
        named = shapes if isinstance(dtypes, list) else {"batch": shapes[0]}
        (fusion,) = regbn.find_fusions(Batch(), input_shapes=named, input_dtypes=dtypes)
        assert fusion.modalities == (
            frozenset({"batch['input_ids']"}),
            frozenset({"batch['pixel_values']"}),
        )
    with pytest.raises(ValueError, match="does not mirror the input_shapes entry"):
        regbn.find_fusions(Batch(), input_shapes=shapes, input_dtypes=[[torch.int64]])


class _SharedEncoder(nn.Module):
    def __init__(self, d: int = 3):
        super().__init__()
        self.enc = nn.Linear(d, d)

    def forward(self, x, y):
        return torch.cat([self.enc(x), self.enc(y)], 1)


def test_a_meta_model_and_inputs_larger_than_the_machine():
    with torch.device("meta"):
        huge = _SharedEncoder(100_000)  # 40 GB of float32 weights
    fusions = regbn.find_fusions(huge, input_shapes=[(2, 100_000), (2, 100_000)])
    assert len(fusions) == 1 and [tuple(s) for s in fusions[0].shapes] == [(2, 100_000)] * 2
    report = regbn.inspect(_SharedEncoder(), input_shapes=[(10**10, 3), (10**10, 3)])  # 120 GB
    assert [r.shape for r in report.rows if r.is_fusion] == [(10**10, 6)]
