"""Progress bars (rich) that stay quiet when nobody is watching."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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


def track_items(
    batches: Iterable[T],
    description: str,
    *,
    total: int,
    size: Callable[[T], int],
    unit: str = "inputs",
    enabled: bool | None = None,
) -> Iterator[T]:
    """Iterate ``batches`` with a progress bar counted in items (``size(batch)`` each) and
    their rate (``unit`` per second) when ``enabled`` (default: a TTY)."""
    if not progress_enabled(enabled):
        yield from batches
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "", style="cyan")

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for batch in batches:
            yield batch
            bar.advance(task, size(batch))
