"""What the union methods fit on and what evaluation reads: each member's head inputs over a
data stream, computed batch by batch on a device, kept in a feature cache, and shared out over
the processes of ``torchrun``.

The cache keys a member's head inputs by everything they depend on: the member's
preprocessing, trunk and neck (structure and exact tensors, :func:`member_keys`),
the data's content (:meth:`Stream.fingerprint`), and the precision they were computed in. Later
calls in the process reuse them (a bounded in-memory cache); with ``cache=FOLDER`` later
processes do too (one safetensors file per member and data set, validated when read).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from netmeld.data import Stream, open_data
from netmeld.errors import DataError
from netmeld.model.combined import CombinedModel
from netmeld.runtime import autocast, distributed_world, on_device, resolve_device, tensor_digest


class Extracted:
    """Per-member head inputs of a data set (trunks are frozen), the router input, and the
    labels of the inputs kept (``None`` when unlabeled). The raw inputs are read from the
    stream only if a method asks for :attr:`inputs`."""

    def __init__(
        self,
        features: list[torch.Tensor],
        router_input: torch.Tensor,
        *,
        labels: list[str] | None = None,
        index: torch.Tensor | None = None,
        stream: Stream | None = None,
        inputs: torch.Tensor | None = None,
        label_space: list[str] | None = None,
        statistics: list[Any] | None = None,
    ) -> None:
        self.features = features
        self.statistics = statistics  # members' FeatureStatistics, for the methods from them
        self.router_input = router_input
        self.labels = labels
        self.index = index
        self.stream = stream
        self._inputs = inputs
        self.label_space = label_space  # the labels targets index (open-label methods)
        self.unlabeled: Extracted | None = None  # unlabeled inputs' (semi-supervised methods)

    def __len__(self) -> int:
        return len(self.router_input)

    @property
    def inputs(self) -> torch.Tensor | None:
        """The raw inputs (read into memory on first use, for methods that train on them)."""
        if self._inputs is None and self.stream is not None:
            self._inputs = self.stream.read(positions=self.index).inputs
        return self._inputs

    @inputs.setter
    def inputs(self, value: torch.Tensor | None) -> None:
        self._inputs = value

    def subset(self, rows: torch.Tensor) -> Extracted:
        """The examples at ``rows`` (raw inputs still read only when asked for; the unlabeled
        inputs of a semi-supervised fit are kept whole)."""
        part = Extracted(
            [f[rows] for f in self.features],
            self.router_input[rows],
            labels=None if self.labels is None else [self.labels[int(r)] for r in rows],
            index=None if self.index is None else self.index[rows],
            stream=self.stream,
            inputs=None if self._inputs is None else self._inputs[rows],
            label_space=self.label_space,
        )
        part.unlabeled = self.unlabeled  # a semi-supervised fit keeps its whole pool
        return part


class FeatureCache:
    """Members' head inputs by key, in memory (at most ``max_bytes``, least recently used
    first out) and, with ``folder``, on disk across processes. :attr:`hits` and
    :attr:`misses` count lookups."""

    def __init__(self, folder: str | Path | None = None, max_bytes: int = 2 * 2**30) -> None:
        self.folder = None if folder is None else Path(folder)
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features, index)`` stored under ``key``, or ``None``."""
        found = self._memory.get(key)
        if found is None and self.folder is not None:
            found = self._read(self.folder / f"{key}.safetensors")
            if found is not None:
                self._remember(key, found)
        if found is None:
            self.misses += 1
            return None
        self._memory.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: str, features: torch.Tensor, index: torch.Tensor) -> None:
        self._remember(key, (features, index))
        if self.folder is not None:
            from safetensors.torch import save_file

            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{key}.safetensors"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                save_file({"features": features.contiguous(), "index": index.contiguous()}, tmp)
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                warnings.warn(
                    f"feature cache {str(self.folder)!r}: cannot write ({exc}); the features "
                    "are kept in memory only",
                    stacklevel=3,
                )

    def _remember(self, key: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = value[0].numel() * value[0].element_size()
        if size > self.max_bytes:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while sum(f.numel() * f.element_size() for f, _ in self._memory.values()) > self.max_bytes:
            self._memory.popitem(last=False)

    @staticmethod
    def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            features, index = tensors["features"], tensors["index"]
            ok = (
                set(tensors) == {"features", "index"}
                and features.dtype == torch.float32
                and features.dim() == 2
                and index.dtype == torch.long
                and index.shape == (len(features),)
                and bool(torch.isfinite(features).all())
            )
        except Exception:  # a truncated or foreign file: computed again, and replaced
            ok = False
        if not ok:
            warnings.warn(
                f"feature cache file {str(path)!r} is not a valid cache entry; computing the "
                "features again",
                stacklevel=4,
            )
            return None
        return features, index


_PLAIN = (bool, int, float, str, tuple, type(None))


def member_keys(model: CombinedModel) -> list[str]:
    """Per member, a hash of everything its head input depends on: the preprocessing, the
    trunk and neck (their structure, settings and every tensor, non-persistent buffers such
    as normalisation statistics too), and the input shape."""
    keys = []
    for name in model.member_names:
        g = str(model.group_of[name])
        parts = [model.preprocess[g], model.trunks[g], model.necks[name]]
        digest = hashlib.blake2b(repr((model.input_shape, parts)).encode(), digest_size=20)
        for part in parts:
            for module in part.modules():  # settings kept as plain attributes
                plain = sorted(
                    (k, repr(v))
                    for k, v in vars(module).items()
                    if not k.startswith("_") and isinstance(v, _PLAIN)
                )
                digest.update(repr((type(module).__qualname__, plain)).encode())
            for key, t in [*part.named_parameters(), *part.named_buffers()]:
                digest.update(key.encode())
                tensor_digest(digest, t)
        keys.append(digest.hexdigest())
    return keys


PROCESS_CACHE = FeatureCache()
_FOLDER_CACHES: dict[Path, FeatureCache] = {}


def cache_for(cache: bool | str | Path | FeatureCache | None) -> FeatureCache | None:
    """The cache a ``cache=`` argument means: ``True``/``None`` the process's, ``False`` none,
    a folder the one kept there (and in memory), or a :class:`FeatureCache`."""
    if isinstance(cache, FeatureCache):
        return cache
    if cache is False:
        return None
    if cache is None or cache is True:
        return PROCESS_CACHE
    folder = Path(cache).resolve()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"cache folder {str(cache)!r} is a file; expected a folder")
    return _FOLDER_CACHES.setdefault(folder, FeatureCache(folder))


def shard_positions(n: int) -> torch.Tensor | None:
    """Under ``torch.distributed`` with several processes, this rank's contiguous share of
    ``n`` positions; ``None`` in a single process."""
    rank, world = distributed_world()
    if world <= 1:
        return None
    return torch.tensor_split(torch.arange(n), world)[rank]


def gather(parts: Any) -> list[Any]:
    """Every rank's ``parts`` (rank order) under ``torch.distributed``; ``[parts]`` alone."""
    _, world = distributed_world()
    if world <= 1:
        return [parts]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, parts)
    return out


@torch.no_grad()
def extract(
    model: CombinedModel,
    data: Stream | torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    cache: bool | str | Path | FeatureCache | None = True,
    workers: int | None = None,
    progress: bool | None = None,
    description: str = "running members",
) -> Extracted:
    """Run the members once over ``data`` (batch by batch, on ``device``) and keep what the
    union methods fit on: each member's head inputs, in float32 on the CPU.

    Members whose head inputs on this data are in the cache are not run; under ``torchrun``
    each process runs its share and every process gets the whole result."""
    stream = data if isinstance(data, Stream) else open_data(data, model.input_shape)
    store = cache_for(cache)
    fingerprint = stream.fingerprint() if store is not None else None
    keys = None
    if store is not None and fingerprint is not None:
        keys = [f"{k}-{fingerprint}-{precision}"[:160] for k in member_keys(model)]
        found = [store.get(k) for k in keys]
        if all(gather(all(f is not None for f in found))):
            features = [f for f, _ in found]  # type: ignore[misc]
            index = found[0][1]  # type: ignore[index]
            return _result(model, features, index, stream)
    dev = resolve_device(device)
    positions = shard_positions(len(stream))
    parts: list[list[torch.Tensor]] = [[] for _ in model.members]
    indices: list[torch.Tensor] = []
    labels: list[str] = []
    model.eval()
    with on_device(model, dev):
        for batch in stream.batches(
            batch_size,
            workers=workers,
            progress=progress,
            description=description,
            positions=positions,
        ):
            with autocast(dev, precision):
                out = model.run_members(batch.inputs.to(dev, non_blocking=True))
            for i, f in enumerate(out.features):
                parts[i].append(f.float().cpu())
            indices.append(batch.index)
            labels.extend(batch.labels or [])
    local = ([torch.cat(p) if p else None for p in parts], indices, labels)
    gathered = gather(local)
    if all(g[0][0] is None for g in gathered):
        raise DataError(f"{stream.source}: no inputs to run the members on")
    features = [
        torch.cat([g[0][i] for g in gathered if g[0][i] is not None])
        for i in range(len(model.members))
    ]
    index = torch.cat([torch.cat(g[1]) for g in gathered if g[1]])
    if keys is not None and store is not None:
        rank, _ = distributed_world()
        for key, f in zip(keys, features, strict=True):
            if rank == 0 or store.folder is None:
                store.put(key, f, index)
            else:
                store._remember(key, (f, index))
    all_labels = [label for g in gathered for label in g[2]] if stream.labeled else None
    return _result(model, features, index, stream, all_labels)


def _result(
    model: CombinedModel,
    features: Sequence[torch.Tensor],
    index: torch.Tensor,
    stream: Stream,
    labels: list[str] | None = None,
) -> Extracted:
    router = model.router_input_from(features)
    if labels is None and stream.labels is not None:
        labels = [stream.labels[int(i)] for i in index]
    return Extracted(
        list(features),
        router,
        labels=labels,
        index=index,
        stream=stream,
        inputs=stream.tensor[index] if stream.tensor is not None else None,
    )
