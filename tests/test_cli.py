"""The command line, ``python -m regbn inspect`` and ``regbn inspect``.

Each interpreter start imports torch (seconds on a loaded 2-core machine). So the commands that
run in subprocesses are started at once by one module-scoped fixture: the successful ones, the
console script and one error of each kind (import, shape string, trace, shape propagation).
Every error path also runs in-process through ``main``, which is what the console script calls.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from regbn import inspect
from regbn.cli import main, parse_shape

HERE = Path(__file__).resolve().parent
MODELS = str(HERE / "cli_models.py")
TWO = ["-i", "2x1x28x28", "-i", "2x3x28x28"]

# name -> argv after `python -m regbn`; the "draw" case writes into the fixture's tmp folder.
SUCCESS = {
    "table": ["inspect", f"{MODELS}:two_branch", *TWO],
    "json_class_by_module_name": ["inspect", "cli_models:TwoBranch", *TWO, "--json"],
    "tokens_int64": ["inspect", f"{MODELS}:tokens", "-i", "2x7:int64", "-i", "2x5x12"],
    "draw_depth": [
        "inspect",
        f"{MODELS}:two_branch",
        *TWO,
        "--depth",
        "1",
        "--draw",
        "{tmp}/m.svg",
    ],
}
ERRORS = {
    "unknown_module": (["inspect", "no_such_module_xyz:build", "-i", "2"], "no_such_module_xyz"),
    "unknown_file": (["inspect", "missing/file.py:build", "-i", "2"], "no such file"),
    "unknown_factory": (["inspect", f"{MODELS}:two_brnch", "-i", "2"], "did you mean two_branch"),
    "no_colon": (["inspect", "cli_models", "-i", "2"], "MODULE:FACTORY"),
    "bad_shape": (["inspect", f"{MODELS}:two_branch", "-i", "2xax28"], "bad shape '2xax28'"),
    "bad_dtype": (["inspect", f"{MODELS}:two_branch", "-i", "2x3:floot"], "unknown dtype 'floot'"),
    "no_inputs": (["inspect", f"{MODELS}:two_branch"], "--input"),
    "too_few_inputs": (["inspect", f"{MODELS}:two_branch", "-i", "2x1x28x28"], "'colored'"),
    "untraceable": (["inspect", f"{MODELS}:untraceable", "-i", "2x4"], "cli_models.py:"),
    "shape_failure": (["inspect", f"{MODELS}:mismatch", "-i", "2x8", "-i", "2x5"], "'a.2'"),
    "factory_raises": (["inspect", f"{MODELS}:broken", "-i", "2"], "the factory itself fails"),
    "not_a_module": (["inspect", f"{MODELS}:not_a_model", "-i", "2"], "not an nn.Module"),
    "not_callable": (["inspect", f"{MODELS}:NOT_CALLABLE", "-i", "2"], "not a callable"),
    "bad_draw_suffix": (
        ["inspect", f"{MODELS}:two_branch", *TWO, "--draw", "m.jpg"],
        ".svg or .png",
    ),
    "bad_depth": (["inspect", f"{MODELS}:two_branch", *TWO, "--depth", "-1"], "--depth"),
    "unknown_option": (["inspect", f"{MODELS}:two_branch", "--colour"], "--colour"),
    "unknown_command": (["frobnicate"], "frobnicate"),
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


# The error paths that also run as real processes (one per stage that can fail).
IN_SUBPROCESS = ("unknown_module", "untraceable", "shape_failure")
# The successful commands that run in-process only (the others also run as real processes).
IN_PROCESS_ONLY = ("tokens_int64", "draw_depth")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    env["COLUMNS"] = "100"
    commands = {
        name: [sys.executable, "-m", "regbn", *argv]
        for name, argv in SUCCESS.items()
        if name not in IN_PROCESS_ONLY
    }
    commands |= {name: [sys.executable, "-m", "regbn", *ERRORS[name][0]] for name in IN_SUBPROCESS}
    script = Path(sys.executable).parent / "regbn"
    if script.exists():  # the console script declared in pyproject.toml
        commands["console_script"] = [str(script), *SUCCESS["table"]]
    procs = {
        name: subprocess.Popen(
            [a.replace("{tmp}", str(tmp)) for a in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp,
            env=env,
        )
        for name, cmd in commands.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = Result(proc.returncode, stdout, stderr)
    out["tmp"] = tmp  # type: ignore[assignment]
    return out


def test_table_and_fusions(results):
    r = results["table"]
    assert r.returncode == 0, r.stderr
    assert "gray_net.3" in r.stdout and "(2, 8)" in r.stdout  # the Linear's output shape
    assert "*F  cat" in r.stdout
    assert "Suggested pairs for regbn.insert" in r.stdout
    assert "pairs=[('gray_net.3', 'colored_net.3')]" in r.stdout  # module paths, as in the code
    assert max(len(line) for line in r.stdout.split("\n\n")[0].splitlines()) <= 100


def test_console_script_is_the_same_command(results):
    if "console_script" not in results:
        pytest.skip("the regbn console script is not installed in this environment")
    r = results["console_script"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == results["table"].stdout


def test_json_with_a_class_from_an_importable_module(results):
    r = results["json_class_by_module_name"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"] == "TwoBranch"
    assert [i["shape"] for i in data["inputs"]] == [[2, 1, 28, 28], [2, 3, 28, 28]]
    assert [f["kind"] for f in data["fusions"]] == ["cat"]


def run_main(argv: list[str], capsys) -> Result:
    status = main(argv)
    captured = capsys.readouterr()
    return Result(status, captured.out, captured.err)


def test_dtype_suffix(capsys):
    r = run_main(SUCCESS["tokens_int64"], capsys)
    assert r.returncode == 0, r.stderr
    assert "i64" in r.stdout and "matmul" in r.stdout


def test_inputs_by_name_and_dict_entries(capsys):
    r = run_main(
        [
            "inspect",
            f"{MODELS}:TwoBranch",
            "-i",
            "colored=2x3x28x28",
            "-i",
            "gray=2x1x28x28",
            "--json",
        ],
        capsys,
    )
    assert r.returncode == 0, r.stderr
    assert [i["name"] for i in json.loads(r.stdout)["inputs"]] == ["gray", "colored"]
    r = run_main(
        ["inspect", f"{MODELS}:DictBatch", "-i", "batch.audio=2x20", "-i", "batch.video=2x30"],
        capsys,
    )
    assert r.returncode == 0, r.stderr
    assert "batch['audio']" in r.stdout and "*F  add" in r.stdout
    r = run_main(["inspect", f"{MODELS}:TwoBranch", "-i", "gray=2", "-i", "2"], capsys)
    check_one_line_error(r.returncode, r.stdout, r.stderr, "not both")


def test_draw_and_depth(capsys, tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (the examples extra)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in SUCCESS["draw_depth"]]
    r = run_main(argv, capsys)
    assert r.returncode == 0, r.stderr
    assert re.search(r"gray_net +Sequential \(4 nodes\)", r.stdout)  # folded at depth 1
    assert ET.parse(tmp_path / "m.svg").getroot().tag.endswith("svg")
    assert r.stderr == f"regbn: wrote {tmp_path / 'm.svg'}\n"


def test_depth_0_folds_top_level_calls_as_the_api_does(capsys, monkeypatch):
    """``--depth 0`` is accepted, as ``report.table(depth=0)`` is, and prints the same table."""
    monkeypatch.syspath_prepend(str(HERE))
    r = run_main(["inspect", "cli_models:two_branch", *TWO, "--depth", "0"], capsys)
    assert r.returncode == 0, r.stderr
    assert re.search(r"gray_net +Sequential \(4 nodes\)", r.stdout)

    import cli_models

    shapes = [(2, 1, 28, 28), (2, 3, 28, 28)]
    report = inspect(cli_models.two_branch(), input_shapes=shapes)
    assert r.stdout == report.table(depth=0) + "\n"


def check_one_line_error(
    returncode: int, stdout: str, stderr: str, expected: str, prefix: str = "regbn inspect: "
) -> None:
    assert returncode == 2
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix)
    assert expected in lines[0]


def prefix_of(argv: list[str]) -> str:
    """The command that refuses: ``regbn inspect``, or ``regbn`` for an unknown command."""
    return "regbn inspect: " if argv[0] == "inspect" else "regbn: "


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_user_errors_in_a_subprocess(results, case):
    r = results[case]
    argv, expected = ERRORS[case]
    check_one_line_error(r.returncode, r.stdout, r.stderr, expected, prefix_of(argv))


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_every_user_error_is_one_line_and_status_2(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))
    argv, expected = ERRORS[case]
    r = run_main(argv, capsys)
    check_one_line_error(r.returncode, r.stdout, r.stderr, expected, prefix_of(argv))


def test_shape_failure_still_prints_the_partial_table(results):
    r = results["shape_failure"]
    assert "!!  a.2" in r.stdout and "a.1" in r.stdout


# In-process checks of the pieces (fast).


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x1x28x28", (2, 1, 28, 28)),
        ("16", (16,)),
        ("2x16:int64", ((2, 16), torch.int64)),
        ("2X3:float64", ((2, 3), torch.float64)),
    ],
)
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


def test_main_returns_the_exit_status(capsys):
    assert main(["inspect", f"{MODELS}:two_branch", "-i", "2x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regbn inspect: bad shape") and err.count("\n") == 1
    assert main(["--help"]) == 0
    assert main([]) == 2


TEXT_IMAGE = [
    "inspect",
    f"{MODELS}:text_image",
    "-i",
    "input_ids=2x5:int64",
    "-i",
    "attention_mask=2x5:int64",
    "-i",
    "pixels=2x12",
]


@pytest.mark.parametrize("leaf", [[], ["--leaf", "TextEncoder"], ["--leaf", "text"]])
def test_modalities_and_leaves(capsys, leaf):
    groups = ["--modality", "text=input_ids,attention_mask", "-m", "image=pixels"]
    assert main([*TEXT_IMAGE, *groups, *leaf, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["modality"]) for i in report["inputs"]] == [
        ("input_ids", "text"),
        ("attention_mask", "text"),
        ("pixels", "image"),
    ]
    (fusion,) = report["fusions"]
    assert fusion["modalities"] == [["text"], ["image"]]
    rows = {r["name"]: r for r in report["rows"]}
    assert ("text" in rows and rows["text"]["op"] == "call_module") == bool(leaf)


def test_without_modalities_the_mask_joins_the_text(capsys):
    assert main([*TEXT_IMAGE]) == 0
    out = capsys.readouterr().out
    assert "attention_mask  (2, 5)   int64    no modality of its own" in out
    assert "pairs=[('text', 'image')]" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--modality", "text"], "expected NAME=INPUT"),
        (["--modality", "text=input_idz"], "'input_idz' is not an input of this model"),
        (["--leaf", "TextEncodr"], "did you mean TextEncoder"),
    ],
)
def test_bad_modalities_and_leaves(capsys, extra, message):
    assert main([*TEXT_IMAGE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regbn inspect: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["inspect", f"{MODELS}:two_branch", *TWO, "-i", "2x3"],
    ],
    ids=["no_model", "too_many_inputs"],
)
def test_more_user_errors_are_one_line_and_status_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))
    r = run_main(argv, capsys)
    check_one_line_error(r.returncode, r.stdout, r.stderr, "")


# ---------------------------------------------------------------------------------------------
# The dependence at each fusion: --measure N (random batches) and --batches FILE
# ---------------------------------------------------------------------------------------------

SIXTEEN = ["-i", "16x1x28x28", "-i", "16x3x28x28"]


def test_measure_runs_random_batches_and_says_what_they_measure(capsys):
    r = run_main(["inspect", f"{MODELS}:two_branch", *SIXTEEN, "--measure", "2", "--json"], capsys)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["dependence"]["rows"]
    assert row["fusion"] == "cat" and row["n_samples"] == 32
    assert "random inputs" in r.stderr and "not the dependence in your data" in r.stderr
    table = run_main(["inspect", f"{MODELS}:two_branch", *SIXTEEN, "--measure", "2"], capsys)
    assert "dependence" in table.stdout.splitlines()[0]
    (cat,) = [line for line in table.stdout.splitlines() if line.startswith("*F  cat")]
    assert re.search(r"[+-]\d\.\d{3}\*?$", cat)  # the factory draws new weights: any value
    help_text = " ".join(run_main(["inspect", "--help"], capsys).stdout.split())
    assert "Random inputs measure the architecture" in help_text and "not the data" in help_text
    assert "--batches FILE" in help_text and "weights_only=True" in help_text


def test_batches_file_measures_the_users_batches(capsys, tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        gray = torch.rand(16, 1, 28, 28, generator=gen)
        batches.append((gray, gray.repeat(1, 3, 1, 1)))
    path = tmp_path / "batches.pt"
    torch.save(batches, path)
    # Without --input the first batch gives the shapes.
    r = run_main(["inspect", f"{MODELS}:two_branch", "--batches", str(path), "--json"], capsys)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["inputs"][0]["shape"] == [16, 1, 28, 28]
    (row,) = data["dependence"]["rows"]
    assert row["n_samples"] == 32 and "random inputs" not in r.stderr


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ({"a": torch.zeros(2)}, [], "holds a dict; expected a torch.save'd list of input tuples"),
        ([], [], "holds an empty list"),
        ("not a torch file", [], "cannot load"),
        (None, [], "no such file"),
        ([(torch.zeros(2, 1, 28, 28), torch.zeros(2, 3, 28, 28))], ["--measure", "2"], "give one"),
        ([("a", "b")], TWO, "batch 0 holds a str, not a tensor"),
        ([(torch.zeros(2, 5),)], TWO, "batch 0"),
    ],
    ids=["dict", "empty", "text", "missing", "both", "strings", "bad_shape"],
)
def test_bad_batches_are_one_line_errors(content, extra, message, capsys, tmp_path):
    path = tmp_path / "b.pt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    r = run_main(["inspect", f"{MODELS}:two_branch", "--batches", str(path), *extra], capsys)
    check_one_line_error(r.returncode, r.stdout, r.stderr, message)


def test_measure_must_be_a_positive_count(capsys):
    r = run_main(["inspect", f"{MODELS}:two_branch", *TWO, "--measure", "0"], capsys)
    check_one_line_error(r.returncode, r.stdout, r.stderr, "--measure must be an integer >= 1")
