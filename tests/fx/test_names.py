"""Name resolution lives in regbn.fx.names, importable without insertion or modality analysis."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from regbn.fx import names
from regbn.fx.names import entry_name, is_ambiguous, is_constant_getitem, resolve_name
from regbn.fx.shapes import propagate_shapes
from regbn.fx.tracing import trace

from .conftest import PMR, DictInput


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
