"""Where and how code runs: the device (``auto``: a GPU when torch sees one), reduced-precision
inference, the process's place under ``torch.distributed``, seeded random state that leaves the
caller's untouched, and exact content hashes of tensors (for cache keys)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from netmeld.errors import DataError


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` under an initialised ``torch.distributed``, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def seed_now(seed: int, device: torch.device | None) -> None:
    """Seed the global CPU generator (and ``device``'s, on GPU) only."""
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block on the global generator seeded from ``seed`` (and ``device``'s, on GPU),
    then give the caller's generator states back: what the block draws (fresh weights, dropout
    masks) depends on ``seed`` alone, and the caller's random state is not disturbed."""
    dev = torch.device(device) if device is not None else None
    devices = []
    if dev is not None and dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        seed_now(seed, dev)
        yield


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``): the GPU when torch sees one, else the CPU. A CUDA device asked
    for on a machine without one is an error, never a silent fallback."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(
            f"device {device!r} is not a device; expected auto, cpu, cuda or cuda:N"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(
                f"device {str(device)!r}: torch sees no CUDA GPU on this machine "
                "(torch.cuda.is_available() is False); use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DataError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    return dev


def autocast(dev: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager[Any]:
    """Reduced-precision inference (``bf16``/``fp16`` autocast) on ``dev``; ``fp32`` runs as
    it is. What it computes is cast back to float32 by the callers."""
    if precision not in PRECISIONS:
        raise DataError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=PRECISIONS[precision])


@contextlib.contextmanager
def on_device(module: nn.Module, dev: torch.device) -> Iterator[nn.Module]:
    """Run the block with ``module`` on ``dev``, then put it back where it was."""
    tensors = [*module.parameters(), *module.buffers()]
    before = tensors[0].device if tensors else dev
    if before == dev:
        yield module
        return
    module.to(dev)
    try:
        yield module
    finally:
        module.to(before)


def tensor_digest(digest: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and exact bytes into a hashlib ``digest``."""
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
