"""Tiny seeded members the file-hardening tests save, tamper with and reload."""

from __future__ import annotations

import torch

import netmeld


def mlp_member(
    name: str, labels: list[str], seed: int, *, features: int, hidden: int
) -> netmeld.Member:
    """A ``netmeld.zoo:mlp`` member over ``features`` inputs, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    arch = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": features, "hidden": hidden})
    return netmeld.Member(
        arch.build(num_classes=len(labels)),
        labels,
        name=name,
        preprocessing={"input_shape": (features,)},
        architecture=arch,
    )
