"""Turn what users have into tensors: arrays, torch Datasets, folders of images.

Labeled data is ``(inputs, label_names)``; unlabeled data is ``inputs`` alone. ``inputs`` may
be a tensor or ndarray, a ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y)``; integer
``y`` is named through the dataset's ``classes``), or a folder of images: with one subfolder
per label it is labeled (the ImageFolder layout), with image files directly inside it is
unlabeled.

Tables: a pandas DataFrame (columns picked by name when the model has ``feature_names``) or a
``.csv`` file with a header row, whose ``label`` column (if any) holds the label names.

Raw inputs are floats: images ``(C, H, W)`` in ``[0, 1]`` (``uint8`` arrays are divided by
255, channels-last arrays are transposed), vectors ``(F,)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmeld.errors import DataError, LabelError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Data:
    """Inputs (raw, shaped like the model's input) and, when labeled, their label names."""

    inputs: torch.Tensor
    labels: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def label_indices(self, label_space: Sequence[str]) -> torch.Tensor:
        """The labels as indices into ``label_space``; an unknown label is an error."""
        if self.labels is None:
            raise DataError(f"{self.source}: labels are needed, but the data is unlabeled")
        position = {label: i for i, label in enumerate(label_space)}
        out = []
        for label in self.labels:
            if label not in position:
                known = ", ".join(repr(v) for v in list(label_space)[:12])
                raise LabelError(
                    f"{self.source}: label {label!r} is not known to any member "
                    f"(known: {known}{', ...' if len(label_space) > 12 else ''})"
                )
            out.append(position[label])
        return torch.tensor(out, dtype=torch.long)


def memory_data(
    data: Any,
    shape: tuple[int, ...],
    *,
    what: str = "data",
    feature_names: Sequence[str] | None = None,
    label_column: str = "label",
) -> Data:
    """Data that is in memory already (tensors, arrays, tables, ``(inputs, labels)``) or a CSV
    file, checked: not empty, of ``shape``, finite."""
    if data is None:
        raise DataError(f"{what}: no data given")
    if isinstance(data, Data):
        result = data
    elif isinstance(data, (str, Path)) and str(data).lower().endswith(".csv"):
        result = _read_csv(Path(data), feature_names, label_column, what)
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (int, float)):
        inputs, labels = data
        x = _to_inputs(_from_frame(inputs, feature_names, what), shape, what)
        names = _label_names(labels, what)
        if len(names) != len(x):
            raise DataError(f"{what}: {len(x)} inputs but {len(names)} labels")
        result = Data(x, names, what)
    else:
        result = Data(_to_inputs(_from_frame(data, feature_names, what), shape, what), None, what)
    if len(result) == 0:
        raise DataError(f"{what} ({result.source}): is empty; expected at least one input")
    if tuple(result.inputs.shape[1:]) != shape:
        raise DataError(
            f"{result.source}: inputs have shape {tuple(result.inputs.shape[1:])}, "
            f"the model expects {shape}"
        )
    check_finite(result.inputs, result.source)
    return result


def check_finite(inputs: torch.Tensor, source: str, positions: torch.Tensor | None = None) -> None:
    """Refuse inputs holding NaN or infinite values, naming the first such input by its index
    (its entry of ``positions`` for a batch of a larger data set)."""
    if not inputs.is_floating_point() or not len(inputs):
        return
    bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0])
        if positions is not None:
            first = int(positions[first])
        raise DataError(
            f"{source}: input {first} holds NaN or infinite values ({int(bad.sum())} of "
            f"{len(inputs)} inputs{' in its batch' if positions is not None else ''} do); a "
            "model's answer on them would mean nothing"
        )


def _from_frame(inputs: Any, feature_names: Sequence[str] | None, what: str) -> Any:
    """A pandas DataFrame as an array of the named columns (any other input as it is)."""
    if not (hasattr(inputs, "columns") and hasattr(inputs, "to_numpy")):
        return inputs
    columns = [str(c) for c in inputs.columns]
    if feature_names is None:
        return inputs.to_numpy(dtype=np.float32)
    missing = [c for c in feature_names if c not in columns]
    if missing:
        raise DataError(
            f"{what}: the table has no column {missing[0]!r}; the model reads columns "
            f"{list(feature_names)}, the table has {columns}"
        )
    return inputs[list(feature_names)].to_numpy(dtype=np.float32)


def _read_csv(
    path: Path, feature_names: Sequence[str] | None, label_column: str, what: str
) -> Data:
    import csv

    if not path.is_file():
        raise DataError(f"{what}: file {str(path)!r} does not exist")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text ({exc}); save the table as UTF-8 CSV"
        ) from exc
    except csv.Error as exc:
        raise DataError(f"{str(path)!r} is not a readable CSV file: {exc}") from exc
    if not rows:
        raise DataError(f"{what}: {str(path)!r} is empty; expected a header row and data rows")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    wanted = (
        list(feature_names)
        if feature_names is not None
        else [h for h in header if h != label_column]
    )
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{str(path)!r}: no column {missing[0]!r}; the model reads columns {wanted}, the file "
            f"has {header}"
        )
    at = [header.index(c) for c in wanted]
    values = np.zeros((len(body), len(at)), dtype=np.float32)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{str(path)!r}: row {r + 2} has {len(row)} fields, the header has {len(header)}"
            )
        for j, i in enumerate(at):
            try:
                values[r, j] = value = float(row[i])
            except ValueError:
                raise DataError(
                    f"{str(path)!r}: row {r + 2}, column {header[i]!r}: {row[i]!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise DataError(
                    f"{str(path)!r}: row {r + 2}, column {header[i]!r}: {row[i]!r} is not a "
                    "finite number"
                )
    labels = None
    if label_column in header:
        li = header.index(label_column)
        labels = [row[li].strip() for row in body]
    return Data(torch.from_numpy(values), labels, str(path))


def _label_names(labels: Any, what: str) -> list[str]:
    if isinstance(labels, (torch.Tensor, np.ndarray)) or hasattr(labels, "tolist"):
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise DataError(
            f"{what}: labels must be a sequence of label names, got {type(labels).__name__}"
        )
    names = []
    for v in labels:
        if not isinstance(v, str):
            raise DataError(
                f"{what}: labels must be label names (str), got {type(v).__name__} {v!r}; "
                "netmeld aligns labels by name, never by position"
            )
        names.append(v)
    return names


def _to_inputs(inputs: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if isinstance(inputs, np.ndarray):
        if inputs.dtype == object:
            raise DataError(f"{what}: inputs are an object array; expected numbers")
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if not isinstance(inputs, torch.Tensor):
        raise DataError(
            f"{what}: expected a tensor, ndarray, torch Dataset or folder, "
            f"got {type(inputs).__name__}"
        )
    x = inputs
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    if len(shape) == 3 and x.dim() == 3 and shape[0] == 1:
        x = x.unsqueeze(1)
    if len(shape) == 3 and x.dim() == 4 and x.shape[1] != shape[0] and x.shape[-1] == shape[0]:
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dim() == 0:
        raise DataError(f"{what}: inputs are a scalar; expected a batch of shape (N, *{shape})")
    return x


def item_label(y: Any, classes: Sequence[str] | None, what: str, i: int) -> str:
    """A Dataset item's label as a name (an integer is named through ``classes``)."""
    if isinstance(y, torch.Tensor):
        y = y.item()
    if isinstance(y, (int, np.integer)):
        if classes is None:
            raise DataError(
                f"{what}: item {i} has integer label {int(y)} and the Dataset has no "
                "'classes' to name it; return label names or set dataset.classes"
            )
        return str(classes[int(y)])
    return str(y)


def _item_tensor(x: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    try:
        from PIL import Image

        if isinstance(x, Image.Image):
            return _pil_to_tensor(x, shape)
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    t = _to_inputs(np.asarray(x)[None] if not isinstance(x, torch.Tensor) else x[None], shape, what)
    return t[0]


def _pil_to_tensor(image: Any, shape: tuple[int, ...]) -> torch.Tensor:
    from PIL import Image

    channels, height, width = shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_image(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """One image file as a ``(C, H, W)`` float tensor in ``[0, 1]``, resized to ``shape``."""
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3:
        raise DataError(f"{str(path)!r}: the model reads vectors of shape {shape}, not images")
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_tensor(image, shape)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {str(path)!r} cannot be read: {exc}") from exc


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def name_files(paths: Sequence[Path], root: Path | None = None, shown: int = 5) -> str:
    """The first ``shown`` of ``paths`` (relative to ``root``), and how many more, for a
    message."""
    names = ", ".join(str(p.relative_to(root) if root else p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _warn_skipped(folder: Path, places: list[Path]) -> None:
    """Say which files of an image folder are not read (not images by their suffix)."""
    skipped = sorted(
        p
        for place in places
        for p in place.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
    )
    if skipped:
        warnings.warn(
            f"{str(folder)!r}: {len(skipped)} files are not images and are not read "
            f"({name_files(skipped, folder)}); images end in {', '.join(sorted(IMAGE_SUFFIXES))}",
            stacklevel=4,
        )


def scan_folder(folder: Path, what: str) -> list[tuple[Path, str | None]]:
    """The image files of ``folder`` and their labels (its subfolders' names; ``None`` for a
    folder of images alone), naming the files it does not read."""
    if not folder.exists():
        raise DataError(f"{what}: folder {str(folder)!r} does not exist")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, str | None]] = []
    if subdirs:
        for sub in subdirs:
            found = image_files(sub)
            if not found:
                raise DataError(
                    f"{what}: label folder {str(sub)!r} has no images "
                    f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files.extend((p, sub.name) for p in found)
    else:
        files = [(p, None) for p in image_files(folder)]
    _warn_skipped(folder, [folder, *subdirs] if subdirs else [folder])
    if not files:
        raise DataError(
            f"{what}: folder {str(folder)!r} has no images and no label subfolders; expected "
            "image files, or one subfolder of images per label"
        )
    return files
