"""The PMR colored-digits experiment: the official model, the read-out, the arms, --quick.

The quick mode runs twice, in two separate processes, and must give the same numbers bit for
bit; the README's tables must be the docs JSON's, produced by the command printed above them.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import EXAMPLES, REPO, run_script
from pmr_colored_digits import (
    CGClassifier,
    arm_projection,
    arms_of,
    build_model,
    format_cost,
    format_table,
    modality_logits,
    parse_args,
    parse_arm,
    summarise,
    weight_init,
)

import regbn

SCRIPT = str(EXAMPLES / "pmr_colored_digits.py")


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randn(
        batch, 3, 28, 28, generator=gen
    )


def test_official_model_and_modality_halves():
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


@pytest.mark.parametrize(
    ("arm", "f_modality", "pair_shapes", "rule"),
    [
        ("regbn-input", "gray", ((1, 28, 28), (3, 28, 28)), "paper"),
        ("regbn-late", "gray", ((96,), (96,)), "paper"),
        ("regbn-input-official", "gray", ((1, 28, 28), (3, 28, 28)), "official"),
        ("regbn-late-official", "gray", ((96,), (96,)), "official"),
        ("regbn-input", "colored", ((3, 28, 28), (1, 28, 28)), "paper"),
    ],
)
def test_build_model_splices_one_regbn(arm, f_modality, pair_shapes, rule):
    example = _inputs(8)
    model = build_model(arm, 0, example, f_modality=f_modality)
    layers = [m for m in model.modules() if isinstance(m, regbn.RegBN)]
    assert len(layers) == 1
    assert model.get_submodule("regbn_0") is layers[0]
    assert layers[0].lambda_rule == rule
    # W is (Dg x Df): f's and g's flattened sizes from the pair's shapes.
    f_shape, g_shape = pair_shapes
    assert tuple(layers[0].W.shape) == (
        torch.Size(g_shape).numel(),
        torch.Size(f_shape).numel(),
    )
    # The official weights are still there under their own names, and the same seed gives the
    # same initialisation as the baseline.
    baseline = build_model("baseline", 0, example)
    state = model.state_dict()
    for key, value in baseline.state_dict().items():
        assert torch.equal(state[key], value), key
    model.train()
    g, c, out = model(*example)
    assert out.shape == (8, 10)


def test_norms_only_is_regbn_without_its_projection():
    """The norms-only arm's modules are the layer's own norms: with W = 0 (a layer that has not
    trained yet) RegBN's eval output is exactly theirs, for both modalities."""
    from pmr_colored_digits import OFFICIAL_REGBN_KWARGS, NormsOnlyClassifier

    layer = regbn.RegBN(f_num_channels=1, g_num_channels=3, f_layer_dim=[28, 28],
                        g_layer_dim=[28, 28], **OFFICIAL_REGBN_KWARGS).eval()  # fmt: skip
    model = NormsOnlyClassifier().eval()
    x, y = torch.randn(5, 1, 28, 28), torch.randn(5, 3, 28, 28)
    assert layer.W.abs().max() == 0
    f_out, g_out = layer(x, y)
    # the same torch modules, the same initial values: bit for bit
    torch.testing.assert_close(f_out, model.gray_norms(x), rtol=0, atol=0)
    torch.testing.assert_close(g_out, model.colored_norms(y), rtol=0, atol=0)
    assert [type(m) for m in model.gray_norms] == [type(layer.norm_f), type(layer.norm_f_out)]
    # and the classifier itself starts from the baseline's weights
    base, norms = build_model("baseline", 3, (x, y)), build_model("norms-only", 3, (x, y))
    for (name, p), (_, q) in zip(base.named_parameters(), norms.named_parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_arms_and_their_names():
    assert arms_of("input", "paper") == ["baseline", "norms-only", "regbn-input"]
    assert arms_of("late", "paper") == ["baseline", "regbn-late"]  # norms-only: at the inputs
    assert arms_of("none", "both") == ["baseline"]
    assert arms_of("both", "both") == [
        "baseline",
        "norms-only",
        "regbn-input",
        "regbn-input-official",
        "regbn-late",
        "regbn-late-official",
    ]
    assert parse_arm("regbn-late-official") == ("late", "official")
    assert parse_arm("regbn-input") == ("input", "paper")
    with pytest.raises(ValueError, match="'regbn-middle' is not 'baseline'"):
        parse_arm("regbn-middle")


def test_presets():
    quick, full, default = parse_args(["--quick"]), parse_args(["--full"]), parse_args([])
    assert (quick.epochs, quick.seeds, quick.n_train, quick.n_test) == (2, 2, 300, 100)
    assert (full.epochs, full.n_train, full.n_test, full.seeds) == (75, 60_000, 10_000, 3)
    assert default.n_train is None and default.seeds == 3 and default.threads == 2
    assert parse_args(["--quick", "--epochs", "1"]).epochs == 1  # explicit values win
    assert (default.palette, default.jitter_var) == ("pastel", 0.02)
    other = parse_args(["--palette", "primary", "--jitter-var", "0.03"])
    assert (other.palette, other.jitter_var) == ("primary", 0.03)


def test_summary_and_table_by_hand():
    runs = [
        {
            "test_acc_fused": [0.0, a],
            "test_acc_gray": [0.0, a / 2],
            "test_acc_colored": [0.0, 0.1],
            "train_loss_gray": [9.0, 1.0 + a],
            "train_loss_colored": [9.0, 2.0],
        }
        for a in (0.2, 0.4, 0.9)
    ]
    table = summarise({"arms": {"baseline": {"per_seed": runs}}})
    fused = table["baseline"]["acc_fused"]
    assert fused["per_seed"] == [0.2, 0.4, 0.9]
    assert fused["mean"] == pytest.approx(0.5)
    # Sample standard deviation (n - 1): sqrt(((-.3)² + (-.1)² + .4²) / 2).
    assert fused["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert table["baseline"]["loss_colored"]["std"] == 0.0
    text = format_table(table)
    assert "| baseline | 0.500 ± 0.361 | 0.250 ± 0.180 | 0.100 ± 0.000 |" in text
    assert "| baseline | 0.200 / 0.400 / 0.900 |" in text
    assert "fusion r2" not in text  # no dependence measured: no such columns
    for run, r2 in zip(runs, (0.5, 0.6, 0.7), strict=True):
        run["dependence"] = {"r2": r2, "r2_shuffled": 0.1, "above_chance": r2 - 0.1}
    table = summarise({"arms": {"baseline": {"per_seed": runs}}})
    dep = table["baseline"]["dependence"]["above_chance"]
    assert dep["mean"] == pytest.approx(0.5) and dep["std"] == pytest.approx(0.1)
    assert "| 0.600 ± 0.100 | 0.100 ± 0.000 | 0.500 ± 0.100 |" in format_table(table)


def _numbers(results: dict) -> dict:
    """Everything but the timings."""
    arms = {
        arm: [{k: v for k, v in run.items() if k != "seconds"} for run in runs["per_seed"]]
        for arm, runs in results["arms"].items()
    }
    return {"arms": arms, "final": results["final"], "config": results["config"]}


@pytest.fixture(scope="module")
def quick_twice(tmp_path_factory):
    """--quick with both placements, run twice in separate processes."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"quick{i}")
        proc = run_script(
            SCRIPT,
            "--quick",
            "--placement",
            "both",
            # One thread: the check is the same, and a 2-thread process on a busy 2-core
            # machine can run ten times slower.
            "--threads",
            "1",
            "--out",
            str(out),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append((out, proc))
    return outs


@pytest.mark.slow
def test_quick_end_to_end(quick_twice):
    out, proc = quick_twice[0]
    assert (out / "pmr_colored_digits.png").stat().st_size > 10_000
    results = json.loads((out / "pmr_colored_digits.json").read_text())
    cfg = results["config"]
    assert cfg["arms"] == arms_of("both", "paper") == list(results["arms"])
    assert cfg["threads"] == 1 and cfg["deterministic"] is True
    assert cfg["versions"]["torch"] == torch.__version__
    assert (cfg["n_train"], cfg["n_test"], cfg["epochs"]) == (300, 100, 2)
    # The data recipe is recorded: palette, jitter and transform strengths.
    assert (cfg["palette"], cfg["jitter_var"]) == ("pastel", 0.02)
    assert cfg["augmentation"]["rotate_deg"] == 10.0 and cfg["augmentation"]["scale"] == [0.9, 1.1]
    for arm, runs in results["arms"].items():
        assert runs["seeds"] == cfg["seeds"] and len(runs["seeds"]) >= 2
        for curves in runs["per_seed"]:
            for mod in ("fused", "gray", "colored"):
                assert len(curves[f"test_acc_{mod}"]) == cfg["epochs"]
                assert len(curves[f"train_loss_{mod}"]) == cfg["epochs"]
                assert all(0.0 <= a <= 1.0 for a in curves[f"test_acc_{mod}"])
            assert ("lambda" in curves) == arm.startswith("regbn-")
            dep = curves["dependence"]  # measured at the fusion on every trained arm
            assert 0.0 <= dep["r2_shuffled"] <= 1.0 and 0.0 <= dep["r2"] <= 1.0
            assert dep["above_chance"] == pytest.approx(dep["r2"] - dep["r2_shuffled"])
        assert set(results["final"][arm]["dependence"]) == {"r2", "r2_shuffled", "above_chance"}
    # The printed tables are the JSON's.
    assert format_table(results["final"]) in proc.stdout
    assert format_table(summarise(results)) == format_table(results["final"])


@pytest.mark.slow
def test_quick_is_identical_in_two_processes(quick_twice):
    (out_a, proc_a), (out_b, proc_b) = quick_twice
    a = json.loads((out_a / "pmr_colored_digits.json").read_text())
    b = json.loads((out_b / "pmr_colored_digits.json").read_text())
    assert _numbers(a) == _numbers(b)  # floats compared exactly
    assert format_table(a["final"]) in proc_b.stdout
    # The RegBN arms really differ from the baseline (a broken splice would equal it).
    assert a["arms"]["regbn-input"]["per_seed"][0] != a["arms"]["baseline"]["per_seed"][0]


# --------------------------------------------------------------------------------------------
# conv4: the branches' last feature maps, with the full W or one W per channel
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arm", "projection", "w_shape"),
    [("regbn-conv4", "full", (64 * 49, 64 * 49)), ("regbn-conv4-channel", "channel", (64, 64))],
)
def test_conv4_pair_names_resolve_to_the_last_feature_maps(arm, projection, w_shape):
    example = _inputs(8)
    model = build_model(arm, 0, example)
    (layer,) = [m for m in model.modules() if isinstance(m, regbn.RegBN)]
    assert (layer.projection, layer.lambda_rule) == (projection, "paper")
    assert layer.f_shape == layer.g_shape == (64, 7, 7)
    assert tuple(layer.W.shape) == w_shape
    # The layer sits between conv4's ReLU and the average pooling, in both branches.
    (node,) = [n for n in model.graph.nodes if n.target == "regbn_0"]
    assert [a.name for a in node.args] == ["gray_net_relu_3", "colored_net_relu_3"]  # (f, g)
    pooled = sorted(u.target for out in node.users for u in out.users)
    assert pooled == ["colored_net.avgpool", "gray_net.avgpool"]
    baseline = build_model("baseline", 0, example)
    state = model.state_dict()
    for key, value in baseline.state_dict().items():
        assert torch.equal(state[key], value), key
    model.train()
    assert model(*example)[2].shape == (8, 10)


def test_projection_arms_and_their_names():
    assert arms_of("conv4", "paper", "both") == ["baseline", "regbn-conv4", "regbn-conv4-channel"]
    assert arms_of("conv4", "both", "channel") == [
        "baseline",
        "regbn-conv4-channel",
        "regbn-conv4-channel-official",
    ]
    assert arms_of("both", "paper") == ["baseline", "norms-only", "regbn-input", "regbn-late"]
    assert parse_arm("regbn-conv4-channel-official") == ("conv4", "official")
    assert arm_projection("regbn-conv4-channel-official") == "channel"
    assert arm_projection("regbn-conv4-official") == arm_projection("baseline") == "full"
    default, both = parse_args([]), parse_args(["--placement", "conv4", "--projection", "both"])
    assert (default.projection, default.cost) == ("full", False)
    assert (both.projection, both.cost) == ("both", True)


def test_cost_table_by_hand():
    cost = {
        "baseline": {
            "step_ms": 40.04,
            "step_ms_per_seed": [40.0, 41.26],
            "peak_rss_delta_mib": 80.0,
            "regbn_buffer_mib": 0.0,
        },
        "regbn-conv4-channel": {
            "step_ms": 51.0,
            "step_ms_per_seed": [50.0, 52.0],
            "peak_rss_delta_mib": None,
            "regbn_buffer_mib": 0.0157,
        },
    }
    text = format_cost(cost)
    assert "| baseline | 40.0 | 40.0 / 41.3 | 80.0 | 0.00 |" in text
    assert "| regbn-conv4-channel | 51.0 | 50.0 / 52.0 | not measured | 0.02 |" in text


@pytest.mark.slow
def test_quick_projection_comparison_writes_both_arms_and_their_cost(tmp_path):
    proc = run_script(
        SCRIPT,
        *("--quick", "--placement", "conv4", "--projection", "both", "--threads", "1"),
        *("--epochs", "1", "--n-train", "150", "--out", str(tmp_path)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "pmr_colored_digits.json").read_text())
    arms = ["baseline", "regbn-conv4", "regbn-conv4-channel"]
    cfg = results["config"]
    assert cfg["arms"] == list(results["arms"]) == list(results["cost"]) == arms
    assert cfg["projection"] == "both" and "spawned process" in cfg["cost"]
    pair = ["node:gray_net_relu_3", "node:colored_net_relu_3"]
    assert cfg["pairs"]["regbn-conv4-channel"] == cfg["pairs"]["regbn-conv4"] == pair
    for arm in arms:
        cost = results["cost"][arm]
        assert cost["step_ms"] > 0 and len(cost["step_ms_per_seed"]) == len(cfg["seeds"])
        assert cost["peak_rss_delta_mib"] is None or cost["peak_rss_delta_mib"] >= 0
        assert len(results["arms"][arm]["per_seed"]) == len(cfg["seeds"])
    # The RegBN layer's buffers: the full W is 3136×3136 float32 (37.5 MiB), the channel W 64×64.
    full_w_mib = 3136**2 * 4 / 2**20
    assert results["cost"]["regbn-conv4"]["regbn_buffer_mib"] == pytest.approx(full_w_mib, rel=1e-4)
    assert results["cost"]["regbn-conv4-channel"]["regbn_buffer_mib"] < 0.02
    assert results["cost"]["baseline"]["regbn_buffer_mib"] == 0
    assert format_table(results["final"]) in proc.stdout
    assert format_cost(results["cost"]) in proc.stdout
    # Each arm in a process of its own computes the curves of the sequential command.
    seq = tmp_path / "sequential"
    proc = run_script(
        SCRIPT,
        *("--quick", "--placement", "conv4", "--projection", "channel", "--threads", "1"),
        *("--epochs", "1", "--n-train", "150", "--out", str(seq)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sequential = _numbers(json.loads((seq / "pmr_colored_digits.json").read_text()))["arms"]
    for arm in ("baseline", "regbn-conv4-channel"):
        assert _numbers(results)["arms"][arm] == sequential[arm], arm


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs, --seeds and --threads must be >= 1"),
        (["--threads", "0"], "--epochs, --seeds and --threads must be >= 1"),
        (["--n-test", "0"], "--n-test must be >= 1, got 0"),
        (["--quick", "--full"], "not allowed with argument"),
        (["--placement", "middle"], "invalid choice: 'middle'"),
    ],
)
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_too_few_training_digits_is_one_line():
    proc = run_script(SCRIPT, "--n-train", "20", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "error: 20 training samples are fewer than one batch of 50" in line


# --------------------------------------------------------------------------------------------
# The README's tables are the docs JSON's, under the command that produced them
# --------------------------------------------------------------------------------------------
# The README shows the official placement; the four-arm run is in docs/experiment.md.
DOCS_RUNS = [
    ("pmr_colored_digits.json", "README.md"),
    ("pmr_four_arms.json", "docs/experiment.md"),
    ("pmr_projection.json", "docs/experiment.md"),
]


@pytest.mark.parametrize(("name", "page"), DOCS_RUNS)
def test_readme_tables_are_the_docs_json(name, page):
    path = REPO / "docs" / name
    assert path.exists(), f"docs/{name} is missing: {page} quotes it"
    results = json.loads(path.read_text())
    readme = (REPO / page).read_text()
    table = format_table(summarise(results))
    assert table == format_table(results["final"])
    assert table in readme, f"{page} lacks the table of docs/{name}"
    # The command printed in the README above the table is the one recorded in the JSON.
    command = results["config"]["command"]
    before = readme[: readme.index(table)]
    assert command in before, command
    assert not results["config"]["quick"]
    assert results["config"]["deterministic"] is True


def test_projection_cost_table_is_the_docs_json():
    results = json.loads((REPO / "docs" / "pmr_projection.json").read_text())
    page = (REPO / "docs" / "experiment.md").read_text()
    assert list(results["cost"]) == ["baseline", "regbn-conv4", "regbn-conv4-channel"]
    assert format_cost(results["cost"]) in page


def test_readme_first_command_runs_the_experiment():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    first = next(line for line in block.splitlines() if line and not line.startswith("#"))
    assert '".[examples]"' in first and "dev" not in first and "test" not in first
    assert first.endswith("python examples/pmr_colored_digits.py")
