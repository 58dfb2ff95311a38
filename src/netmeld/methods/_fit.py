"""Cross-validation shared by the methods that choose among candidates on labeled data.

(The small fits themselves are :func:`netmeld.engine.small_fit`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

C = TypeVar("C")


def stratified_folds(targets: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``k`` folds of indices, each label spread round-robin over the folds (deterministic)."""
    folds: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for label in targets.unique().tolist():
        for i in (targets == label).nonzero().flatten().tolist():
            folds[position % k].append(i)
            position += 1
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds if f]


def cross_validate(
    candidates: Sequence[C],
    targets: torch.Tensor,
    k: int,
    fit_predict: Callable[[C, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[C, dict[C, float], dict[C, float]]:
    """The candidate with the best ``k``-fold accuracy (ties: the lower log-loss).

    ``fit_predict(candidate, train_mask, held_out_rows)`` fits on the rows where
    ``train_mask`` is true and returns logits for ``held_out_rows``. Returns the best candidate
    and every candidate's cross-validated accuracy and mean log-loss.
    """
    folds = stratified_folds(targets, k)
    accuracy: dict[C, float] = {}
    log_loss: dict[C, float] = {}
    for candidate in candidates:
        correct, loss = 0.0, 0.0
        for held in folds:
            train = torch.ones(len(targets), dtype=torch.bool)
            train[held] = False
            if not train.any():
                continue
            out = fit_predict(candidate, train, held).detach()
            correct += float((out.argmax(1) == targets[held]).sum())
            loss += float(F.cross_entropy(out, targets[held], reduction="sum"))
        accuracy[candidate] = correct / len(targets)
        log_loss[candidate] = loss / len(targets)
    best = max(candidates, key=lambda c: (accuracy[c], -log_loss[c]))
    return best, accuracy, log_loss
