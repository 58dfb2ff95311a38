"""What the union methods fit on: each member's head inputs over a batch of inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netmeld._progress import track
from netmeld.errors import DataError
from netmeld.model.combined import CombinedModel


@dataclass
class Extracted:
    """Per-member head inputs of a batch of inputs (trunks are frozen), and the router input."""

    features: list[torch.Tensor]
    router_input: torch.Tensor
    inputs: torch.Tensor | None = None  # the raw inputs, for methods that read them
    label_space: list[str] | None = None  # the labels targets index (open-label methods)

    def __len__(self) -> int:
        return len(self.router_input)


@torch.no_grad()
def extract(
    model: CombinedModel,
    inputs: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: bool | None = None,
) -> Extracted:
    """Run the members once over ``inputs`` and keep what the union methods fit on."""
    model.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in model.members]
    router: list[torch.Tensor] = []
    starts = range(0, len(inputs), batch_size)
    for start in track(starts, "running members", total=len(starts), enabled=progress):
        out = model.run_members(inputs[start : start + batch_size])
        for i in range(len(model.members)):
            feats[i].append(out.features[i])
        router.append(out.router_input)
    if not router:
        raise DataError("no inputs to run the members on")
    return Extracted([torch.cat(f) for f in feats], torch.cat(router))
