"""Weight-space merging kernels: the maths, tensors in, one tensor out.

Every kernel takes the same tensor (same name, same shape) from several fine-tuned models and,
for the task-vector kernels, from their common base. Nothing here knows about modules, files or
names beyond the optional ``key`` that seeds the random ones, so streaming and in-memory merges
call exactly the same code. :mod:`netmeld.ops.merge` registers them by name. Arithmetic follows
mergekit's order of operations (stack, weight, sum, divide) so that results agree bit for bit
where the method is the same.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Literal

import torch

from netmeld.errors import MethodError

Consensus = Literal["sum", "count"]

__all__ = [
    "Consensus",
    "breadcrumbs",
    "dare",
    "fisher",
    "linear",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
]


def _weights(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """The per-model weights as a ``(n, 1, ..., 1)`` tensor broadcasting over a stack of
    ``tensors``, after checking their shapes agree and there is one weight per tensor."""
    if not tensors:
        raise MethodError("merging needs at least one tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MethodError(
                f"tensor {i} has shape {tuple(t.shape)}, tensor 0 has {tuple(shape)}: "
                "merged tensors must have the same shape"
            )
    if weights is None:
        weights = [1.0] * len(tensors)
    if len(weights) != len(tensors):
        raise MethodError(f"{len(weights)} weights for {len(tensors)} tensors")
    w = torch.tensor(list(weights), dtype=tensors[0].dtype, device=tensors[0].device)
    return w.reshape(-1, *([1] * len(shape)))


def _stack_weights(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    w = _weights(tensors, weights)
    return torch.stack(list(tensors), dim=0), w


def linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the tensors (model soup; Wortsman et al. 2022).

    With ``normalize`` the weights are divided by their sum, so equal weights give the mean.
    """
    _weights(tensors, weights)  # checks shapes and counts
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(first, dtype=dtype)
    for t, w in zip(tensors, weights, strict=True):
        out.addcmul_(t, torch.tensor(w, dtype=dtype))  # fused like mergekit, bit for bit
    if normalize:
        out.div_(torch.tensor(weights, dtype=dtype).sum())
    return out.to(first.dtype)


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (``t=0``) to ``b`` (``t=1``) along the great circle of
    their directions (Shoemake 1985); nearly parallel tensors are interpolated linearly."""
    if a.shape != b.shape:
        raise MethodError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    v0 = a.double().flatten()
    v1 = b.double().flatten()
    n0 = v0 / v0.norm().clamp_min(eps)
    n1 = v1 / v1.norm().clamp_min(eps)
    dot = float((n0 * n1).sum())
    if abs(dot) > dot_threshold:
        out = (1 - t) * v0 + t * v1
    else:
        theta0 = math.acos(max(-1.0, min(1.0, dot)))
        sin0 = math.sin(theta0)
        s0 = math.sin(theta0 - theta0 * t) / sin0
        s1 = math.sin(theta0 * t) / sin0
        out = s0 * v0 + s1 * v1
    return out.reshape(a.shape).to(a.dtype)


def _generator(seed: int, key: str, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{key}#{index}".encode())) % (2**63))
    return g


def _magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """A boolean mask of the ``density`` share of entries with the largest magnitude (TIES'
    trim; at least one entry). A k-th-value threshold finds them in linear time; a full sort
    settles ties."""
    n = delta.numel()
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1).float()
    if k < n:
        threshold = torch.kthvalue(mag, n - k + 1).values
        keep = mag >= threshold
        if int(keep.sum()) == k:
            return keep.reshape(delta.shape)
        del keep
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[torch.argsort(mag, descending=True)[:k]] = True
    return mask.reshape(delta.shape)


def _outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest entries and the smallest ones, keeping
    ``density`` of them (a boolean mask)."""
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = max(0, top + bottom), 0
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom : n - top]] = True
    return mask.reshape(delta.shape)


def _sign_mask(weighted: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """TIES' sign election: a boolean mask of the entries whose sign agrees with the elected
    sign (computed one model at a time, to keep memory low)."""
    if consensus == "sum":
        votes = weighted.sum(dim=0)
    elif consensus == "count":
        votes = torch.zeros(weighted.shape[1:], dtype=weighted.dtype, device=weighted.device)
        for row in weighted:
            votes.add_(row.sign())
    else:
        raise MethodError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    elected = (votes >= 0).to(weighted.dtype) * 2 - 1
    del votes
    mask = torch.empty(weighted.shape, dtype=torch.bool, device=weighted.device)
    for i, row in enumerate(weighted):
        torch.eq(row.sign(), elected, out=mask[i])
    return mask


def _per_model(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise MethodError(f"{len(values)} values of {what} for {n} models")
    return values


def _task_vectors(
    kind: str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    *,
    normalize: bool,
    lambda_: float,
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.0,
    rescale: bool = False,
    consensus: Consensus | None = None,
    seed: int = 0,
    key: str = "",
) -> torch.Tensor:
    """``base`` plus the weighted task vectors ``t_i - base``, each first sparsified by
    ``kind`` (``none``, ``magnitude``: TIES' trim, ``random``: DARE's drop, ``outliers``:
    Breadcrumbs) to ``density``, then optionally sign-elected (``consensus``), normalised by
    the weights that count and scaled by ``lambda_``."""
    densities = _per_model(density, len(tensors), "density")
    gammas = _per_model(gamma, len(tensors), "gamma")
    for d in densities:
        if not 0 < d <= 1:
            raise MethodError(f"density must be in (0, 1], got {d}")
    for i, t in enumerate(tensors):
        if t.shape != base.shape:
            raise MethodError(
                f"tensor {i} has shape {tuple(t.shape)}, the base has {tuple(base.shape)}"
            )
    # one (n, *shape) buffer, updated in place: memory stays a few times the tensor's size
    stacked = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, t in enumerate(tensors):
        delta = stacked[i]
        torch.sub(t, base, out=delta)
        density, gamma = densities[i], gammas[i]
        if density < 1:
            if kind == "magnitude":
                delta.mul_(_magnitude_mask(delta, density))
            elif kind == "random":
                work = delta.float() if delta.dtype != torch.bfloat16 else delta
                keep = torch.bernoulli(
                    torch.full(work.shape, density, dtype=work.dtype),
                    generator=_generator(seed, key, i),
                ).to(work.device)
                work = work * keep
                del keep
                if rescale:
                    work = work / density
                delta.copy_(work)
                del work
            elif kind == "outliers":
                delta.mul_(_outlier_mask(delta, density, gamma))
    w = _weights(tensors, weights)
    weighted = stacked.mul_(w)
    if consensus is not None:
        keep_sign = _sign_mask(weighted, consensus)
        divisor = torch.zeros(base.shape, dtype=base.dtype, device=base.device)
        for i in range(len(tensors)):
            divisor.add_(keep_sign[i].to(base.dtype) * w[i])
        weighted.mul_(keep_sign)
        del keep_sign
        mixed = weighted.sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del stacked, weighted
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """``base + lambda * sum_i w_i (t_i - base)`` (Ilharco et al. 2023, task arithmetic)."""
    return _task_vectors("none", base, tensors, weights, normalize=normalize, lambda_=lambda_)


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float] = 0.2,
    consensus: Consensus | None = "sum",
    lambda_: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its ``density`` largest
    entries, elect a sign per entry, and average the entries that agree with it.

    With ``consensus=None`` and ``density=1`` this is task arithmetic."""
    return _task_vectors(
        "magnitude",
        base,
        tensors,
        weights,
        normalize=normalize,
        lambda_=lambda_,
        density=density,
        consensus=consensus,
    )


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float] = 0.5,
    seed: int = 0,
    key: str = "",
    rescale: bool = True,
    consensus: Consensus | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``1 - density`` and
    rescale the rest by ``1 / density``; with ``consensus='sum'`` this is DARE-TIES.

    The mask is drawn from ``seed`` and ``key`` (the tensor's name), so a merge is reproducible
    and does not depend on the order tensors are visited in."""
    return _task_vectors(
        "random",
        base,
        tensors,
        weights,
        normalize=normalize,
        lambda_=lambda_,
        density=density,
        rescale=rescale,
        consensus=consensus,
        seed=seed,
        key=key,
    )


def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float] = 0.9,
    gamma: float | Sequence[float] = 0.01,
    consensus: Consensus | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop each task vector's ``gamma`` share of
    largest-magnitude entries (outliers) and its smallest, keeping ``density`` of them."""
    for g in _per_model(gamma, len(tensors), "gamma"):
        if not 0 <= g < 1:
            raise MethodError(f"gamma must be in [0, 1), got {g}")
    return _task_vectors(
        "outliers",
        base,
        tensors,
        weights,
        normalize=normalize,
        lambda_=lambda_,
        density=density,
        gamma=gamma,
        consensus=consensus,
    )


def fisher(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Fisher merging (Matena & Raffel 2022): ``sum_i w_i F_i t_i / sum_i w_i F_i`` with each
    model's diagonal Fisher information ``F_i`` (same shape as the tensor)."""
    if len(fishers) != len(tensors):
        raise MethodError(f"{len(fishers)} Fisher tensors for {len(tensors)} tensors")
    stacked, w = _stack_weights(tensors, weights)
    f, _ = _stack_weights(fishers, weights)
    if f.shape != stacked.shape:
        raise MethodError(
            f"Fisher tensors have shape {tuple(f.shape[1:])}, tensors {tuple(stacked.shape[1:])}"
        )
    wf = w * f + eps
    return (wf * stacked).sum(dim=0) / wf.sum(dim=0)


def regmean(
    tensors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float = 0.9,
) -> torch.Tensor:
    """RegMean (Jin et al. 2023) for a linear layer ``y = W x``: the ``W`` minimising
    ``sum_i ||W X_i - W_i X_i||^2`` is ``(sum_i W_i G_i)(sum_i G_i)^-1`` with ``G_i = X_i^T X_i``.

    ``tensors`` are ``(out, in)`` weights, ``grams`` their ``(in, in)`` input Gram matrices.
    ``alpha`` scales the Gram matrices' off-diagonal entries (the paper's regularisation;
    ``alpha=0`` is a per-input-feature weighted average)."""
    if len(grams) != len(tensors):
        raise MethodError(f"{len(grams)} Gram matrices for {len(tensors)} tensors")
    if not 0 <= alpha <= 1:
        raise MethodError(f"alpha must be in [0, 1], got {alpha}")
    dtype = tensors[0].dtype
    num = None
    den = None
    for i, (w, g) in enumerate(zip(tensors, grams, strict=True)):
        w2 = w.double().reshape(w.shape[0], -1)
        if g.shape != (w2.shape[1], w2.shape[1]):
            raise MethodError(
                f"Gram matrix {i} has shape {tuple(g.shape)}, expected {(w2.shape[1],) * 2} "
                f"for a weight of shape {tuple(w.shape)}"
            )
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        num = w2 @ g if num is None else num + w2 @ g
        den = g if den is None else den + g
    assert num is not None and den is not None
    # W = num @ den^-1, solved as den W^T = num^T (den is symmetric); lstsq if it is singular
    try:
        out = torch.linalg.solve(den, num.T).T
    except torch.linalg.LinAlgError:
        out = torch.linalg.lstsq(den, num.T).solution.T
    return out.reshape(tensors[0].shape).to(dtype)
