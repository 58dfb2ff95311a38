"""What the combined model does to a raw input before each member: the columns a member reads,
resizing and channel conversion for images, and the member's own normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.errors import IncompatibleMembersError
from netmeld.members.member import Member, Preprocessing


class Preprocess(nn.Module):
    """Adapts a raw input to a member's shape (channels, size) and normalisation."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        input_shape: Sequence[int],
        preprocessing: Preprocessing,
        columns: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.target_shape = preprocessing.input_shape
        self.columns: torch.Tensor | None
        if columns is None:
            self.columns = None
        else:
            self.register_buffer(
                "columns", torch.tensor(list(columns), dtype=torch.long), persistent=False
            )
        channels = self.target_shape[0]
        mean = preprocessing.mean or (0.0,)
        std = preprocessing.std or (1.0,)
        view = (1, -1) + (1,) * (len(self.target_shape) - 1)
        self.normalize = preprocessing.mean is not None
        self.register_buffer(
            "mean",
            torch.tensor(mean, dtype=torch.float32).expand(channels).reshape(view).clone(),
            persistent=False,
        )
        self.register_buffer(
            "std",
            torch.tensor(std, dtype=torch.float32).expand(channels).reshape(view).clone(),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            x = x.index_select(1, self.columns)
        elif self.input_shape != self.target_shape:
            c_in, c_out = self.input_shape[0], self.target_shape[0]
            if c_in != c_out:
                if c_in == 1:
                    x = x.expand(-1, c_out, -1, -1)
                else:  # 3 -> 1: ITU-R 601 luma
                    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
                    x = (x * w.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if len(self.target_shape) == 3:  # any image size is resized to the member's
            resize = self.input_shape[1:] != self.target_shape[1:]
            if not resize and not isinstance(x, torch.fx.Proxy):  # fx traces the static rule
                # an ONNX file keeps the resize, so it takes any size
                resize = torch.onnx.is_in_onnx_export() or x.shape[2:] != self.target_shape[1:]
            if resize:
                x = F.interpolate(
                    x, size=self.target_shape[1:], mode="bilinear", align_corners=False
                )
        if self.normalize:
            x = (x - self.mean) / self.std
        return x


def resolve_columns(
    members: Sequence[Member],
    input_shape: Sequence[int] | None,
    feature_names: Sequence[str] | None,
) -> tuple[tuple[int, ...] | None, list[str] | None, dict[str, list[int]]]:
    """Where each column-reading member's columns sit in the combined (union) input.

    Named columns are looked up in ``feature_names`` (default: every member's named columns in
    order of first appearance); integer columns are positions in the combined input. Returns
    the combined input shape implied (or ``None``), the feature names and member -> positions.
    """
    readers = [m for m in members if m.preprocessing.columns is not None]
    names = list(feature_names) if feature_names is not None else None
    if names is not None and len(set(names)) != len(names):
        raise IncompatibleMembersError(f"feature_names repeat a name: {names}")
    if not readers:
        return None, names, {}
    if names is None and any(
        isinstance(c, str) for m in readers for c in m.preprocessing.columns or ()
    ):
        names = []
        for m in readers:
            for c in m.preprocessing.columns or ():
                if isinstance(c, str) and c not in names:
                    names.append(c)
    positions: dict[str, list[int]] = {}
    for m in readers:
        cols = []
        for c in m.preprocessing.columns or ():
            if isinstance(c, str):
                if names is None or c not in names:
                    raise IncompatibleMembersError(
                        f"member {m.name!r} reads column {c!r}, which is not among the combined "
                        f"model's feature names {names}"
                    )
                cols.append(names.index(c))
            else:
                cols.append(c)
        positions[m.name] = cols
    width = len(names) if names is not None else max(max(cols) for cols in positions.values()) + 1
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise IncompatibleMembersError(
                f"members read columns, so the combined input must be a vector (F,), "
                f"got input_shape {shape}"
            )
        if names is not None and shape[0] != len(names):
            raise IncompatibleMembersError(
                f"input_shape {shape} has {shape[0]} columns but there are {len(names)} feature "
                f"names {names}"
            )
        width = shape[0]
    for m in readers:
        too_far = [c for c in positions[m.name] if c >= width]
        if too_far:
            raise IncompatibleMembersError(
                f"member {m.name!r} reads column {too_far[0]}, but the combined input has only "
                f"{width} columns"
            )
    for m in members:
        if m.preprocessing.columns is None and m.preprocessing.input_shape != (width,):
            raise IncompatibleMembersError(
                f"member {m.name!r} reads the whole input of shape {m.preprocessing.input_shape}, "
                f"but the combined input has {width} columns; give it preprocessing columns"
            )
    return (width,), names, positions


def check_input_shapes(
    members: Sequence[Member], input_shape: Sequence[int] | None
) -> tuple[int, ...]:
    """The combined model's input shape; raise if some member cannot read it."""
    if input_shape is None:
        first = members[0]
        for m in members[1:]:
            if m.preprocessing.input_shape != first.preprocessing.input_shape:
                raise IncompatibleMembersError(
                    f"member {m.name!r} expects input shape {m.preprocessing.input_shape}, "
                    f"but member {first.name!r} expects {first.preprocessing.input_shape}; "
                    "pass input_shape=(C, H, W) to resize images for every member, or give "
                    "vector members preprocessing columns"
                )
        return first.preprocessing.input_shape
    shape = tuple(int(s) for s in input_shape)
    for m in members:
        target = m.preprocessing.input_shape
        if target == shape:
            continue
        ok = (
            len(shape) == 3
            and len(target) == 3
            and (shape[0] == target[0] or shape[0] == 1 or (shape[0], target[0]) == (3, 1))
        )
        if not ok:
            raise IncompatibleMembersError(
                f"member {m.name!r} expects input shape {target}, which cannot be made from the "
                f"combined input shape {shape} (images are resized and 1<->3 channels converted; "
                "vectors must match exactly)"
            )
    return shape
