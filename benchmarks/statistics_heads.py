"""The cost of choosing the LDA shrinkage from member statistics, at the feature widths people use.

``lda`` picks its shrinkage by the held-out folds' Gaussian log-likelihood, computed from the
statistics alone. This times that choice (every shrinkage candidate on every fold, then the
final head) as netmeld does it, one eigendecomposition per fold serving every candidate,
against the direct computation, one linear solve and one log-determinant per candidate and
fold, in the same run, and checks that both give the same log-likelihoods and the same choice.

Statistics: seeded random features (10 classes, 5,000 examples, 5 folds; the cost does not
depend on the values) at widths 512, 1,280 (EfficientNet-lite0's head input) and 2,560 (the
RanPAC projection ``union_heads.py`` uses there). Medians of ``--repeats`` runs::

    python benchmarks/statistics_heads.py
    python benchmarks/statistics_heads.py --widths 1280 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from netmeld.methods.statistics import SHRINKAGES, _lda, _splits, shrinkage_scores


def synthetic(width: int, examples: int, classes: int, folds: int, seed: int = 0):
    """Per-fold Gram matrices, ``X^T Y`` and class counts of random class-structured features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (examples,), generator=g)
    means = torch.randn(classes, width, generator=g, dtype=torch.float64)
    x = means[y] + 2 * torch.randn(examples, width, generator=g, dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(examples, 1, dtype=torch.float64)], 1)
    onehot = torch.nn.functional.one_hot(y, classes).double()
    fold = torch.arange(examples) % folds
    gram = torch.stack([x1[fold == f].T @ x1[fold == f] for f in range(folds)])
    xty = torch.stack([x1[fold == f].T @ onehot[fold == f] for f in range(folds)])
    counts = torch.stack([onehot[fold == f].sum(0) for f in range(folds)])
    return gram, xty, counts


def direct(pooled) -> tuple[dict[float, float], float]:
    """The shrinkage scan with one solve and one log-determinant per candidate and fold."""
    scores = dict.fromkeys(SHRINKAGES, 0.0)
    for train, (gram, xty, counts) in _splits(pooled):
        for alpha in SHRINKAGES:
            means, cov, _, _ = _lda(*train, alpha)
            sums = xty[:-1].T
            scatter = gram[:-1, :-1] - sums.T @ means - means.T @ sums + (means.T * counts) @ means
            logdet = torch.linalg.slogdet(cov)[1]
            value = -0.5 * torch.trace(torch.linalg.solve(cov, scatter))
            scores[alpha] += float(value - 0.5 * float(counts.sum()) * logdet)
    best = max(scores, key=scores.__getitem__)
    _lda(*(t.sum(0) for t in pooled), best)
    return scores, best


def shared(pooled) -> tuple[dict[float, float], float]:
    """netmeld's scan (one eigendecomposition per fold for every candidate), then the head."""
    scores = shrinkage_scores(pooled)
    best = max(scores, key=scores.__getitem__)
    _lda(*(t.sum(0) for t in pooled), best)
    return scores, best


def timed(fn, pooled, repeats: int) -> tuple[float, tuple]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(pooled)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[512, 1280, 2560])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(
        title=f"LDA shrinkage choice from statistics ({len(SHRINKAGES)} candidates, 5 folds, "
        f"{args.examples} examples; median of {args.repeats} runs, {torch.get_num_threads()} "
        "threads)",
        title_justify="left",
    )
    for column in ("width", "direct, s", "netmeld, s", "speed-up", "same choice", "max |diff|"):
        table.add_column(column, justify="right")
    for width in args.widths:
        pooled = synthetic(width, args.examples, 10, 5)
        t_direct, (s_direct, b_direct) = timed(direct, pooled, args.repeats)
        t_shared, (s_shared, b_shared) = timed(shared, pooled, args.repeats)
        diff = max(abs(s_direct[a] - s_shared[a]) / max(1.0, abs(s_direct[a])) for a in s_direct)
        table.add_row(
            str(width),
            f"{t_direct:.2f}",
            f"{t_shared:.2f}",
            f"{t_direct / t_shared:.1f}x",
            "yes" if b_direct == b_shared else f"no ({b_direct} / {b_shared})",
            f"{diff:.1e} (relative)",
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
