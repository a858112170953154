"""Every ``regbn_*`` node meta key the pipeline writes is listed in regbn/fx/__init__."""

from __future__ import annotations

import re

import pytest
import torch

import regbn
import regbn.fx

from .conftest import CASES

PICKED = {"pmr_early", "three_modal", "dict_input", "cross_attention", "tokens"}


def _documented() -> set[str]:
    return set(re.findall(r"``(regbn_\w+)``", regbn.fx.__doc__ or ""))


def _written(*graphs: torch.fx.Graph) -> set[str]:
    return {k for g in graphs for n in g.nodes for k in n.meta if k.startswith("regbn_")}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in PICKED], ids=lambda c: c.name)
def test_every_meta_key_the_pipeline_writes_is_documented(case):
    model = case.make()
    inputs = case.inputs()
    report = regbn.inspect(model, example_inputs=inputs)
    assert report.rows
    patched = regbn.insert(model, pairs=case.pairs, example_inputs=inputs)
    graphs = list(patched.mode_graphs.values())
    written = _written(*graphs)
    assert {"regbn_tensor", "regbn_modalities", "regbn_module", "regbn_role"} <= written
    assert not {"regbn_shape", "regbn_dtype", "regbn_device", "regbn_nested"} & written
    assert written <= _documented(), written - _documented()
    shapes = [regbn.fx.shapes.tensor_record(n) for g in graphs for n in g.nodes]
    assert all(isinstance(r, regbn.fx.shapes.ShapeRecord) for r in shapes)
