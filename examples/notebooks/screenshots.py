"""Screenshots of the example notebooks as JupyterLab shows them, light and dark.

Runs each notebook (the main one in quick mode), exports it with nbconvert's JupyterLab template
in the light and the dark theme, and photographs the page with headless Chromium (Debian's
`chromium`). Writes docs/screenshots/<notebook>_<theme>.png.

    pip install nbconvert nbclient ipykernel
    python examples/notebooks/screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "docs" / "screenshots"
NOTEBOOKS = {"patch_a_pretrained_model": 4200, "two_tower_image_text": 3600}  # page height, px
CHROMIUM = [
    "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
]  # fmt: skip


def run(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    os.environ["REGBN_NOTEBOOK_QUICK"] = "1"
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def shoot(nb: nbformat.NotebookNode, name: str, theme: str, height: int) -> Path:
    html, _ = HTMLExporter(template_name="lab", theme=theme).from_notebook_node(nb)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html)
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [*CHROMIUM, f"--user-data-dir={tmp}/profile", f"--screenshot={shot}",
             f"--window-size=1100,{height}", page.as_uri()],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        image = Image.open(shot).convert("RGB")
    out = OUT / f"{name}_{theme}.png"
    # A palette keeps the page's text sharp at a fraction of the size.
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, height in NOTEBOOKS.items():
        nb = run(name)
        for theme in ("light", "dark"):
            print(shoot(nb, name, theme, height), file=sys.stderr)


if __name__ == "__main__":
    main()
