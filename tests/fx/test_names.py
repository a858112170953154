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
    # Shape, modality and insertion code import names.py; it must not import them back (a cycle).
    tree = ast.parse(Path(names.__file__).read_text())
    imported = {x.module for x in ast.walk(tree) if isinstance(x, ast.ImportFrom) and x.level}
    # regbn.errors imports nothing of regbn; regions.py (what tracing records) only errors
    assert imported - {"errors"} == {"tracing", "regions"}


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
        match=r"pair 0: 'gray_net.fcc' is not a tensor.*did you mean "
        r"'gray_net.fc'.*regbn.inspect",
    ):
        resolve_name(gm, "gray_net.fcc", "pair 0")
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
