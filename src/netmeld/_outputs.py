"""What ``overwrite`` may replace: only what netmeld wrote.

Every folder netmeld writes (a saved model, a merged checkpoint) holds a marker file,
:data:`MARKER`; ``overwrite=True`` (``--overwrite``) replaces an existing path only when it is
such a folder (or a model folder of netmeld 0.1.0, recognised by its ``netmeld.json``). A file, a
symbolic link, or a folder netmeld did not write is refused with the reason, and nothing is
removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from netmeld._version import __version__
from netmeld.errors import ModelFileError

MARKER = ".netmeld-output"


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` (before it is swapped into place) as netmeld's ``kind`` of output."""
    text = json.dumps({"written_by": "netmeld", "version": __version__, "kind": kind})
    (folder / MARKER).write_text(text + "\n", encoding="utf-8")


def _written_by_netmeld(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    config = folder / "netmeld.json"  # model folders saved before the marker existed
    try:
        return (
            config.is_file()
            and json.loads(config.read_text(encoding="utf-8")).get("format") == "netmeld"
        )
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(path: Path, *, overwrite: bool) -> None:
    """Refuse to write ``path`` when something is there that netmeld may not replace."""
    if path.is_symlink():
        raise ModelFileError(
            f"{str(path)!r} is a symbolic link; netmeld neither writes through nor replaces "
            "links: give the real path"
        )
    if not path.exists():
        return
    if not overwrite:
        raise ModelFileError(
            f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it"
        )
    if not path.is_dir():
        raise ModelFileError(
            f"{str(path)!r} exists and is a file, not a folder netmeld wrote; "
            "refusing to replace it"
        )
    if not _written_by_netmeld(path):
        raise ModelFileError(
            f"{str(path)!r} exists and is not a folder netmeld wrote (no {MARKER}); refusing to "
            "replace it, even with overwrite"
        )
