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
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmeld._atomic import swap_in
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


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data begins."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{str(path)!r} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise CheckpointError(f"{str(path)!r} is not a safetensors file (bad header size)")
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r}: cannot read a safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: the safetensors header is not a JSON object")
    return header, 8 + length


class CheckpointReader:
    """The tensors of a checkpoint (file, folder, or sharded folder with an index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            header, data_start = read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, entry in header.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{str(self.path)!r}: tensor {name!r} is in two shards "
                        f"({self.tensors[name].file.name} and {file.name})"
                    )
                code = entry.get("dtype")
                if code not in DTYPES:
                    raise CheckpointError(
                        f"{str(file)!r}: tensor {name!r} has dtype {code!r}; netmeld reads "
                        f"{', '.join(DTYPES)}"
                    )
                start, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name,
                    file,
                    data_start + start,
                    data_start + end,
                    DTYPES[code],
                    tuple(entry["shape"]),
                )

    def _files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(
                    f"{str(indexes[0])!r} is not a safetensors index with a weight_map"
                ) from exc
            files = [p / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{str(indexes[0])!r} names shard {missing[0].name!r}, which is missing"
                )
            return files
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{str(p)!r} holds no .safetensors file")
        return files

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
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        page = mmap.ALLOCATIONGRANULARITY
        offset = info.start - info.start % page
        with open(info.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), info.end - offset, offset=offset, access=mmap.ACCESS_READ)
            try:
                raw = np.frombuffer(
                    mm, dtype=np.uint8, count=info.nbytes, offset=info.start - offset
                )
                data = torch.from_numpy(raw.copy())
                del raw
            finally:
                mm.close()
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
        if self.path.exists() and not overwrite:
            raise ModelFileError(f"{str(self.path)!r} exists; pass overwrite to replace it")
        if self.path.exists() and not self.path.is_dir():
            raise ModelFileError(f"{str(self.path)!r} exists and is not a folder")
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
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
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
        swap_in(self.tmp, self.path)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty(0, dtype=dtype).element_size()
