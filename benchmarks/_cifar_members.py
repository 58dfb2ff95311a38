"""CIFAR-10 members on a frozen ImageNet EfficientNet-lite0, for the ensemble and extension
benchmarks, and fast evaluation through cached trunk features.

Each member is the pretrained network with a new linear head trained on the cached features of
its classes (transfer learning, as forum users do it). All members share the frozen trunk, so a
combined model's outputs can be computed from the trunk features once per image:
:func:`logits_from_features` does that and :func:`check_fast_path` proves it equals the real
forward on a batch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import netmeld
from netmeld.demo.scenarios import features_of, train_linear_head
from netmeld.members.member import Member, Preprocessing
from netmeld.model.heads import MemberOutputs
from netmeld.model.inputs import Preprocess

MEAN, STD = 127.0 / 255.0, 128.0 / 255.0


def load(seed: int, root: str | None, resolution: int, train_per_class: int, test_per_class: int):
    """Images, labels, class names, the frozen base and its features, for one seed."""
    from _datasets import load_cifar10
    from _efficientnet_lite import load_pretrained

    xtr, ytr, classes = load_cifar10("train", limit_per_class=train_per_class, seed=seed, root=root)
    xte, yte, _ = load_cifar10("test", limit_per_class=test_per_class, seed=seed, root=root)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    base = load_pretrained(num_classes=1000, image_size=resolution).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    pre = Preprocess(
        (3, 32, 32), Preprocessing((3, resolution, resolution), mean=(MEAN,), std=(STD,))
    )
    x_train, x_test = to_t(xtr), to_t(xte)
    start = time.perf_counter()
    f_train = features_of(lambda v: base.forward_features(pre(v)), x_train, batch_size=128)
    f_test = features_of(lambda v: base.forward_features(pre(v)), x_test, batch_size=128)
    print(
        f"  cifar10 seed {seed}: features of {len(x_train) + len(x_test)} images at "
        f"{resolution} px in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return {
        "base": base,
        "x_train": x_train,
        "y_train": ytr,
        "f_train": f_train,
        "x_test": x_test,
        "y_test": yte,
        "f_test": f_test,
        "classes": list(classes),
        "resolution": resolution,
    }


def member(
    data: dict[str, Any], rows: np.ndarray, classes: Sequence[int], name: str, seed: int
) -> Member:
    """The frozen base with a linear head trained on ``rows`` of the given classes."""
    import copy

    keep = rows[np.isin(data["y_train"][rows], list(classes))]
    remap = {c: i for i, c in enumerate(classes)}
    head = train_linear_head(
        data["f_train"][keep],
        torch.tensor([remap[int(v)] for v in data["y_train"][keep]]),
        len(classes),
        seed=seed,
    )
    module = copy.deepcopy(data["base"])
    module._fc = head
    r = data["resolution"]
    return Member(
        module.eval(),
        [data["classes"][c] for c in classes],
        name=name,
        preprocessing=Preprocessing((3, r, r), mean=(MEAN,), std=(STD,)),
    )


@torch.no_grad()
def logits_from_features(model: netmeld.CombinedModel, features: torch.Tensor) -> torch.Tensor:
    """The model's logits from the shared trunk's features (members on one frozen trunk)."""
    if len(model.plan) != 1 or not all(model._dedup_groups):
        raise ValueError("the fast path needs every member on one shared trunk")
    m = len(model.members)
    logits = [model.heads[n](features) for n in model.member_names]
    out = MemberOutputs([features] * m, logits, features)
    z = model.base_logits(out, features)
    if model.extension is not None:
        z = torch.cat([z, model.extension(out.features, z)], dim=1)
    return z


@torch.no_grad()
def check_fast_path(model: netmeld.CombinedModel, x: torch.Tensor, features: torch.Tensor) -> None:
    """Raise unless the fast path equals the real forward on ``x`` (with its ``features``)."""
    model.eval()
    real = model(x)
    fast = logits_from_features(model, features)
    if not torch.allclose(real, fast, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"fast path differs from the forward: {(real - fast).abs().max():.2e}")


def predict(model: netmeld.CombinedModel, features: torch.Tensor) -> list[str]:
    idx = logits_from_features(model, features).argmax(1).tolist()
    return [model.labels[i] for i in idx]
