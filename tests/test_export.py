"""A patched model in eval mode exports (torch.export, ONNX, jit.trace) and re-traces with fx.

Every exported artefact is run on batch sizes other than the example's and compared with eager.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import regbn
from regbn import RegBN

# The official example's RegBN settings (mogvision/regbn, example_PMR)
OFFICIAL = dict(normalize_input=True, normalize_output=True, affine=True, sigma_THR=0.0,
                sigma_MIN=1e-8)
EXAMPLE_B = 8


class TwoBranch(nn.Module):
    """An image branch (a 2D map: the input norm is a BatchNorm2d) and a vector branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(2 * 4 * 4 + 4, 3)

    def forward(self, image, vector):
        f = torch.relu(self.conv(image))
        g = self.fc(vector)
        return self.head(torch.cat([f.flatten(1), g], 1))


def inputs(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 4, 4, generator=gen), torch.randn(B, 5, generator=gen)


def trained(steps: int = 3) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    patched = regbn.insert(TwoBranch(), pairs=[("conv", "fc")],
                           example_inputs=inputs(EXAMPLE_B), **OFFICIAL)
    patched.train()
    for step in range(steps):
        patched(*inputs(EXAMPLE_B, seed=10 + step))
    return patched.eval()


@pytest.fixture(scope="module")
def patched() -> torch.fx.GraphModule:
    return trained()


def dynamic_batch():
    B = torch.export.Dim("B", min=1, max=1024)
    return ({0: B}, {0: B})


def assert_matches_eager(run, model, sizes=(5, 11)) -> None:
    for B in sizes:
        x = inputs(B, seed=B)
        with torch.no_grad():
            want = model(*x)
        got = torch.as_tensor(run(*x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"batch {B}")


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_computes_the_eval_maths(patched, strict):
    """Before, non-strict export replaced each RegBN by empty_like (outputs off by 1e35)."""
    ep = torch.export.export(patched, inputs(EXAMPLE_B), dynamic_shapes=dynamic_batch(),
                             strict=strict)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert not any("empty_like" in t for t in targets)
    assert any("addmm" in t for t in targets)
    assert_matches_eager(ep.module(), patched)


def test_onnx_dynamo_export_runs_in_onnxruntime(patched, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "patched.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(patched, inputs(EXAMPLE_B), dynamo=True,
                                    dynamic_shapes=dynamic_batch(), verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(image, vector):
        feed = dict(zip(names, (image.numpy(), vector.numpy()), strict=True))
        return session.run(None, feed)[0]

    assert_matches_eager(run, patched)


def test_legacy_onnx_export_runs_in_onnxruntime(patched, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "legacy.onnx"
    axes = {"image": {0: "B"}, "vector": {0: "B"}, "out": {0: "B"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(patched, inputs(EXAMPLE_B), str(path), dynamo=False,
                          input_names=["image", "vector"], output_names=["out"],
                          dynamic_axes=axes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_matches_eager(
        lambda image, vector: session.run(None, {"image": image.numpy(),
                                                 "vector": vector.numpy()})[0],
        patched,
    )


def test_jit_trace_matches_eager_on_other_batch_sizes(patched):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(patched, inputs(EXAMPLE_B))
    assert_matches_eager(traced, patched)


def test_jit_script_is_refused_with_a_pointer_to_export(patched):
    with pytest.raises(TypeError, match="cannot be compiled by torch.jit.script.*torch.export"
                                        ".*regbn.fold"):
        torch.jit.script(RegBN(4, 3, [], []))
    with pytest.raises(TypeError, match="torch.jit.script"):
        torch.jit.script(patched)


def test_a_training_layer_refuses_to_be_exported_or_traced():
    model = trained(steps=1).train()
    before = model.regbn_0.W.clone()
    with pytest.raises(ValueError, match="training mode cannot be exported.*model.eval()"):
        torch.export.export(model, inputs(EXAMPLE_B))
    with pytest.raises(ValueError, match="training mode cannot be exported"):
        torch.jit.trace(model, inputs(EXAMPLE_B))
    assert torch.equal(model.regbn_0.W, before) and int(model.regbn_0.num_batches_tracked) == 1


def test_symbolic_trace_of_a_patched_model_keeps_regbn_a_leaf():
    """Before, any fx tracer failed inside RegBN ("f must be a torch.Tensor; got Proxy")."""
    model = trained(steps=1).train()
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(twin)
    calls = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "regbn_0"]
    assert len(calls) == 1
    # exact: the re-trace runs the same modules (RegBN a leaf) in the same order, on equal state
    for step in range(2):  # training: same outputs, same running state
        x = inputs(EXAMPLE_B, seed=20 + step)
        torch.testing.assert_close(traced(*x), model(*x), rtol=0, atol=0)
    for name, buf in model.regbn_0.state_dict().items():
        if buf.is_floating_point():
            torch.testing.assert_close(twin.regbn_0.state_dict()[name], buf, equal_nan=True)
    model.eval()
    traced.eval()
    x = inputs(3, seed=30)
    torch.testing.assert_close(traced(*x), model(*x), rtol=0, atol=0)


def test_is_training_keyword_survives_a_trace():
    class Forced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rb = RegBN(4, 3, [], [])

        def forward(self, f, g):
            f_r, g_out = self.rb(f, g, is_training=False)
            return f_r + g_out.sum(1, keepdim=True)

    traced = torch.fx.symbolic_trace(Forced())
    (call,) = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert call.kwargs == {"is_training": False}
    traced.train()
    f, g = torch.randn(6, 4), torch.randn(6, 3)
    traced(f, g)
    assert int(traced.rb.num_batches_tracked) == 0


def test_a_second_insert_on_a_patched_model_works():
    model = trained(steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice = regbn.insert(model, pairs=[("fc", "conv")], example_inputs=inputs(EXAMPLE_B))
    layers = [m for m in twice.modules() if isinstance(m, RegBN)]
    assert len(layers) == 2
    twice.train()
    out = twice(*inputs(EXAMPLE_B, seed=40))
    assert out.shape == (EXAMPLE_B, 3) and bool(torch.isfinite(out).all())
    twice.eval()
    assert twice(*inputs(1, seed=41)).shape == (1, 3)


def test_importing_regbn_does_not_import_dynamo():
    """The export checks run at call time; importing torch._dynamo would cost seconds."""
    import subprocess
    import sys

    code = "import sys, regbn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
