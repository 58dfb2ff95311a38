"""Reading and writing (sharded) safetensors checkpoints one tensor at a time.

A checkpoint is a ``.safetensors`` file, or a folder holding one, or a folder with a
Hugging Face ``*.safetensors.index.json`` whose ``weight_map`` names each tensor's shard.
:class:`CheckpointReader` reads only headers up front; each tensor is read through a memory
map of its own bytes, copied out, and the map closed, so memory holds one tensor, not the
file. :class:`ShardedWriter` knows every output tensor's name, dtype and shape before the
first byte is written (they are the inputs'), so it writes each shard's header first and then
streams tensors into it: nothing is buffered, and the folder appears only when complete.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmeld._atomic import make_temp, swap_in
from netmeld._outputs import check_replaceable, write_marker
from netmeld.errors import CheckpointError, ModelFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file, byte range, dtype and shape."""

    name: str
    file: Path
    start: int  # absolute byte offset in the file
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


MAX_HEADER = 100_000_000  # bytes, as the safetensors library allows


class BadJson(Exception):
    """Raised from inside ``json.loads`` (a duplicate key, a NaN literal)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadJson(f"key {key!r} appears twice")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise BadJson(f"{name} is not JSON")


def strict_json(raw: bytes) -> Any:
    """Strict JSON from UTF-8 bytes: no duplicate keys, no NaN/Infinity literals."""
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data begins; a header longer
    than the file, or that is not a strict JSON object, is a :class:`CheckpointError`."""
    where = repr(str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{where} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER:
                raise CheckpointError(f"{where} is not a safetensors file (bad header size)")
            if 8 + length > size:
                raise CheckpointError(
                    f"{where}: the header claims {length} bytes, the file holds {size - 8} "
                    "after the length (truncated or not a safetensors file)"
                )
            header = strict_json(f.read(length))
    except (OSError, ValueError, RecursionError, BadJson) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where}: cannot read a safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object")
    return header, 8 + length


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    """One header entry checked: a known dtype, a shape of non-negative integers, and
    ``[start, end]`` offsets inside the data holding exactly shape x dtype bytes."""
    where = f"{str(file)!r}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{where}: expected an object with dtype, shape and data_offsets, got "
            f"{type(entry).__name__}"
        )
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(f"{where} has dtype {code!r}; netmeld reads {', '.join(DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(
            f"{where} has shape {shape!r}; expected a list of non-negative integers"
        )
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(
            f"{where} has data_offsets {offsets!r}; expected [start, end], two byte counts"
        )
    start, end = offsets
    if start > end:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] start after its end")
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{start}, {end}] run past the end of the data "
            f"({data_size} bytes)"
        )
    needed = _nbytes(DTYPES[code], shape)
    if end - start != needed:
        raise CheckpointError(
            f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes; shape "
            f"{tuple(shape)} of {code} needs {needed}"
        )
    return TensorInfo(name, file, data_start + start, data_start + end, DTYPES[code], tuple(shape))


def _check_overlaps(file: Path, infos: Sequence[TensorInfo]) -> None:
    """No two tensors of one file share a byte (empty tensors occupy none)."""
    last: TensorInfo | None = None  # of the tensors so far, the one ending last
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: (i.start, i.end)):
        if last is not None and info.start < last.end:
            raise CheckpointError(
                f"{str(file)!r}: tensors {last.name!r} and {info.name!r} overlap (bytes "
                f"{info.start}-{min(info.end, last.end)}); each tensor needs bytes of its own"
            )
        if last is None or info.end > last.end:
            last = info


def _metadata(file: Path, header: dict[str, Any]) -> dict[str, str]:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{str(file)!r}: __metadata__ must map strings to strings, got {metadata!r:.80}"
        )
    return metadata


def _inside(folder: Path, relative: str, where: str) -> Path:
    """``folder / relative``, which must stay inside ``folder`` once symlinks are followed.
    One exception: a Hugging Face hub cache, whose ``snapshots/<rev>/`` files are symlinks to
    the repository's ``blobs/``."""
    rel = Path(relative)
    path = folder / rel
    try:
        root = folder.resolve()
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop, ...
        raise CheckpointError(f"{where}: {relative!r} is not a usable file name ({exc})") from exc
    hub_blobs = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if rel.is_absolute() or ".." in rel.parts or not (real.is_relative_to(root) or hub_blobs):
        raise CheckpointError(
            f"{where}: {relative!r} is outside the checkpoint folder {str(folder)!r} "
            "(absolute, '..' or a symlink leading out); shards must lie inside it"
        )
    return path


class CheckpointReader:
    """The tensors of a checkpoint (file, folder, or sharded folder with an index).

    Every header is checked before any tensor is read: known dtypes, offsets inside the file
    that hold exactly shape x dtype bytes and do not overlap, and (with an index) shards that
    lie inside the folder and hold the tensors the index gives them. Anything else is a
    :class:`CheckpointError` naming the file and tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._index: dict[str, Path] = {}  # from an index file: each tensor's shard
        self._index_file = self.path
        for file in self._files():
            header, data_start = read_header(file)
            data_size = file.stat().st_size - data_start
            self.metadata.update(_metadata(file, header))
            infos = []
            for name, entry in header.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{str(self.path)!r}: tensor {name!r} is in two shards "
                        f"({self.tensors[name].file.name} and {file.name})"
                    )
                infos.append(_tensor_info(file, name, entry, data_start, data_size))
            _check_overlaps(file, infos)
            self.tensors.update((info.name, info) for info in infos)
        for name, file in self._index.items():
            if name not in self.tensors or self.tensors[name].file != file:
                raise CheckpointError(
                    f"{str(self._index_file)!r}: tensor {name!r} is in {file.name!r}, says the "
                    "index, but that shard does not hold it"
                )

    def _files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return self._indexed(p, indexes[0])
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{str(p)!r} holds no .safetensors file")
        return [_inside(p, f.name, f"{str(f)!r}") for f in files]

    def _indexed(self, folder: Path, index: Path) -> list[Path]:
        """The shards a ``*.safetensors.index.json`` names, each inside ``folder``."""
        self._index_file = index
        where = repr(str(index))
        _inside(folder, index.name, where)
        try:
            content = strict_json(index.read_bytes())
        except (OSError, ValueError, RecursionError, BadJson) as exc:
            raise CheckpointError(f"{where}: cannot read the safetensors index ({exc})") from exc
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{where} is not a safetensors index: expected a weight_map of tensor names "
                "to shard files"
            )
        files: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if shard not in files:
                files[shard] = _inside(folder, shard, f"{where}: tensor {name!r}")
                if not files[shard].is_file():
                    raise CheckpointError(
                        f"{where}: tensor {name!r} is in shard {shard!r}, which is missing"
                    )
            self._index[name] = files[shard]
        return list(files.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every tensor."""
        return {name: info.shape for name, info in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a private copy) through a memory map of its bytes only."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no tensor {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        page = mmap.ALLOCATIONGRANULARITY
        offset = info.start - info.start % page
        try:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(
                    f.fileno(), info.end - offset, offset=offset, access=mmap.ACCESS_READ
                )
                try:
                    raw = np.frombuffer(
                        mm, dtype=np.uint8, count=info.nbytes, offset=info.start - offset
                    )
                    data = torch.from_numpy(raw.copy())
                    del raw
                finally:
                    mm.close()
        except (OSError, ValueError) as exc:  # e.g. the file shrank since its header was read
            raise CheckpointError(
                f"{str(info.file)!r}: cannot read tensor {name!r} ({exc})"
            ) from exc
        if info.dtype == torch.bool and bool((data > 1).any()):
            raise CheckpointError(
                f"{str(info.file)!r}: tensor {name!r} is bool but holds bytes other than 0 and 1"
            )
        return data.view(info.dtype).reshape(info.shape)


def parse_size(size: str | int) -> int:
    """``'2GB'``, ``'500MB'``, ``'1.5G'`` or a number of bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().removesuffix("B")
    factor = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(text[-1:], 1) if text else 1
    number = text[:-1] if text[-1:] in "KMGT" else text
    try:
        return int(float(number) * factor)
    except ValueError as exc:
        raise ModelFileError(f"shard size {size!r}: expected e.g. '2GB' or a byte count") from exc


def _header_bytes(entries: Mapping[str, Any]) -> bytes:
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes tensors, in a fixed order known up front, into shards of at most ``shard_size``
    bytes (a tensor larger than that gets a shard of its own), with an index when there is
    more than one shard. Use as a context manager; the folder appears atomically on success."""

    def __init__(
        self,
        path: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        shard_size: int = 5_000_000_000,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        check_replaceable(self.path, overwrite=overwrite)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        used = 0
        for entry in layout:
            n = _nbytes(entry[1], entry[2])
            if shards[-1] and used + n > shard_size:
                shards.append([])
                used = 0
            shards[-1].append(entry)
            used += n
        self.shards = shards
        count = len(shards)
        self.names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.order = [name for shard in shards for name, _, _ in shard]
        self._expected = {name: (dtype, shape) for shard in shards for name, dtype, shape in shard}
        self._shard_of = {name: i for i, shard in enumerate(shards) for name, _, _ in shard}
        self._next = 0
        self._shard = -1
        self._file: Any = None
        self.tmp: Path | None = None

    def __enter__(self) -> ShardedWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp(self.path)
        return self

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype the layout gives tensor ``name``."""
        return self._expected[name][0]

    def _open_shard(self, index: int) -> None:
        assert self.tmp is not None
        if self._file is not None:
            self._file.close()
        entries: dict[str, Any] = {"__metadata__": dict(self.metadata)}
        offset = 0
        for name, dtype, shape in self.shards[index]:
            n = _nbytes(dtype, shape)
            entries[name] = {
                "dtype": CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        self._file = open(self.tmp / self.names[index], "wb")  # noqa: SIM115
        self._file.write(_header_bytes(entries))
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the next name of the layout, with its dtype/shape."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ModelFileError(f"writer: got tensor {name!r}, expected {expected!r}")
        dtype, shape = self._expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ModelFileError(
                f"writer: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the layout "
                f"says {dtype} {shape}"
            )
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = tensor.numel() - int(finite.sum())
                kind = str(tensor.dtype).removeprefix("torch.")
                raise ModelFileError(
                    f"writer: tensor {name!r} ({kind}) holds {bad} NaN or infinite value(s) of "
                    f"{tensor.numel()}, e.g. values beyond {kind}'s range; nothing is written"
                )
            del finite
        shard = self._shard_of[name]
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if self._file is not None:
            self._file.close()
        if exc_type is not None or self._next != len(self.order):
            shutil.rmtree(self.tmp, ignore_errors=True)
            if exc_type is None:
                raise ModelFileError(
                    f"writer: {len(self.order) - self._next} tensors were never written "
                    f"(next: {self.order[self._next]!r})"
                )
            return
        if len(self.names) > 1:
            weight_map = {
                name: self.names[i] for i, shard in enumerate(self.shards) for name, _, _ in shard
            }
            total = sum(_nbytes(d, s) for d, s in self._expected.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_marker(self.tmp, "checkpoint")
        swap_in(self.tmp, self.path)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty(0, dtype=dtype).element_size()
