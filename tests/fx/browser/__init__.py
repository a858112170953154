"""Render a report's HTML in headless Chromium inside JupyterLab's light or dark theme.

`page` builds the document (the vendored theme CSS, the report inside a notebook output's
classes, and optionally the probe script); `dump` returns the probe's measurements and
`screenshot` writes a PNG. `chromium` finds the browser: a test without it skips, except under
``CI=true``, where `.ci/run` installs Debian's chromium and a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html import unescape
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1",
]  # fmt: skip


def chromium() -> str:
    """The browser's path; skip (or fail under CI=true) when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: Debian's chromium is missing (.ci/run installs it)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return found


def page(body: str, theme: str, probe: bool = False) -> str:
    css = (HERE / "jupyterlab_theme.css").read_text()
    script = f"<script>{(HERE / 'probe.js').read_text()}</script>" if probe else ""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{css}</style></head>'
        f'<body data-jp-theme="{theme}"><div class="jp-RenderedHTMLCommon">{body}</div>'
        f'<pre id="probe"></pre>{script}</body></html>'
    )


def _run(args: list[str], document: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "page.html"
        path.write_text(document)
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={tmp}/profile", *args, path.as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def dump(body: str, theme: str) -> list[dict]:
    """The probe's measurements of ``body`` rendered in ``theme`` ("light" or "dark")."""
    dom = _run(["--dump-dom"], page(body, theme, probe=True))
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the probe wrote nothing"
    return json.loads(unescape(found.group(1)))


def screenshot(body: str, theme: str, path: Path, size: tuple[int, int] = (1100, 700)) -> Path:
    _run([f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], page(body, theme))
    return path
