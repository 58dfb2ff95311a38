"""Putting a finished folder in place in one step: a crash never leaves a half-written one, and
what a crash leaves behind is put right by the next write.

A write builds the folder in a temporary folder beside the destination (:func:`make_temp`:
``.NAME.tmp-PID-XXXXXXXX``) and :func:`swap_in` puts it in place with two renames: the
existing ``NAME`` to ``.NAME.old-PID``, then the new folder to ``NAME``; the old copy is
deleted last. A process killed in between leaves these names behind; the next write to the
destination (or a resume, :func:`recover`) restores a missing destination from its old copy
and removes old copies that a finished swap superseded, and the next write to the same parent
folder removes the temporary folders of processes that are no longer running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from netmeld.errors import DataError, ModelFileError, NetmeldError

_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[a-z0-9_]{8}$")
_OLD_SUFFIX = re.compile(r"^\.old-(\d+)$")
_LOCK = threading.Lock()  # one swap at a time in this process


def _running(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when in doubt: yes)."""
    if pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove the temporary folders (``.NAME.tmp-PID-XXXXXXXX``) in ``parent`` that processes
    no longer running left behind; return what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _running(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def make_temp(path: Path) -> Path:
    """A new empty temporary folder beside ``path`` for building it; its name carries this
    process's id, so a later write can tell it is stale once the process is gone. Stale
    temporary folders in the same parent are removed first."""
    clean_stale(path.parent)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))


def _old_copies(path: Path) -> list[tuple[Path, int]]:
    """The old copies ``.NAME.old-PID`` of ``path`` that no running swap is using."""
    prefix = f".{path.name}"
    found: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _OLD_SUFFIX.match(entry.name[len(prefix) :])
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        # this process's own copy is a failed swap's (swaps in this process are serialised)
        if pid == os.getpid() or not _running(pid):
            found.append((Path(entry.path), pid))
    return found


def recover(path: Path) -> Path | None:
    """Put right what a swap interrupted by a crash left at ``path``: a missing ``path`` is
    restored from its old copy (with a warning; the newest where there are several), and old
    copies a finished swap superseded are removed. Returns the copy restored, if any."""
    path = Path(path)
    olds = _old_copies(path)
    if not olds:
        return None
    restored = None
    if not os.path.lexists(path):
        newest, pid = max(olds, key=lambda o: o[0].stat().st_mtime_ns)
        os.replace(newest, path)
        olds.remove((newest, pid))
        restored = newest
        warnings.warn(
            f"{str(path)!r} was missing: restored it from {newest.name!r}, the copy a write "
            f"interrupted in process {pid} left beside it",
            stacklevel=2,
        )
    for old, _ in olds:
        shutil.rmtree(old, ignore_errors=True)
    return restored


def swap_in(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path``; an existing ``path`` is moved aside first
    and deleted only after the new folder is in place (if the second move fails, it is moved
    back). What an interrupted earlier swap left is put right first (:func:`recover`); if that
    restored a missing ``path``, the restored folder is not replaced unseen: an error says so
    and a second write replaces it."""
    with _LOCK:
        restored = recover(path)
        clean_stale(path.parent)
        if restored is not None:
            raise ModelFileError(
                f"{str(path)!r} was restored from {restored.name!r} (an interrupted write left "
                "it); it was not replaced: look at it, then write again to replace it"
            )
        if not path.exists():
            os.replace(tmp, path)
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(
    path: Path,
    overwrite: bool,
    ours: Callable[[Path], bool],
    what: str,
    error: type[NetmeldError] = DataError,
) -> None:
    """Refuse (``error``) to write file ``path`` over a folder or a link, over an existing file
    without ``overwrite``, or over one that ``ours`` does not recognise as ``what`` netmeld
    wrote."""
    if path.is_dir() or path.is_symlink():
        raise error(f"{str(path)!r} is a folder or a link; expected a file name")
    if path.exists():
        if not overwrite:
            raise error(f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")
        if not ours(path):
            raise error(f"{str(path)!r} is not {what} netmeld wrote; refusing to replace it")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` to write; renamed onto ``path`` when the block
    ends, removed if it raises, so ``path`` is never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
