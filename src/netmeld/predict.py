"""Predictions over data of any size: read batch by batch, run on a device, written row by row.

``netmeld.predict(model, data)`` yields one :class:`Prediction` per input, in order;
:func:`write_predictions` writes them to a ``.csv`` or ``.jsonl`` file as they come (the file
appears, whole, when the last row is written).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from netmeld._atomic import check_replaceable, replacing
from netmeld.data import open_data
from netmeld.errors import DataError
from netmeld.model.combined import CombinedModel
from netmeld.runtime import autocast, on_device, resolve_device


@dataclass
class Prediction:
    """One input's answer: the ``top`` labels with their probabilities, best first."""

    index: int  # the input's position in the data
    file: str | None  # the image file, for files and folders
    top: list[tuple[str, float]]

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def probability(self) -> float:
        return self.top[0][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "label": self.label,
            "probability": self.probability,
            "predictions": [[label, p] for label, p in self.top],
        }


@torch.no_grad()
def predict(
    model: CombinedModel,
    data: Any,
    *,
    top: int = 1,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    skip_unreadable: bool = False,
    progress: bool | None = None,
) -> Iterator[Prediction]:
    """``model``'s predictions for ``data`` (a folder, image files, a CSV file, a tensor, ...),
    one per input in order, computed a batch at a time on ``device`` (a generator: nothing
    runs until it is iterated, and only one batch is in memory at once)."""
    if top < 1:
        raise DataError(f"top must be at least 1, got {top}")
    stream = open_data(
        data,
        model.input_shape,
        what="prediction data",
        feature_names=model.feature_names,
        skip_unreadable=skip_unreadable,
    )
    dev = resolve_device(device)
    labels = model.labels
    k = min(top, len(labels))
    model.eval()
    with on_device(model, dev):
        for batch in stream.batches(
            batch_size, workers=workers, progress=progress, description="predicting"
        ):
            with autocast(dev, precision):
                probs = model(batch.inputs.to(dev, non_blocking=True)).float().softmax(1)
            values, idx = probs.cpu().topk(k, dim=1)
            for i, v, j in zip(batch.index.tolist(), values.tolist(), idx.tolist(), strict=True):
                file = str(stream.files[i]) if stream.files is not None else None
                yield Prediction(i, file, [(labels[c], p) for c, p in zip(j, v, strict=True)])


CSV_HEADER = ["file", "index", "label", "probability", "top"]


def _written_by_netmeld(path: Path) -> bool:
    """Whether ``path`` starts as a predictions file netmeld writes (its header, or a JSON
    line with its keys)."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix.lower() == ".csv":
        return first == ",".join(CSV_HEADER)
    try:
        return set(json.loads(first)) == {"file", "index", "label", "probability", "predictions"}
    except (ValueError, TypeError):
        return False


def write_predictions(
    predictions: Iterable[Prediction], path: str | Path, *, overwrite: bool = False
) -> int:
    """Write ``predictions`` to ``path`` (``.csv``: file, index, label, probability and the
    top labels as ``label:probability`` joined by ``;``; ``.jsonl``: one JSON object per
    line), streaming, through a temporary file renamed at the end; returns the row count.
    An existing file is replaced only with ``overwrite`` and only if netmeld wrote it."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise DataError(f"{str(path)!r}: predictions are written as .csv or .jsonl")
    check_replaceable(path, overwrite, _written_by_netmeld, "a predictions file")
    n = 0
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh) if kind == ".csv" else None
        if writer is not None:
            writer.writerow(CSV_HEADER)
        for p in predictions:
            if writer is not None:
                top = ";".join(f"{label}:{v:.6f}" for label, v in p.top)
                writer.writerow([p.file or "", p.index, p.label, f"{p.probability:.6f}", top])
            else:
                fh.write(json.dumps(p.to_dict()) + "\n")
            n += 1
    return n
