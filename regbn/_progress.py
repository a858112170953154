"""Progress bars for long work: ``tqdm.auto`` (a widget in notebooks, text in terminals) when
tqdm is installed and the caller wants one; otherwise a bar that shows nothing."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True) -> Any:
    """A bar counting ``total`` ``unit``s, labelled ``desc``; silent when not ``enabled`` or
    without tqdm. Close it when done (it leaves no line behind)."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm  # optional (the examples extra), imported on use only
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
