"""Data read batch by batch: what every verb runs over, so no verb holds a data set in memory.

:func:`open_data` turns what a user has (a folder of images, a CSV file, a ``Dataset``, a
tensor, an ndarray, a DataFrame) into a :class:`Stream`. A stream knows its length, its labels
when they are known before reading (folders, tables, tensors), the files it reads, and a
fingerprint of its content (what the feature cache keys on). :meth:`Stream.batches` yields
:class:`Batch` es: images are decoded, resized and converted in ``DataLoader`` workers, a few
batches ahead of the model, and only those batches are alive at once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from netmeld._progress import track_items
from netmeld.data.reading import (
    Data,
    _item_tensor,
    check_finite,
    item_label,
    memory_data,
    name_files,
    read_image,
    scan_folder,
)
from netmeld.data.text import encode_texts, is_text_shape, looks_textual, read_texts
from netmeld.errors import DataError
from netmeld.runtime import tensor_digest


def default_workers() -> int:
    """Decoding workers for image folders and Datasets: one core is left to the model, at most
    8 workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


@dataclass
class Batch:
    """Consecutive inputs of a stream: ``index`` holds their positions in the stream (an
    unreadable file left out with ``skip_unreadable`` leaves a gap)."""

    inputs: torch.Tensor
    index: torch.Tensor
    labels: list[str] | None

    def __len__(self) -> int:
        return len(self.inputs)


class _Items(torch.utils.data.Dataset):
    """Item ``i`` as ``(input or None, label or None, problem or None)``: a worker never raises
    (its traceback would reach the user); the main process turns a problem into an error."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None, str | None]:
        raise NotImplementedError


class _FileItems(_Items):
    def __init__(
        self, files: Sequence[Path], labels: Sequence[str] | None, shape: tuple[int, ...]
    ) -> None:
        self.files, self.labels, self.shape = list(files), labels, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None, str | None]:
        label = None if self.labels is None else self.labels[i]
        try:
            return read_image(self.files[i], self.shape), label, None
        except DataError as exc:
            return None, label, str(exc)


class _DatasetItems(_Items):
    def __init__(self, ds: Any, shape: tuple[int, ...], what: str) -> None:
        self.ds, self.shape, self.what = ds, shape, what
        self.classes = getattr(ds, "classes", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None, str | None]:
        try:
            item = self.ds[i]
            label = None
            if isinstance(item, (tuple, list)) and len(item) == 2:
                item, y = item
                label = item_label(y, self.classes, self.what, i)
            x = _item_tensor(item, self.shape, f"{self.what} item {i}")
            if tuple(x.shape) != self.shape:
                raise DataError(
                    f"{self.what}: item {i} has shape {tuple(x.shape)}, the model expects "
                    f"{self.shape}"
                )
            return x, label, None
        except DataError as exc:
            return None, None, str(exc)


def _collate(
    items: list[tuple[int, tuple[torch.Tensor | None, str | None, str | None]]],
) -> tuple[torch.Tensor | None, torch.Tensor, list[str | None], list[tuple[int, str]]]:
    kept = [(i, x, label) for i, (x, label, _) in items if x is not None]
    problems = [(i, p) for i, (_, _, p) in items if p is not None]
    inputs = torch.stack([x for _, x, _ in kept]) if kept else None
    index = torch.tensor([i for i, _, _ in kept], dtype=torch.long)
    return inputs, index, [label for _, _, label in kept], problems


class _Indexed(torch.utils.data.Dataset):
    """Items with their positions (what the collate function needs to report gaps)."""

    def __init__(self, items: _Items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor | None, str | None, str | None]]:
        return i, self.items[i]


@dataclass
class Stream:
    """A data set read batch by batch (see :func:`open_data`)."""

    source: str
    length: int
    shape: tuple[int, ...]
    labels: list[str] | None  # known before reading (folders, tables, tensors)
    labeled: bool
    files: list[Path] | None = None  # the image files, in stream order
    root: Path | None = None
    tensor: torch.Tensor | None = None  # in-memory inputs (tensors, arrays, tables)
    items: _Items | None = None  # what workers read (folders, Datasets)
    skip_unreadable: bool = False
    skipped: list[int] = field(default_factory=list)  # positions left out by the last pass
    _fingerprint: str | None = None

    def __len__(self) -> int:
        return self.length

    def batches(
        self,
        batch_size: int = 256,
        *,
        workers: int | None = None,
        progress: bool | None = None,
        description: str | None = None,
        positions: torch.Tensor | None = None,
    ) -> Iterator[Batch]:
        """The stream's batches in order (of ``positions`` only, when given: a rank's share).

        Non-finite inputs are an error naming the input's position; an unreadable file is an
        error naming it, or with ``skip_unreadable`` left out, and all those left out are named
        in one warning at the end of the pass (and kept in :attr:`skipped`)."""
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        order = torch.arange(self.length) if positions is None else positions
        total = len(order)
        self.skipped = []
        raw = self._raw_batches(order, batch_size, workers)
        text = description or f"reading {self.source}"
        sizes = track_items(raw, text, total=total, size=lambda b: len(b[1]), enabled=progress)
        for inputs, index, labels, problems in sizes:
            for i, problem in problems:
                if not self.skip_unreadable or self.files is None:
                    raise DataError(problem)
                self.skipped.append(i)
            if inputs is None:
                continue
            if self.labeled and any(label is None for label in labels):
                at = int(index[[label is None for label in labels].index(True)])
                raise DataError(f"{self.source}: item {at} has no label but other items have")
            if not self.labeled and self.items is not None and any(labels):
                raise DataError(f"{self.source}: some items have labels and others do not")
            check_finite(inputs, self.source, index)
            yield Batch(inputs, index, labels if self.labeled else None)  # type: ignore[arg-type]
        if self.skipped and self.files is not None:
            warnings.warn(
                f"{self.source}: skipped {len(self.skipped)} of {total} images that cannot be "
                f"read ({name_files([self.files[i] for i in self.skipped], self.root)})",
                stacklevel=2,
            )

    def _raw_batches(
        self, order: torch.Tensor, batch_size: int, workers: int | None
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str | None], list[Any]]]:
        if self.tensor is not None:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                labels: list[str | None] = (
                    [self.labels[int(i)] for i in idx] if self.labels is not None else []
                )
                yield self.tensor[idx], idx, labels, []
            return
        assert self.items is not None
        workers = default_workers() if workers is None else workers
        subset = torch.utils.data.Subset(_Indexed(self.items), order.tolist())
        loader = torch.utils.data.DataLoader(
            subset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=2 if workers else None,
        )
        yield from loader

    def read(self, progress: bool | None = None, positions: torch.Tensor | None = None) -> Data:
        """All of the stream (or its ``positions``) in memory, as :class:`Data`: for the few
        methods that train on raw inputs."""
        if self.tensor is not None and positions is None:
            return Data(self.tensor, self.labels, self.source)
        xs, labels = [], []
        for batch in self.batches(progress=progress, positions=positions):
            xs.append(batch.inputs)
            labels.extend(batch.labels or [])
        if not xs:
            raise DataError(f"{self.source}: no input could be read")
        return Data(torch.cat(xs), labels if self.labeled else None, self.source)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """The inputs at ``positions``, read now (files in a few threads; for training loops
        that draw their own batches). An unreadable one is an error naming it."""
        if self.tensor is not None:
            return self.tensor[positions]
        assert self.items is not None
        items = self.items
        wanted = [int(i) for i in positions]
        with concurrent.futures.ThreadPoolExecutor(max(1, default_workers())) as pool:
            read = list(pool.map(items.__getitem__, wanted))
        for x, _, problem in read:
            if problem is not None or x is None:
                raise DataError(problem or f"{self.source}: an input could not be read")
        xs = [x for x, _, _ in read]
        out = torch.stack(xs)  # type: ignore[arg-type]
        check_finite(out, self.source, positions)
        return out

    def all_labels(self, progress: bool | None = None) -> list[str]:
        """Every input's label, in order (a Dataset's are read in one pass)."""
        if self.labels is not None:
            return list(self.labels)
        if not self.labeled:
            raise DataError(f"{self.source}: labels are needed, but the data is unlabeled")
        labels: list[str] = []
        for batch in self.batches(
            progress=progress, description=f"reading labels of {self.source}"
        ):
            labels.extend(batch.labels or [])
        return labels

    def fingerprint(self) -> str | None:
        """A hash of everything read: the inputs' bytes (files as stored, tensors as held),
        labels, shape and order; ``None`` for a ``Dataset`` (nothing to hash before reading)."""
        if self._fingerprint is not None or (self.files is None and self.tensor is None):
            return self._fingerprint
        digest = hashlib.blake2b(digest_size=20)
        digest.update(repr((self.shape, self.labels, self.skip_unreadable)).encode())
        if self.tensor is not None:
            tensor_digest(digest, self.tensor)
        else:
            assert self.files is not None
            for path in self.files:
                digest.update(str(path.relative_to(self.root) if self.root else path).encode())
                try:
                    digest.update(path.read_bytes())
                except OSError as exc:
                    raise DataError(f"image {str(path)!r} cannot be read: {exc}") from exc
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def label_indices(self, labels: Sequence[str], label_space: Sequence[str]) -> torch.Tensor:
        """``labels`` (a batch's) as indices into ``label_space``; an unknown one is an error."""
        return Data(torch.empty(0), list(labels), self.source).label_indices(label_space)

    def check_labels(self, label_space: Sequence[str]) -> None:
        """Before reading: a label the stream is known to hold that ``label_space`` lacks is
        an error (labels met while reading a Dataset are checked batch by batch)."""
        if self.labels is not None:
            unknown = sorted(set(self.labels) - set(label_space))
            if unknown:
                self.label_indices([unknown[0]], label_space)


def open_data(
    data: Any,
    input_shape: Sequence[int],
    *,
    require_labels: bool = False,
    what: str = "data",
    feature_names: Sequence[str] | None = None,
    label_column: str = "label",
    skip_unreadable: bool = False,
) -> Stream:
    """``data`` as a :class:`Stream` of inputs of shape ``input_shape``, without reading it.

    Folders and Datasets are read batch by batch; tensors, arrays and tables (small: they are
    in memory already) are checked at once, as :func:`~netmeld.data.load_data` does."""
    shape = tuple(int(s) for s in input_shape)
    if isinstance(data, Stream):
        stream = data
    elif is_text_shape(shape) and looks_textual(data):
        stream = _open_texts(data, shape, what, label_column)
    elif isinstance(data, list) and data and all(isinstance(d, (str, Path)) for d in data):
        stream = _open_files([Path(d) for d in data], shape, what, skip_unreadable)
    elif isinstance(data, (str, Path)) and not str(data).lower().endswith(".csv"):
        stream = _open_folder(Path(data), shape, what, skip_unreadable)
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, Data):
        stream = _open_dataset(data, shape, what)
    else:
        loaded = memory_data(
            data, shape, what=what, feature_names=feature_names, label_column=label_column
        )
        stream = Stream(
            loaded.source,
            len(loaded),
            shape,
            loaded.labels,
            loaded.labeled,
            tensor=loaded.inputs,
        )
    if require_labels and not stream.labeled:
        raise DataError(
            f"{stream.source}: this needs labeled data: (inputs, label_names) or a folder with "
            "one subfolder per label"
        )
    return stream


def _open_texts(data: Any, shape: tuple[int, ...], what: str, label_column: str) -> Stream:
    """Texts for a model of text members, as their UTF-8 bytes (see :mod:`netmeld.data.text`)."""
    texts, labels, source = read_texts(data, what, label_column)
    if not texts:
        raise DataError(f"{what} ({source}): is empty; expected at least one text")
    encoded = encode_texts(texts, source)
    return Stream(source, len(texts), shape, labels, labels is not None, tensor=encoded)


def _open_folder(folder: Path, shape: tuple[int, ...], what: str, skip: bool) -> Stream:
    if len(shape) != 3:
        raise DataError(f"{str(folder)!r}: the model reads vectors of shape {shape}, not images")
    if folder.is_file():
        files, labels, root = [folder], None, folder.parent
    else:
        found = scan_folder(folder, what)
        files = [p for p, _ in found]
        labels = [label for _, label in found] if found[0][1] is not None else None
        root = folder
    return Stream(
        str(folder),
        len(files),
        shape,
        labels,  # type: ignore[arg-type]
        labels is not None,
        files=files,
        root=root,
        items=_FileItems(files, labels, shape),  # type: ignore[arg-type]
        skip_unreadable=skip,
    )


def _open_files(paths: list[Path], shape: tuple[int, ...], what: str, skip: bool) -> Stream:
    """A list of image files (and folders of images, read flat), unlabeled."""
    if len(shape) != 3:
        raise DataError(f"{what}: the model reads vectors of shape {shape}, not images")
    files: list[Path] = []
    for p in paths:
        if p.is_dir():  # its images, or those of its label subfolders
            files.extend(path for path, _ in scan_folder(p, what))
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            raise DataError(f"{what}: {str(p)!r} does not exist")
    if not files:
        raise DataError(f"{what}: no image files given")
    return Stream(
        what,
        len(files),
        shape,
        None,
        False,
        files=files,
        items=_FileItems(files, None, shape),
        skip_unreadable=skip,
    )


def _open_dataset(ds: Any, shape: tuple[int, ...], what: str) -> Stream:
    try:
        n = len(ds)
    except TypeError as exc:
        raise DataError(f"{what}: the Dataset has no length") from exc
    if n == 0:
        raise DataError(f"{what}: the Dataset is empty; expected at least one item")
    first = ds[0]
    labeled = isinstance(first, (tuple, list)) and len(first) == 2
    return Stream(what, n, shape, None, labeled, items=_DatasetItems(ds, shape, what))


def load_data(
    data: Any,
    input_shape: Sequence[int],
    *,
    require_labels: bool = False,
    what: str = "data",
    progress: bool | None = None,
    feature_names: Sequence[str] | None = None,
    label_column: str = "label",
    skip_unreadable: bool = False,
) -> Data:
    """Read all of ``data`` into a :class:`Data` whose inputs have shape ``(N, *input_shape)``.

    The verbs stream (:func:`open_data`); this is for what must hold every input at once.
    ``feature_names``: for tables, the columns to read, in order (a DataFrame's or CSV file's
    other columns are ignored; a missing one is an error). ``skip_unreadable``: an image file
    that cannot be read is left out and counted in one warning naming them (by default it is an
    error naming the file).
    """
    if data is None:
        raise DataError(f"{what}: no data given")
    stream = open_data(
        data,
        input_shape,
        require_labels=require_labels,
        what=what,
        feature_names=feature_names,
        label_column=label_column,
        skip_unreadable=skip_unreadable,
    )
    return stream.read(progress=progress)
