"""Matching hidden units between two networks: weight matching, activation matching and
ZipIt!-style feature merging. Tensors and axis descriptions in, permutations or merge
matrices out; nothing here walks modules.

An *axis description* maps a tensor name to one entry per axis: ``None`` (not permuted) or
``(group, repeat)``: the axis has ``size(group) * repeat`` entries, channel-major (a conv's
channels flattened with ``repeat`` spatial positions each). A permutation ``p`` of a group
means: unit ``i`` of the permuted network is unit ``p[i]`` of the original.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

AxisDesc = tuple[str, int] | None
Axes = Mapping[str, Sequence[AxisDesc]]


def expand(perm: torch.Tensor, repeat: int) -> torch.Tensor:
    """The index along an axis of ``len(perm) * repeat`` entries that applies ``perm``."""
    if repeat == 1:
        return perm
    return (perm[:, None] * repeat + torch.arange(repeat)).reshape(-1)


def permute_tensor(
    tensor: torch.Tensor,
    axes: Sequence[AxisDesc],
    perms: Mapping[str, torch.Tensor],
    *,
    skip_axis: int | None = None,
) -> torch.Tensor:
    """``tensor`` with every described axis (but ``skip_axis``) permuted."""
    for axis, desc in enumerate(axes):
        if desc is None or axis == skip_axis:
            continue
        group, repeat = desc
        tensor = tensor.index_select(axis, expand(perms[group], repeat).to(tensor.device))
    return tensor


def _as_rows(tensor: torch.Tensor, axis: int, repeat: int, size: int) -> torch.Tensor:
    """``tensor`` as ``(size, -1)`` with the group's units along the rows."""
    moved = tensor.movedim(axis, 0)
    return moved.reshape(size, repeat * int(np.prod(moved.shape[1:], dtype=np.int64)))


def weight_matching(
    axes: Axes,
    sizes: Mapping[str, int],
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """Permutations of B's units that maximise ``sum <W_a, P W_b>`` over every tensor
    (Ainsworth et al. 2023, Git Re-Basin, weight matching): coordinate ascent over the groups
    in a seeded random order, each step a linear assignment problem, until no group improves
    the total by more than ``tol`` (relative)."""
    from scipy.optimize import linear_sum_assignment  # imported here: the CLI starts faster

    perms = {g: torch.arange(n) for g, n in sizes.items()}
    where: dict[str, list[tuple[str, int, int]]] = {g: [] for g in sizes}
    for key, desc in axes.items():
        for axis, d in enumerate(desc):
            if d is not None:
                where[d[0]].append((key, axis, d[1]))
    rng = np.random.default_rng(seed)
    order = list(sizes)
    rows_a = {
        (key, axis): _as_rows(params_a[key].float(), axis, repeat, sizes[g])
        for g, entries in where.items()
        for key, axis, repeat in entries
    }
    # a group's cost matrix changes only when a group sharing a tensor with it changes: solve
    # only those ("dirty") groups again; the result is the same, with fewer assignments
    neighbours: dict[str, set[str]] = {g: set() for g in sizes}
    for desc in axes.values():
        groups = {d[0] for d in desc if d is not None}
        for g in groups:
            neighbours[g] |= groups - {g}
    dirty = set(order)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(order)):
            g = order[gi]
            if g not in dirty:
                continue
            dirty.discard(g)
            n = sizes[g]
            cost = torch.zeros(n, n)
            for key, axis, repeat in where[g]:
                wb = permute_tensor(params_b[key].float(), axes[key], perms, skip_axis=axis)
                cost += rows_a[key, axis] @ _as_rows(wb, axis, repeat, n).T
            c = cost.double().numpy()
            _, cols = linear_sum_assignment(c, maximize=True)
            old = c[np.arange(n), perms[g].numpy()].sum()
            new = c[np.arange(n), cols].sum()
            if new > old + tol * max(1.0, abs(old)):
                improved = True
                perms[g] = torch.as_tensor(cols, dtype=torch.long)
                dirty |= neighbours[g]
        if not improved or not dirty:
            break
    return perms


class CorrelationStats:
    """Running sums for the correlation between two feature sets of ``n`` units each, fed
    batch by batch (rows are samples)."""

    def __init__(self, n_a: int, n_b: int) -> None:
        self.count = 0
        self.sum_a = torch.zeros(n_a, dtype=torch.float64)
        self.sum_b = torch.zeros(n_b, dtype=torch.float64)
        self.sq_a = torch.zeros(n_a, dtype=torch.float64)
        self.sq_b = torch.zeros(n_b, dtype=torch.float64)
        self.cross = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.gram_a = torch.zeros(n_a, n_a, dtype=torch.float64)
        self.gram_b = torch.zeros(n_b, n_b, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.double()
        b = b.double()
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b
        self.gram_a += a.T @ a
        self.gram_b += b.T @ b

    def _std(self, s: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        mean = s / self.count
        return (sq / self.count - mean * mean).clamp_min(0).sqrt() + 1e-8

    def correlation(self) -> torch.Tensor:
        """``(n_a, n_b)`` Pearson correlations between A's and B's units."""
        ma, mb = self.sum_a / self.count, self.sum_b / self.count
        cov = self.cross / self.count - ma[:, None] * mb[None, :]
        return cov / (self._std(self.sum_a, self.sq_a)[:, None] * self._std(self.sum_b, self.sq_b))

    def joint_correlation(self) -> torch.Tensor:
        """``(n_a + n_b)`` square correlations among all units of A and B together."""
        ma, mb = self.sum_a / self.count, self.sum_b / self.count
        sa, sb = self._std(self.sum_a, self.sq_a), self._std(self.sum_b, self.sq_b)
        caa = (self.gram_a / self.count - ma[:, None] * ma) / (sa[:, None] * sa)
        cbb = (self.gram_b / self.count - mb[:, None] * mb) / (sb[:, None] * sb)
        cab = self.correlation()
        return torch.cat([torch.cat([caa, cab], 1), torch.cat([cab.T, cbb], 1)], 0)


def activation_matching(correlation: torch.Tensor) -> torch.Tensor:
    """The permutation of B's units best matching A's, by maximal total correlation
    (Git Re-Basin's activation matching; Li et al. 2016)."""
    from scipy.optimize import linear_sum_assignment

    c = torch.nan_to_num(correlation, nan=0.0).numpy()
    _, cols = linear_sum_assignment(c, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def zip_matching(
    joint: torch.Tensor, n_out: int | None = None, *, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt! feature merging (Stoica et al. 2024): greedily pair the most correlated units
    among A's and B's ``n`` units each, within a model as well as across, until ``n_out``
    (default ``n``) merged units remain.

    Returns the merge matrix ``M`` (``n_out, 2n``: averages each pair) and the unmerge matrix
    ``U`` (``2n, n_out``: copies a merged unit back to both). ``alpha`` caps the pairs taken
    within one model, as a share of ``n`` (the paper's β: 0 allows no within-model pairs)."""
    total = joint.shape[0]
    n = total // 2
    n_out = n if n_out is None else n_out
    c = torch.nan_to_num(joint.clone(), nan=-np.inf)
    c.fill_diagonal_(-np.inf)
    within_budget = int(alpha * n)
    within_used = [0, 0]
    alive = torch.ones(total, dtype=torch.bool)
    pairs: list[tuple[int, ...]] = []
    flat = c.reshape(-1)
    order = torch.argsort(flat, descending=True)
    side = torch.arange(total) >= n
    remaining = total
    for idx in order.tolist():
        if remaining <= n_out:
            break
        i, j = divmod(idx, total)
        if i >= j or not alive[i] or not alive[j] or not np.isfinite(float(c[i, j])):
            continue
        if side[i] == side[j]:
            s = int(side[i])
            if within_used[s] >= within_budget:
                continue
            within_used[s] += 1
        alive[i] = alive[j] = False
        pairs.append((i, j))
        remaining -= 1
    singles = [(int(i),) for i in torch.nonzero(alive).flatten().tolist()]
    clusters = pairs + singles
    if len(clusters) != n_out:
        raise ValueError(f"zip matching left {len(clusters)} units, expected {n_out}")
    clusters.sort(key=lambda cl: min(cl))
    merge = torch.zeros(n_out, total, dtype=torch.float64)
    unmerge = torch.zeros(total, n_out, dtype=torch.float64)
    for k, cl in enumerate(clusters):
        for i in cl:
            merge[k, i] = 1.0 / len(cl)
            unmerge[i, k] = 1.0
    return merge, unmerge
