"""The one analysis pipeline behind `regbn.inspect`, `regbn.find_fusions` and `regbn.insert`.

`analyse` traces the model, propagates shapes (real or fake tensors), tags every node with the
modalities its value depends on and finds the fusions. It never writes into the caller's model:
an ``nn.Module`` is traced into a new ``GraphModule``, and a ``GraphModule`` passed in is analysed
on a copy of its graph (its nodes' ``meta`` stay as they were).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch.fx as fx
from torch import nn

from .modality import Fusion, annotate_modalities, detect_fusions
from .names import is_ambiguous
from .shapes import ShapeFailure, propagate_shapes
from .tracing import carry_missing_state, trace

__all__ = ["Analysis", "analyse", "find_fusions"]


@dataclass
class Analysis:
    """What `analyse` found.

    ``gm``: the annotated ``GraphModule`` (never the caller's object); ``fusions``: its fusions in
    graph order, pairs spelled as `regbn.insert` resolves them; ``failure``: where shape
    propagation stopped (None when shapes were not asked for or all succeeded); ``graph``: the
    networkx DiGraph of node names the modality analysis used (an edge u -> v when v reads u).
    """

    gm: fx.GraphModule
    fusions: list[Fusion]
    failure: ShapeFailure | None
    graph: nx.DiGraph


def analyse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
    modalities: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Any = None,
    autowrap_functions: Any = None,
) -> Analysis:
    """Trace, propagate shapes, annotate modalities and detect fusions, in that order.

    ``example_inputs`` (real tensors) or ``input_shapes`` (+ ``input_dtypes``, fake tensors) give
    shapes; with neither, the analysis is structural (every operand with a modality counts).
    ``modalities`` groups inputs into named modalities (see `regbn.fx.modality`). Tracing options
    are those of `regbn.fx.tracing.trace`. A trace failure raises `TraceError`; a shape failure is
    returned in ``failure`` and the modalities still hold for every node.
    """
    traced = trace(
        model,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    gm = private_copy(traced) if traced is model else traced
    failure = None
    if example_inputs is not None or input_shapes is not None:
        failure = propagate_shapes(
            gm, example_inputs, input_shapes=input_shapes, input_dtypes=input_dtypes
        )
    # Modalities are structural: they hold for every node, even past a shape failure.
    graph = annotate_modalities(gm, modalities=modalities)
    fusions = [with_pair_names(gm, f) for f in detect_fusions(gm)]
    return Analysis(gm, fusions, failure, graph)


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A ``GraphModule`` over a copy of ``gm``'s graph that shares its submodules and tensors.

    Node ``meta`` dicts are copied too, so annotating the copy leaves ``gm`` as it was.
    """
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, type(gm).__name__)
    carry_missing_state(gm, out)
    out.meta.update(getattr(gm, "meta", {}))
    out.training = gm.training
    return out


def find_fusions(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
    modalities: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Any = None,
    autowrap_functions: Any = None,
) -> list[Fusion]:
    """Trace ``model`` and list the nodes where its modality branches fuse, in graph order.

    With ``example_inputs`` or ``input_shapes`` the fusions carry shapes and only floating-point
    tensor operands count; without, every operand with a modality counts. ``modalities`` groups
    inputs, e.g. ``{"text": ["input_ids", "attention_mask"], "image": ["pixel_values"]}``. See
    `Fusion` for ``pair``. A shape-propagation failure raises ``ValueError`` naming the node.
    """
    result = analyse(
        model,
        example_inputs,
        input_shapes=input_shapes,
        input_dtypes=input_dtypes,
        modalities=modalities,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    if result.failure is not None:
        raise ValueError(
            f"find_fusions: {result.failure}. Check example_inputs/input_shapes against the "
            "model's forward, or run regbn.inspect(model, ...) to see the shapes up to that node"
        )
    return result.fusions


def with_pair_names(gm: fx.GraphModule, fusion: Fusion) -> Fusion:
    """``fusion`` with its pair spelled for `regbn.insert`: ``node:`` only where needed."""
    if fusion.pair is None:
        return fusion
    pair = tuple(f"node:{n}" if is_ambiguous(gm, n) else n for n in fusion.pair)
    return replace(fusion, pair=pair)
