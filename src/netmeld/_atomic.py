"""Putting a finished folder in place in one step: a crash never leaves a half-written one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_in(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path``; an existing ``path`` is moved aside first
    and deleted only after the new folder is in place."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
