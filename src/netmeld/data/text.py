"""Text as data: lists of strings, CSV tables with a ``text`` column, folders of ``.txt`` files.

A model of text members reads its inputs as their UTF-8 bytes in a fixed-width tensor (each
byte plus one, zero-padded to :data:`TEXT_BYTES`), so texts flow through the same streams,
batches and feature caches as images and tables, and each member tokenises them with its own
tokenizer. A text longer than :data:`TEXT_BYTES` bytes is cut there (with a warning): no
transformer here reads more than 512 tokens, about 2,000 characters. The width is an odd
number on purpose: a model whose input has it is a text model (:func:`is_text_shape`), never
a table of 4,096 features.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from netmeld.errors import DataError

TEXT_BYTES = 4099
TEXT_SHAPE = (TEXT_BYTES,)
MAX_TEXT_FILE = 16 * 2**20


def is_text_shape(shape: Sequence[int]) -> bool:
    """Whether a model with this input shape reads texts."""
    return tuple(int(s) for s in shape) == TEXT_SHAPE


def looks_textual(data: Any) -> bool:
    """Data a text model reads as texts: strings, ``(strings, labels)``, a CSV, a folder, a
    ``.txt`` file."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        return True
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (list, tuple)):
        return bool(data[0]) and all(isinstance(d, str) for d in data[0])
    return isinstance(data, (str, Path))


def encode_texts(texts: Sequence[str], what: str = "texts") -> torch.Tensor:
    """``(N, TEXT_BYTES)`` float tensor of the texts' UTF-8 bytes plus one, zero-padded."""
    out = torch.zeros(len(texts), TEXT_BYTES)
    cut = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{what}: item {i} is a {type(text).__name__}, not a string")
        raw = text.encode("utf-8")
        if len(raw) > TEXT_BYTES:
            raw, cut = raw[:TEXT_BYTES], cut + 1
        if raw:
            out[i, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float() + 1
    if cut:
        warnings.warn(
            f"{what}: {cut} of {len(texts)} texts are longer than {TEXT_BYTES} bytes and were cut",
            stacklevel=3,
        )
    return out


def decode_texts(encoded: torch.Tensor) -> list[str]:
    """The texts :func:`encode_texts` encoded (a text cut mid-character loses that character)."""
    texts = []
    for row in encoded.detach().cpu():
        codes = row[row > 0].round().clamp(1, 256).to(torch.int64) - 1
        texts.append(bytes(codes.tolist()).decode("utf-8", errors="ignore"))
    return texts


def _read_text_file(path: Path) -> str:
    if path.stat().st_size > MAX_TEXT_FILE:
        raise DataError(f"{str(path)!r} is larger than {MAX_TEXT_FILE:,} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text: {exc}") from exc


def _text_folder(folder: Path, what: str) -> tuple[list[str], list[str] | None]:
    """``.txt`` files of ``folder`` (unlabeled) or of its subfolders (one per label)."""
    flat = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if flat and subfolders:
        raise DataError(
            f"{str(folder)!r}: holds both .txt files and subfolders; give unlabeled texts "
            "(.txt files) or one subfolder per label"
        )
    if flat:
        return [_read_text_file(p) for p in flat], None
    texts: list[str] = []
    labels: list[str] = []
    for sub in subfolders:
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        texts.extend(_read_text_file(p) for p in files)
        labels.extend([sub.name] * len(files))
    if not texts:
        raise DataError(f"{what}: {str(folder)!r} holds no .txt files")
    return texts, labels


def _text_csv(path: Path, label_column: str, what: str) -> tuple[list[str], list[str] | None]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{str(path)!r} is not a readable CSV file: {exc}") from exc
    if not rows or "text" not in [h.strip() for h in rows[0]]:
        raise DataError(f"{what}: {str(path)!r} needs a 'text' column (and '{label_column}')")
    header = [h.strip() for h in rows[0]]
    ti = header.index("text")
    li = header.index(label_column) if label_column in header else None
    texts, labels = [], []
    for r, row in enumerate(rows[1:]):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{str(path)!r}: row {r + 2} has {len(row)} fields, the header has {len(header)}"
            )
        texts.append(row[ti])
        if li is not None:
            labels.append(row[li].strip())
    return texts, labels if li is not None else None


def read_texts(
    data: Any, what: str = "data", label_column: str = "label"
) -> tuple[list[str], list[str] | None, str]:
    """``(texts, labels or None, source)`` from a list of strings, ``(texts, labels)``, a CSV
    file with a ``text`` column, or a folder of ``.txt`` files."""
    if data is None:
        raise DataError(f"{what}: no data given")
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], str):
        texts, labels = data
        texts, labels = list(texts), [str(label) for label in labels]
        if len(texts) != len(labels):
            raise DataError(f"{what}: {len(texts)} texts but {len(labels)} labels")
        return texts, labels, what
    if isinstance(data, (list, tuple)):
        return list(data), None, what
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            texts, labels = _text_folder(path, what)
        elif path.suffix.lower() == ".csv" and path.is_file():
            texts, labels = _text_csv(path, label_column, what)
        elif path.suffix.lower() == ".txt" and path.is_file():
            texts, labels = [_read_text_file(path)], None
        else:
            raise DataError(
                f"{what}: {str(path)!r} is not a folder of .txt files, a .csv table or a .txt "
                "file (a list of strings is read as texts)"
            )
        return texts, labels, str(path)
    raise DataError(
        f"{what}: a text model reads a list of strings, (texts, labels), a CSV with a 'text' "
        f"column or a folder of .txt files; got {type(data).__name__}"
    )
