"""docs/api.md is the public API's docstrings.

Regenerate it with ``PYTHONPATH=. python tests/test_api_docs.py`` after changing one. The
entry points' docstrings must appear there whole; every other public name by its first line.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import regbn

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
# The entry points whose docstrings carry Google-style sections, by their path under regbn
# (SyncRegBN is imported from regbn.distributed).
SECTIONED = [
    "insert", "remove", "inspect", "find_fusions", "measure_dependence", "fold",
    "RegBN", "distributed.SyncRegBN", "convert_sync_regbn",
]

HEADER = """# API reference

Generated from the docstrings of the names in `regbn.__all__` by
`PYTHONPATH=. python tests/test_api_docs.py`; `tests/test_api_docs.py` fails when this page and the
docstrings differ. Layout and import paths: [layout.md](layout.md).
"""


def _resolve(name: str):
    obj = regbn
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _entry(name: str) -> str:
    obj = _resolve(name)
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        title = f"## `regbn.{name}` (class)"
        try:
            signature = f"regbn.{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = f"regbn.{name}"
    else:
        title = f"## `regbn.{name}`"
        signature = f"regbn.{name}{inspect.signature(obj)}"
    return f"{title}\n\n```python\n{signature}\n```\n\n```text\n{doc}\n```\n"


def render() -> str:
    order = SECTIONED + sorted(n for n in regbn.__all__ if n not in SECTIONED)
    return HEADER + "".join(f"\n{_entry(name)}" for name in order)


STALE = "docs/api.md is stale: run PYTHONPATH=. python tests/test_api_docs.py"


def test_api_md_holds_the_entry_points_docstrings_whole():
    text = API.read_text()
    for name in SECTIONED:
        assert _entry(name) in text, f"regbn.{name}: {STALE}"


def test_every_public_name_is_documented():
    text = API.read_text()
    for name in regbn.__all__:
        assert f"## `regbn.{name}`" in text, name
        first = (inspect.getdoc(getattr(regbn, name)) or "").splitlines()[0]
        assert first and first in text, f"regbn.{name}: {STALE}"


def test_entry_points_have_google_sections():
    for name in SECTIONED:
        doc = inspect.getdoc(_resolve(name)) or ""
        for section in ("Args:", "Returns:", "Raises:", "Example:"):
            assert f"\n{section}\n" in doc, f"regbn.{name} has no {section} section"


if __name__ == "__main__":
    API.write_text(render())
    sys.stdout.write(f"wrote {API}\n")
