"""Reading a member's checkpoint without unpickling, and loading it into its module with one
check of names, shapes and kinds of dtype (:func:`load_into`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netmeld.errors import CheckpointError
from netmeld.io.checkpoint_merge import diff_tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; any other file with
    ``torch.load(weights_only=True)``. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper
    is unwrapped, and a ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: not a readable safetensors file ({exc})"
            ) from exc
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"checkpoint {str(path)!r}: cannot be read as a weights-only torch file "
                f"(netmeld never unpickles arbitrary objects): {first}"
            ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: expected a mapping of tensor names to tensors"
        )
    tensors = {str(k): v for k, v in state.items()}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load ``tensors`` into ``module`` strictly, naming the first tensor that does not fit."""
    expected = module.state_dict()
    diff = diff_tensors(
        {k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in tensors.items()}
    )
    if diff.extra:
        raise CheckpointError(
            f"{what}: tensor {diff.extra[0]!r} is not in the architecture "
            f"(it has {len(expected)} tensors, e.g. {sorted(expected)[:3]})"
        )
    if diff.reshaped:
        name = diff.reshaped[0]
        raise CheckpointError(
            f"{what}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
            f"the architecture expects {tuple(expected[name].shape)}"
        )
    for name, want in expected.items():  # a float tensor never takes integers, nor the reverse
        got = tensors.get(name)
        if got is not None and (
            got.is_floating_point() != want.is_floating_point()
            or (got.dtype == torch.bool) != (want.dtype == torch.bool)
        ):
            raise CheckpointError(
                f"{what}: tensor {name!r} is {str(got.dtype).removeprefix('torch.')}, the "
                f"architecture expects {str(want.dtype).removeprefix('torch.')}"
            )
    if diff.missing:
        raise CheckpointError(
            f"{what}: tensor {diff.missing[0]!r} is missing from the checkpoint"
            + (f" (and {len(diff.missing) - 1} more)" if len(diff.missing) > 1 else "")
        )
    module.load_state_dict(dict(tensors), strict=True)
