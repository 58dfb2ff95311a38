"""Run a training function in two gloo processes on CPU and return rank 0's weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Run = Callable[[], dict[str, torch.Tensor]]


def _worker(rank: int, world: int, init: str, out: str, run: Run) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        state = run()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def two_process_run(run: Run, folder: Path) -> dict[str, torch.Tensor]:
    """``run()`` (a module-level function returning a state dict) under 2-process DDP."""
    out = str(folder / "ddp.safetensors")
    torch.multiprocessing.spawn(
        _worker, args=(2, f"file://{folder / 'init'}", out, run), nprocs=2, join=True
    )
    return load_file(out)
