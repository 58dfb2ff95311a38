"""The transfer-learning scenario netmeld is built for, made reproducible.

A trunk is trained on a *source* task and frozen; each member is that frozen trunk plus a
head trained on its own subset of the *target* labels; the **oracle** is the same frozen trunk
with one head trained on all target labels at once. The demo, the tests and the benchmarks all
use these helpers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netmeld.engine import small_fit
from netmeld.errors import NetmeldError
from netmeld.members.member import Architecture, Member, Preprocessing


def _sklearn_datasets() -> Any:
    """scikit-learn's bundled data sets: the demo's data, an optional extra of netmeld's."""
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise NetmeldError(
            "the demo and its scenarios use scikit-learn's bundled data sets; install them "
            "with: pip install 'netmeld[demo]'"
        ) from exc
    return datasets


def load_digits_images() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's digits as ``(N, 1, 8, 8)`` floats in ``[0, 1]`` and integer targets."""
    digits = _sklearn_datasets().load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, digits.target.astype(np.int64)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 2e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    augment: bool = False,
) -> nn.Module:
    """Train ``model`` end to end with Adam and cross-entropy (deterministic for ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    batches = _shuffled_batches(len(x), batch_size, epochs, gen)

    def loss() -> torch.Tensor:
        idx = next(batches)
        xb = x[idx]
        if augment:
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        return F.cross_entropy(model(xb), y[idx])

    model.train()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    parameters = [p for p in model.parameters() if p.requires_grad]  # frozen parts stay so
    small_fit(
        parameters, loss, steps, optimizer="adamw", lr=lr, weight_decay=weight_decay, one_cycle=True
    )
    return model.eval()


def _shuffled_batches(
    n: int, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches of ``epochs`` passes over ``n`` rows, each pass in a fresh order (drawn
    when the pass starts, so other draws from ``generator`` in between keep their place)."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def train_linear_head(
    features: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 60,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """A linear head on frozen features, trained as people do (Adam, softmax cross-entropy)."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    batches = _shuffled_batches(len(features), 128, epochs, torch.Generator().manual_seed(seed))

    def loss() -> torch.Tensor:
        idx = next(batches)
        return F.cross_entropy(head(features[idx]), y[idx])

    steps = epochs * ((len(features) + 127) // 128)
    small_fit(list(head.parameters()), loss, steps, lr=lr, weight_decay=weight_decay)
    return head.eval()


# Members come from different people: each head is trained with its own schedule. The oracle
# (offset 0) uses the first; members cycle through the rest.
HEAD_RECIPES = [  # (epochs, learning rate, weight decay)
    (60, 1e-2, 1e-4),
    (40, 1e-2, 1e-3),
    (150, 2e-2, 0.0),
    (80, 5e-3, 1e-4),
]


@dataclass
class Scenario:
    """Members over disjoint label subsets on one frozen trunk, plus the oracle and test data."""

    members: list[Member]
    oracle: Member
    test: tuple[torch.Tensor, list[str]]
    pool: torch.Tensor  # target-domain training inputs (for unlabeled / few-label fits)
    pool_labels: list[str]
    pool_features: torch.Tensor | None = None  # the shared trunk's head inputs of ``pool``


def transfer_scenario(
    trunk_model: nn.Module,
    *,
    head_attr: str,
    train_features: torch.Tensor,
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
    class_names: Sequence[str],
    splits: Sequence[Sequence[int]],
    preprocessing: Preprocessing,
    architecture: Architecture | None,
    seed: int = 0,
) -> Scenario:
    """Members (one per split of class indices) and the oracle, sharing ``trunk_model``'s body.

    ``train_features`` are the head inputs (the frozen body's output) of ``x_train``; each
    member is a deep copy of ``trunk_model`` whose ``head_attr`` is replaced by a head trained on
    its classes only. Targets are class indices into ``class_names``; the test set and the
    training pool come back with label names.
    """
    feats = train_features
    y = torch.as_tensor(y_train)

    def member_for(classes: Sequence[int], name: str, offset: int) -> Member:
        rows = torch.isin(y, torch.tensor(list(classes)))
        remap = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([remap[int(v)] for v in y[rows]])
        epochs, lr, weight_decay = HEAD_RECIPES[offset % len(HEAD_RECIPES)]
        head = train_linear_head(
            feats[rows],
            targets,
            len(classes),
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed + offset,
        )
        module = copy.deepcopy(trunk_model)
        setattr(module, head_attr, head)
        return Member(
            module.eval(),
            [class_names[c] for c in classes],
            name=name,
            preprocessing=preprocessing,
            architecture=None
            if architecture is None
            else Architecture(
                architecture.spec, {**architecture.kwargs, "num_classes": len(classes)}
            ),
        )

    members = [member_for(classes, f"m{i + 1}", i + 1) for i, classes in enumerate(splits)]
    all_classes = sorted({c for s in splits for c in s})
    oracle = member_for(all_classes, "oracle", 0)
    return Scenario(
        members,
        oracle,
        (x_test, [class_names[v] for v in y_test]),
        x_train,
        [class_names[v] for v in y_train],
        feats,
    )


def digits_scenario(splits: Sequence[Sequence[int]], *, seed: int = 0) -> Scenario:
    """sklearn digits: trunk trained on a source half, members' heads on the target half."""
    from netmeld.zoo import SmallCNN

    x, y = load_digits_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    source, target = order[: len(x) // 2], order[len(x) // 2 :]
    train_t, test_t = target[: len(target) * 3 // 5], target[len(target) * 3 // 5 :]
    torch.manual_seed(seed)
    trunk = SmallCNN(num_classes=10, in_channels=1, width=16, blocks=2)
    mean, std = 0.3, 0.4
    train_classifier(
        trunk,
        (x[source] - mean) / std,
        torch.as_tensor(y[source]),
        epochs=15,
        seed=seed,
        augment=True,
    )
    for p in trunk.parameters():
        p.requires_grad_(False)
    names = [str(d) for d in range(10)]
    return transfer_scenario(
        trunk,
        head_attr="fc",
        train_features=features_of(lambda v: trunk.features((v - mean) / std), x[train_t]),
        x_train=x[train_t],
        y_train=y[train_t],
        x_test=x[test_t],
        y_test=y[test_t],
        class_names=names,
        splits=splits,
        preprocessing=Preprocessing((1, 8, 8), mean=(mean,), std=(std,)),
        architecture=Architecture(
            "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 16, "blocks": 2}
        ),
        seed=seed,
    )


@torch.no_grad()
def features_of(
    body: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """``body`` applied to ``x`` in batches (no gradients)."""
    return torch.cat([body(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def few_per_class(labels: Sequence[str], k: int, *, seed: int = 0) -> list[int]:
    """Indices of ``k`` examples of each label (fewer where a label has fewer), seeded."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    chosen: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        chosen.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return sorted(chosen)


@dataclass
class TableScenario:
    """Two (or more) tabular MLP members reading different columns, and the oracle on all."""

    members: list[Member]
    oracle: Member
    feature_names: list[str]
    train: tuple[torch.Tensor, list[str]]  # what the members were trained on
    holdout: tuple[torch.Tensor, list[str]]  # rows no member saw, for fitting combinations
    test: tuple[torch.Tensor, list[str]]


def table_scenario(
    dataset: str = "breast_cancer",
    *,
    parts: int = 2,
    seed: int = 0,
    epochs: int = 60,
    train_fraction: float = 0.5,
    holdout_fraction: float = 0.2,
) -> TableScenario:
    """An sklearn table split by columns: member ``i`` reads every ``parts``-th column from
    ``i`` and is trained on the training rows; the oracle reads all columns and is trained on
    the training and holdout rows (all the labeled data)."""
    from netmeld.zoo import MLP

    datasets = _sklearn_datasets()
    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}
    if dataset not in loaders:
        raise ValueError(f"dataset {dataset!r}: expected one of {sorted(loaders)}")
    bunch = loaders[dataset]()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    classes = [str(c) for c in bunch.target_names]
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(len(x)))
    n_train = int(len(x) * train_fraction)
    n_hold = int(len(x) * holdout_fraction)
    train, hold = order[:n_train], order[n_train : n_train + n_hold]
    test = order[n_train + n_hold :]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)

    def member_for(cols: list[int], name: str, offset: int, rows: torch.Tensor) -> Member:
        torch.manual_seed(seed + offset)
        model = MLP(len(cols), len(classes), hidden=32, depth=2)
        xs = (x[rows][:, cols] - mean[cols]) / std[cols]
        train_classifier(model, xs, y[rows], epochs=epochs, lr=1e-2, batch_size=32, seed=seed)
        return Member(
            model,
            classes,
            name=name,
            preprocessing=Preprocessing(
                (len(cols),),
                mean=tuple(mean[cols].tolist()),
                std=tuple(std[cols].tolist()),
                columns=tuple(names[c] for c in cols),
            ),
            architecture=Architecture(
                "netmeld.zoo:mlp", {"in_features": len(cols), "hidden": 32, "depth": 2}
            ),
        )

    members = [
        member_for(list(range(i, len(names), parts)), f"cols{i + 1}", i + 1, train)
        for i in range(parts)
    ]
    oracle = member_for(list(range(len(names))), "all-columns", 0, torch.cat([train, hold]))
    label_names = [classes[int(v)] for v in y]

    def rows(r: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        return x[r], [label_names[i] for i in r.tolist()]

    return TableScenario(members, oracle, names, rows(train), rows(hold), rows(test))
