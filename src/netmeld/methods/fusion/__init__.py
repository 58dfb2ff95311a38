"""Fusion architectures for training combined CNNs: parallel branches, a hierarchy where one
network feeds another, and multi-task learning with a shared trunk.

Each builder returns a :class:`~netmeld.model.combined.CombinedModel` with one member: the fused
network. Its parts come from members (their bodies: everything before the head, with their own
preprocessing), from fresh architectures (``"netmeld.zoo:small_cnn"``, ``"torchvision:resnet18"``:
built with new weights, their head dropped) or from plain ``nn.Module`` feature extractors (used
whole; such a model trains and predicts but cannot be saved without an architecture). Fresh
parts and new layers start from the builder's ``seed`` (default 0), so one call builds the same
weights every time, whatever the global random state.

Freezing works like Keras' ``trainable = False``: ``freeze=["a"]`` freezes branch ``a``,
``freeze=["a.layer1"]`` one block of it. Frozen parameters get no gradient and frozen
BatchNorm layers keep their statistics (they run in eval mode while the rest trains), so a
frozen part is bit-identical after :func:`netmeld.train`.

Training (:func:`netmeld.train`; ``netmeld train`` from a recipe) runs on the shared engine
(:mod:`netmeld.engine`): progress, atomic checkpoints, resume and DDP under ``torchrun``.
"""

import warnings
from typing import Any

from netmeld.methods.fusion.builders import hierarchical, multitask, parallel
from netmeld.methods.fusion.parts import (
    FUSION_KINDS,
    FUSIONS,
    TASK_SEPARATOR,
    WEIGHTINGS,
    FusedNet,
    HierarchicalNet,
    MultiTaskNet,
    ParallelNet,
    Part,
    Resize,
    adapter,
    build,
)
from netmeld.methods.fusion.training import SCHEDULE, task_accuracy, task_slices, task_targets

__all__ = [
    "FUSIONS",
    "FUSION_KINDS",
    "SCHEDULE",
    "TASK_SEPARATOR",
    "WEIGHTINGS",
    "FusedNet",
    "HierarchicalNet",
    "MultiTaskNet",
    "ParallelNet",
    "Part",
    "Resize",
    "adapter",
    "build",
    "hierarchical",
    "multitask",
    "parallel",
    "task_accuracy",
    "task_slices",
    "task_targets",
]


def __getattr__(name: str) -> Any:
    if name == "fit":  # 0.1.0's name; the CLI verb is ``train``
        warnings.warn(
            "netmeld.fusion.fit is now netmeld.train (the CLI's verb: netmeld train); the old "
            "name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from netmeld.methods.fusion.training import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
