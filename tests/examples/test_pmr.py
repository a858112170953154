"""The PMR colored-digits experiment: the seed's model, the per-modality read-out, --quick."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXAMPLES, needs_regbn, run_script
from pmr_colored_digits import (
    CGClassifier,
    build_model,
    format_table,
    modality_logits,
    weight_init,
)

import regbn


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randn(
        batch, 3, 28, 28, generator=gen
    )


def test_seed_model_and_modality_halves():
    torch.manual_seed(0)
    model = CGClassifier()
    model.apply(weight_init)
    g, c, out = model(*_inputs())
    assert g.shape == c.shape == (4, 96) and out.shape == (4, 10)
    out_gray, out_colored = modality_logits(model.fc_out, g, c)
    # The two halves (each with half the bias) add up to the fused logits.
    torch.testing.assert_close(out_gray + out_colored, out)
    # The gray half ignores the colored features and vice versa.
    assert torch.equal(modality_logits(model.fc_out, g, torch.zeros_like(c))[0], out_gray)
    assert torch.equal(modality_logits(model.fc_out, torch.zeros_like(g), c)[1], out_colored)


@needs_regbn("insert")
@pytest.mark.parametrize(
    ("arm", "f_modality", "pair_shapes"),
    [
        ("regbn-input", "gray", ((1, 28, 28), (3, 28, 28))),
        ("regbn-late", "gray", ((96,), (96,))),
        ("regbn-input", "colored", ((3, 28, 28), (1, 28, 28))),
    ],
)
def test_build_model_splices_one_regbn(arm, f_modality, pair_shapes):
    example = _inputs(8)
    model = build_model(arm, 0, example, f_modality=f_modality)
    layers = [m for m in model.modules() if isinstance(m, regbn.RegBN)]
    assert len(layers) == 1
    assert model.get_submodule("regbn_0") is layers[0]
    # W is (Dg x Df): f's and g's flattened sizes from the pair's shapes.
    f_shape, g_shape = pair_shapes
    assert tuple(layers[0].W.shape) == (
        torch.Size(g_shape).numel(),
        torch.Size(f_shape).numel(),
    )
    # The seed's weights are still there under their own names, and the same seed gives the
    # same initialisation as the baseline.
    baseline = build_model("baseline", 0, example)
    state = model.state_dict()
    for key, value in baseline.state_dict().items():
        assert torch.equal(state[key], value), key
    model.train()
    g, c, out = model(*example)
    assert out.shape == (8, 10)


@needs_regbn("insert")
def test_quick_end_to_end(tmp_path):
    proc = run_script(
        str(EXAMPLES / "pmr_colored_digits.py"),
        "--quick",
        "--placement",
        "both",
        "--out",
        str(tmp_path),
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figure = tmp_path / "pmr_colored_digits.png"
    assert figure.stat().st_size > 10_000
    results = json.loads((tmp_path / "pmr_colored_digits.json").read_text())
    assert set(results["arms"]) == {"baseline", "regbn-input", "regbn-late"}
    epochs = results["config"]["epochs"]
    for arm, runs in results["arms"].items():
        assert runs["seeds"] == results["config"]["seeds"] and len(runs["seeds"]) >= 2
        for curves in runs["per_seed"]:
            for mod in ("fused", "gray", "colored"):
                assert len(curves[f"test_acc_{mod}"]) == epochs
                assert len(curves[f"train_loss_{mod}"]) == epochs
                assert all(0.0 <= a <= 1.0 for a in curves[f"test_acc_{mod}"])
            assert ("lambda" in curves) == (arm != "baseline")
    table = results["final_test_accuracy"]
    assert set(table) == set(results["arms"])
    # The printed table is the JSON's.
    assert format_table(table) in proc.stdout


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--max-train", "20"]])
def test_bad_arguments_exit_2(args):
    proc = run_script(str(EXAMPLES / "pmr_colored_digits.py"), *args, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error" in proc.stderr.strip().splitlines()[-1]
