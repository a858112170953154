"""Name resolution lives in regbn.fx.names, importable without insertion or modality analysis."""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import regbn
from regbn.fx import names
from regbn.fx.names import entry_name, is_ambiguous, is_constant_getitem, resolve_name
from regbn.fx.shapes import propagate_shapes
from regbn.fx.tracing import trace

from .conftest import PMR, DictInput, HandEditable


def test_names_imports_neither_insertion_nor_modality():
    # Modality and insertion code import names.py; it must not import them back (a cycle).
    # It reads what tracing records and the shape records, nothing later in the pipeline.
    tree = ast.parse(Path(names.__file__).read_text())
    imported = {x.module for x in ast.walk(tree) if isinstance(x, ast.ImportFrom) and x.level}
    assert imported - {"errors"} == {"tracing.capture", "tracing.regions", "shapes.record"}


def test_resolve_module_input_and_node_names():
    gm = trace(PMR())
    propagate_shapes(gm, (torch.randn(2, 1, 28, 28), torch.randn(2, 3, 28, 28)))
    fc = resolve_name(gm, "gray_net.fc")
    assert fc.op == "call_module" and fc.target == "gray_net.fc"
    assert resolve_name(gm, "input:gray").op == "placeholder"
    assert resolve_name(gm, f"node:{fc.name}") is fc
    assert not is_ambiguous(gm, "gray_net.fc")


def test_unknown_name_suggests_and_points_to_inspect():
    gm = trace(PMR())
    with pytest.raises(
        ValueError,
        match=r"^'gray_net.fcc' is not a tensor.*did you mean "
        r"'gray_net.fc'.*regbn.inspect",
    ):
        resolve_name(gm, "gray_net.fcc")
    with pytest.raises(TypeError, match="names must be strings"):
        resolve_name(gm, 3)


def test_container_entries_are_named_like_modalities():
    gm = trace(DictInput())
    entries = [
        n for n in gm.graph.nodes if is_constant_getitem(n) and n.args[0].op == "placeholder"
    ]
    assert entries
    labels = {entry_name(n.args[0], n.args[1]) for n in entries}
    for label in labels:
        assert resolve_name(gm, label) in entries


# ---------------------------------------------------------------- dataclass and NamedTuple batches


@dataclass
class ImageText:
    image: torch.Tensor
    text: torch.Tensor


class ImageTextTuple(NamedTuple):
    image: torch.Tensor
    text: torch.Tensor


class FieldBatch(HandEditable):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(6, 8), nn.Linear(16, 2)

    def forward(self, batch):
        image, text = self._rb(0, batch.image, batch.text)
        return self.head(torch.cat([self.a(image), self.b(text)], 1))


@pytest.mark.parametrize("kind", [ImageText, ImageTextTuple])
def test_dataclass_and_namedtuple_batches_by_field(kind):
    def batch():
        return (kind(torch.randn(5, 4), torch.randn(5, 6)),)

    model = FieldBatch()
    report = regbn.inspect(model, batch())
    assert report.failure is None
    (fusion,) = report.fusions
    assert fusion.modalities == (frozenset({"batch.image"}), frozenset({"batch.text"}))
    patched = regbn.insert(model, [("batch.image", "batch.text")], batch())
    assert patched.regbn_0.f_shape == (4,) and patched.regbn_0.g_shape == (6,)
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    for _ in range(2):
        x = batch()
        torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)
    patched.eval()
    hand.eval()
    x = batch()
    torch.testing.assert_close(patched(*x), hand(*x), rtol=0, atol=0)
    (row,) = regbn.measure_dependence(model, [batch() for _ in range(3)], [("a", "b")]).rows
    assert 0 <= row.r2 <= 1


def test_modalities_group_fields_of_a_batch():
    batch = (ImageText(torch.randn(5, 4), torch.randn(5, 6)),)
    groups = {"vision": ["batch.image"], "language": "batch.text"}
    (fusion,) = regbn.find_fusions(FieldBatch(), batch, modalities=groups)
    assert fusion.modalities == (frozenset({"vision"}), frozenset({"language"}))
    # The batch argument as a whole: every field joins one modality, so nothing fuses.
    assert regbn.find_fusions(FieldBatch(), batch, modalities={"all": ["batch"]}) == []
    with pytest.raises(ValueError, match=r"modalities\['vision'\]: 'batch.imag' is not an input "
                       r".*did you mean 'batch.image'\? modalities= groups inputs only"):
        regbn.find_fusions(FieldBatch(), batch, modalities={"vision": ["batch.imag"]})
    with pytest.raises(ValueError, match=r"'a' is not an input .*fields as \"batch.image\""):
        regbn.find_fusions(FieldBatch(), batch, modalities={"vision": ["a"]})


# ----------------------------------------------------------- variables of the model's forward


class Locals(HandEditable):
    """Branch features that only variables of forward name: no module returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(10, 6)
        self.enc_b = nn.Linear(12, 5)
        self.head = nn.Linear(11, 3)

    def forward(self, a, b):
        fa = torch.relu(self.enc_a(a)).square()
        fb = torch.relu(self.enc_b(b))
        fb = fb.exp()  # reassigned: 'fb' names the value it holds when forward returns
        fa, fb = self._rb(0, fa, fb)
        head = fa.sum()  # a variable that shadows a module: the module keeps its name
        return self.head(torch.cat([fa, fb], 1)) + head


def _locals_inputs():
    return torch.randn(8, 10), torch.randn(8, 12)


def test_variables_of_forward_are_shown_and_accepted():
    model = Locals()
    (fusion,) = regbn.find_fusions(model, _locals_inputs())
    assert fusion.labels == ("fa", "fb") and fusion.pair == ("fa", "fb")
    assert fusion.pair_nodes == ("square", "exp")
    report = regbn.inspect(model, _locals_inputs())
    labels = {row.name: row.label for row in report.rows}
    assert labels["square"] == "fa" and labels["exp"] == "fb"
    assert labels["relu_1"] == "relu_1"  # fb's first value: no name of the user's holds it now
    assert labels["sum_1"] == "sum_1"  # 'head' is the module: the variable is not shown
    assert labels["head"] == "head"
    text = str(report)
    assert "\n      fa  a  (8, 6)" in text and "pairs=[('fa', 'fb')]" in text
    gm = trace(model)
    assert resolve_name(gm, "fa").name == "square" and resolve_name(gm, "head").op == "call_module"


def test_a_pair_of_variables_equals_the_hand_edit():
    from .test_real_models import _train_and_compare

    torch.manual_seed(0)
    model = Locals()
    patched = regbn.insert(model, [("fa", "fb")], _locals_inputs())
    hand = copy.deepcopy(model)
    hand.hand = nn.ModuleList([copy.deepcopy(patched.regbn_0)])
    _train_and_compare(patched, hand, _locals_inputs, steps=3)


def test_every_name_shown_maps_back_to_its_node(case):
    """inspect's table shows, per node, a name insert resolves to that very node."""
    from regbn.fx.analysis import analyse

    model = case.make()
    inputs = case.inputs()
    gm = analyse(model, inputs).gm
    shown = names.display_names(gm)
    assert len(set(shown.values())) == len(shown)  # one name, one node
    for node in gm.graph.nodes:
        if node.op != "output":
            assert resolve_name(gm, shown[node.name]) is node, shown[node.name]
    report = regbn.inspect(model, inputs)
    assert [row.label for row in report.rows if row.op != "output"] == list(shown.values())


def test_variables_are_not_read_under_a_debugger():
    """A trace function already set (a debugger, coverage) stays the only one."""
    import sys

    seen = []

    def tracer(frame, event, arg):
        seen.append(event)
        return None

    sys.settrace(tracer)
    try:
        gm = trace(Locals())
    finally:
        sys.settrace(None)
    assert seen and not any("regbn_variable" in n.meta for n in gm.graph.nodes)
    assert resolve_name(gm, "node:square").name == "square"
