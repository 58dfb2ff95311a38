"""Progress bars (rich) that stay quiet when nobody is watching."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    if os.environ.get("NETMELD_PROGRESS") in ("0", "1"):
        return os.environ["NETMELD_PROGRESS"] == "1"
    return sys.stderr.isatty()


def track(
    items: Iterable[T], description: str, *, total: int | None = None, enabled: bool | None = None
) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar on stderr when ``enabled`` (default: a TTY)."""
    if not progress_enabled(enabled):
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
