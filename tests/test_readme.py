"""The README's tour runs as written, its links lead somewhere, and it stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

import regbn

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

# [text](dest) and ![alt](dest), with an optional "title"; code is not prose, so fences and
# inline code are cut out before links are read.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def test_tour_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert isinstance(scope["layer"], regbn.RegBN) and scope["layer"].last_lambda > 0
    assert (tmp_path / "model.svg").stat().st_size > 0
    assert "regbn_0" in dict(scope["patched"].named_children())
    assert "Suggested pairs" in capsys.readouterr().out


def _prose(text: str) -> str:
    return _CODE.sub("", _FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces become hyphens."""
    kept = "".join(
        c for c in heading.strip().lower() if c in " -_" or unicodedata.category(c)[0] in "LN"
    )
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_anchor(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)}


def _relative_links(page: Path) -> list[tuple[Path, str]]:
    """(folder the link is read from, destination) of each link that is not a URL.

    A docs page's "## For the README" section holds lines written to be pasted into the README,
    so its links are read from the README's folder.
    """
    text = _prose(page.read_text())
    pasted = re.search(r"^## For the README\s*$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    parts = [(page.parent, text)]
    if pasted and page != README:
        parts = [(page.parent, text[: pasted.start()] + text[pasted.end() :])]
        parts.append((README.parent, pasted.group(1)))
    return [
        (base, dest)
        for base, part in parts
        for dest in _LINK.findall(part)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", dest, flags=re.I)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
    broken = []
    for base, dest in _relative_links(page):
        path, _, fragment = dest.partition("#")
        linked = (base / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{dest} (no file {os.path.relpath(linked, REPO)})")
        elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
            broken.append(f"{dest} (no heading #{fragment} in {os.path.relpath(linked, REPO)})")
    assert not broken, f"{page.relative_to(REPO)} links to: " + "; ".join(broken)


def test_link_reader_sees_links_and_skips_code():
    text = "[a](docs/x.md) `[b](y.md)` ![c](img.png \"t\") [d](https://x.org)\n```\n[e](z.md)\n```\n"
    assert _LINK.findall(_prose(text)) == ["docs/x.md", "img.png", "https://x.org"]
    assert _anchor("`regbn.fold`: RegBN as plain torch ops") == "regbnfold-regbn-as-plain-torch-ops"


def test_pasted_section_links_are_read_from_the_readme(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](x.md)\n## For the README\n[b](docs/y.md)\n## Next\n[c](z.md)\n")
    assert _relative_links(page) == [
        (tmp_path, "x.md"),
        (tmp_path, "z.md"),
        (README.parent, "docs/y.md"),
    ]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/*.md"


def test_readme_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_commands = [line.strip() for line in ci if line.strip().startswith("python -m pytest")]
    assert len(ci_commands) == 1, ci_commands
    block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert block, "the README has no bash block"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands  # the experiment, then the tests
    assert commands[1].split("&&")[-1].strip() == ci_commands[0]


def test_benchmark_tables_are_the_results_json():
    """docs/benchmarks.md's tables are what benchmarks/render_docs.py makes of the JSON."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "render_docs.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
