"""Loaders for the real data sets of netmeld's benchmarks (self-contained: numpy, PIL, stdlib).

The data folder is the project's shared data (``../shared/data`` from the repository root; see
its README.md). Pass ``root`` explicitly or set ``NETMELD_DATA`` to point elsewhere. Decoded
CIFAR-10 arrays are cached as ``.npz`` under ``NETMELD_CACHE`` (default
``~/.cache/netmeld-bench``).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_CLASSES",
    "MNIST_CLASSES",
    "cache_dir",
    "data_root",
    "load_cifar10",
    "load_idx",
]

Split = Literal["train", "test"]

MNIST_CLASSES: list[str] = [str(d) for d in range(10)]
FASHION_CLASSES: list[str] = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
CIFAR10_CLASSES: list[str] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

_REPO = Path(__file__).resolve().parents[1]
_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
_IDX_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension
_CIFAR_TAR = "cifar10/cifar10-jpeg75.tar.gz"
_CACHE_VERSION = 1


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``root``, else ``$NETMELD_DATA``, else ``<repo>/../shared/data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("NETMELD_DATA")
    return Path(env) if env else _REPO.parent / "shared" / "data"


def cache_dir() -> Path:
    """Cache folder for decoded arrays: ``$NETMELD_CACHE`` or ``~/.cache/netmeld-bench``."""
    env = os.environ.get("NETMELD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "netmeld-bench"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark data file not found: {path}. The data folder is the project's shared data "
            "(../shared/data from the repository root, see its README.md); pass root=... or set "
            "NETMELD_DATA to where it lives."
        )
    return path


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(
            f"{path} is not a readable gzip file ({exc}); the file is corrupt"
        ) from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad idx magic number 0x{found:08x}, expected 0x{magic:08x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes; the file is corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_idx(
    name: Literal["mnist", "fashion-mnist"],
    split: Split,
    root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST from the original idx ``.gz`` files.

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
    """
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"name must be 'mnist' or 'fashion-mnist', got {name!r}")
    _check_split(split)
    folder = data_root(root) / name
    images = _read_idx(_require(folder / _IDX_FILES[split, "images"]), _IDX_MAGIC_IMAGES, 3)
    labels = _read_idx(_require(folder / _IDX_FILES[split, "labels"]), _IDX_MAGIC_LABELS, 1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels for {split}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{folder}: label {labels.max()} out of range 0..9")
    return images, labels.astype(np.int64)


def _decode_cifar_tar(tar_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Decode both splits of the CIFAR-10 JPEG tar in one streaming pass (no extraction)."""
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(tar_path, "r|gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) != 3 or parts[0] not in found:
                    continue
                split, cls, fname = parts
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                with Image.open(io.BytesIO(fh.read())) as img:
                    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
                if arr.shape != (32, 32, 3):
                    raise ValueError(f"{tar_path}:{member.name} has shape {arr.shape}")
                found[split].append((cls, fname, arr))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{tar_path} could not be read ({exc}); the file is corrupt") from exc
    out: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for split, items in found.items():
        if not items:
            raise ValueError(f"{tar_path} holds no {split}/<class>/*.jpg images")
        items.sort(key=lambda t: (t[0], t[1]))
        classes = sorted({cls for cls, _, _ in items})
        index = {cls: i for i, cls in enumerate(classes)}
        images = np.stack([arr for _, _, arr in items])
        labels = np.array([index[cls] for cls, _, _ in items], dtype=np.int64)
        out[split] = (images, labels, classes)
    return out


def _save_npz_atomic(
    path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, images=images, labels=labels, classes=np.array(classes))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is plain shareable data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cifar10(
    split: Split,
    limit_per_class: int | None = None,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 (JPEG quality 75) read straight from ``cifar10/cifar10-jpeg75.tar.gz``.

    Returns ``(images, labels, classes)``: uint8 ``(N, 32, 32, 3)`` RGB, int64 ``(N,)`` and the
    class names sorted alphabetically. Images are ordered by class, then file name. With
    ``limit_per_class`` a seeded random subset of that many images per class is kept (same
    ``seed`` -> same subset), still in class/file order.

    The first call decodes both splits (about 10 s on 2 CPU cores) and caches them under
    :func:`cache_dir` (a cache that cannot be written only warns); later calls load the cache
    (well under a second).
    """
    _check_split(split)
    tar_path = _require(data_root(root) / _CIFAR_TAR)
    stamp = f"{tar_path.stat().st_size}-v{_CACHE_VERSION}"
    cache = cache_dir() / f"cifar10-jpeg75-{split}-{stamp}.npz"
    if use_cache and cache.is_file():
        with np.load(cache) as z:
            images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    else:
        decoded = _decode_cifar_tar(tar_path)
        if use_cache:
            try:
                for s, (imgs, labs, names) in decoded.items():
                    target = cache_dir() / f"cifar10-jpeg75-{s}-{stamp}.npz"
                    _save_npz_atomic(target, imgs, labs, names)
            except OSError as exc:
                warnings.warn(
                    f"could not cache decoded CIFAR-10 under {cache_dir()}: {exc}", stacklevel=2
                )
        images, labels, classes = decoded[split]
    if limit_per_class is not None:
        if limit_per_class < 0:
            raise ValueError(f"limit_per_class must be >= 0, got {limit_per_class}")
        rng = np.random.default_rng(seed)
        keep = [
            rng.permutation(np.flatnonzero(labels == c))[:limit_per_class]
            for c in range(len(classes))
        ]
        idx = np.sort(np.concatenate(keep))
        images, labels = images[idx], labels[idx]
    return images, labels, classes


if __name__ == "__main__":
    import time

    for ds, names in (("mnist", MNIST_CLASSES), ("fashion-mnist", FASHION_CLASSES)):
        for sp in ("train", "test"):
            t0 = time.perf_counter()
            x, y = load_idx(ds, sp)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            counts = np.bincount(y, minlength=len(names))
            print(
                f"{ds:13s} {sp:5s}: images {x.shape} {x.dtype}, labels {y.shape} {y.dtype}, "
                f"per-class {counts.min()}..{counts.max()}, {dt:.2f}s"
            )
    t0 = time.perf_counter()
    _decode_cifar_tar(_require(data_root() / _CIFAR_TAR))
    print(f"cifar10 full decode of train+test from the tar: {time.perf_counter() - t0:.1f}s")
    for attempt in ("first", "second"):
        t0 = time.perf_counter()
        x, y, names = load_cifar10("train")
        xt, yt, _ = load_cifar10("test")
        print(f"cifar10 {attempt} load_cifar10 train+test: {time.perf_counter() - t0:.1f}s")
    assert names == CIFAR10_CLASSES, names
    print(f"cifar10 train {x.shape} {np.bincount(y).tolist()}, test {xt.shape} {np.bincount(yt)}")
    a, b, _ = load_cifar10("train", limit_per_class=50, seed=1)
    a2, b2, _ = load_cifar10("train", limit_per_class=50, seed=1)
    assert a.shape == (500, 32, 32, 3) and np.array_equal(a, a2) and np.array_equal(b, b2)
    print("cifar10 limit_per_class=50: 500 images, deterministic for a fixed seed")
