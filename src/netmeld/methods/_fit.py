"""The small fits on cached features, and cross-validation folds, shared by the methods."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fit_lbfgs(
    parameters: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int
) -> None:
    optimizer = torch.optim.LBFGS(parameters, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


def stratified_folds(targets: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``k`` folds of indices, each label spread round-robin over the folds (deterministic)."""
    folds: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for label in targets.unique().tolist():
        for i in (targets == label).nonzero().flatten().tolist():
            folds[position % k].append(i)
            position += 1
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds if f]
