"""Weight-space merging kernels: the maths, tensors in, one tensor out.

Every kernel takes the same tensor (same name, same shape) from several fine-tuned models and,
for the task-vector kernels, from their common base. Nothing here knows about modules, files or
names beyond the optional ``key`` that seeds the random ones, so streaming and in-memory merges
call exactly the same code. :mod:`netmeld.ops.merge` registers them by name. Arithmetic follows
mergekit's order of operations (stack, weight, sum, divide) so that results agree bit for bit
where the method is the same.

Every kernel computes in float32 (float64 when an input is float64) and casts the result back
to its input's dtype, so float16 and bfloat16 tensors neither overflow nor lose ``eps`` half
way. Inputs must be finite floating-point tensors and weights finite numbers; a result that is
not finite, or does not fit the output dtype, is a :class:`MethodError`, never a tensor of
NaN or Inf.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

from netmeld.errors import MethodError

Consensus = Literal["sum", "count"]

__all__ = [
    "Consensus",
    "breadcrumbs",
    "cast_finite",
    "dare",
    "fisher",
    "linear",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise: the dtype kernels compute in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not tensor.is_floating_point():
        raise MethodError(
            f"{what} is {_dtype_name(tensor.dtype)}; the merging kernels merge floating-point "
            "tensors only (merge_tensor copies integer and bool tensors every model shares)"
        )
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor.numel() - int(finite.sum())
        raise MethodError(
            f"{what} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
            "only finite tensors can be merged"
        )


def _check_inputs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    extra: Sequence[torch.Tensor] = (),
    extra_what: str = "",
) -> None:
    """Every input a finite floating-point tensor, each named by its model in an error."""
    if not tensors:
        raise MethodError("merging needs at least one tensor")
    for i, t in enumerate(tensors):
        _check_finite(t, f"model {i}'s tensor")
    if base is not None:
        _check_finite(base, "the base's tensor")
    for i, t in enumerate(extra):
        _check_finite(t, f"model {i}'s {extra_what}")


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float; strings, bools, None and non-finite values are errors."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise MethodError(f"{what} must be a finite number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MethodError(f"{what} must be a finite number, got {value!r}") from exc
    if not math.isfinite(number):
        raise MethodError(f"{what} must be a finite number, got {number}")
    return number


def _check_weights(weights: Sequence[float] | None, n: int, *, normalize: bool) -> list[float]:
    """One finite weight per model (1 each by default), as floats; with ``normalize`` their
    sum, which the kernel divides by, must not be 0 (nor cancel out to rounding noise)."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise MethodError(f"weights must be a list of {n} numbers, got {weights!r}")
    values = [_number(w, f"weight {i}") for i, w in enumerate(weights)]
    if len(values) != n:
        raise MethodError(f"{len(values)} weights for {n} tensors")
    if normalize:
        total = math.fsum(values)
        if abs(total) <= 1e-6 * math.fsum(abs(w) for w in values):
            raise MethodError(
                f"weights {values} sum to {total:g}, too close to 0 to normalise by "
                "(the merge divides by their sum)"
            )
    return values


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` cast to ``dtype``; a non-finite value, or one beyond ``dtype``'s range, is
    a :class:`MethodError` naming the dtype (a merge never returns NaN or Inf)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor.numel() - int(finite.sum())
        raise MethodError(
            f"the merge gives {bad} NaN or infinite value(s) in {_dtype_name(tensor.dtype)}: "
            "the inputs, weights or parameters are too large"
        )
    del finite
    out = tensor.to(dtype)
    if out.dtype != tensor.dtype and out.is_floating_point():
        finite = torch.isfinite(out)
        if not bool(finite.all()):
            bad = out.numel() - int(finite.sum())
            largest = float(tensor.abs().max())
            raise MethodError(
                f"the merged tensor does not fit in {_dtype_name(dtype)}: {bad} value(s) "
                f"beyond its range (largest magnitude {largest:g}, "
                f"{_dtype_name(dtype)} holds up to {torch.finfo(dtype).max:g})"
            )
    return out


def _same_shapes(tensors: Sequence[torch.Tensor]) -> None:
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MethodError(
                f"tensor {i} has shape {tuple(t.shape)}, tensor 0 has {tuple(shape)}: "
                "merged tensors must have the same shape"
            )


def _weights(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """The per-model weights as a ``(n, 1, ..., 1)`` tensor of ``dtype`` broadcasting over a
    stack of ``tensors``."""
    w = torch.tensor(list(weights), dtype=dtype, device=tensors[0].device)
    return w.reshape(-1, *([1] * tensors[0].dim()))


def linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the tensors (model soup; Wortsman et al. 2022).

    With ``normalize`` the weights are divided by their sum, so equal weights give the mean.
    """
    _check_inputs(tensors)
    _same_shapes(tensors)
    weights = _check_weights(weights, len(tensors), normalize=normalize)
    first = tensors[0]
    dtype = _compute_dtype(tensors)
    out = torch.zeros_like(first, dtype=dtype)
    for t, w in zip(tensors, weights, strict=True):
        out.addcmul_(t, torch.tensor(w, dtype=dtype))  # fused like mergekit, bit for bit
    if normalize:
        out.div_(torch.tensor(weights, dtype=dtype).sum())
    return cast_finite(out, first.dtype)


def _direction(v: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """``v`` scaled to unit length (rescaled first where its norm overflows)."""
    if bool(torch.isfinite(norm)):
        return v / norm.clamp_min(eps)
    v = v / v.abs().max()
    return v / v.norm()


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (``t=0``) to ``b`` (``t=1``) along the great circle of
    their directions (Shoemake 1985); nearly parallel tensors are interpolated linearly.

    A tensor of norm at most ``eps`` has no direction: then the interpolation is linear too,
    ``(1 - t) a + t b``."""
    if a.shape != b.shape:
        raise MethodError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    _check_inputs([a, b])
    t = _number(t, "slerp's 't'")
    v0 = a.double().flatten()
    v1 = b.double().flatten()
    norm0, norm1 = v0.norm(), v1.norm()
    if float(norm0) <= eps or float(norm1) <= eps:
        return cast_finite(((1 - t) * v0 + t * v1).reshape(a.shape), a.dtype)
    n0 = _direction(v0, norm0, eps)
    n1 = _direction(v1, norm1, eps)
    dot = float((n0 * n1).sum())
    theta0 = math.acos(max(-1.0, min(1.0, dot)))
    sin0 = math.sin(theta0)
    if abs(dot) > dot_threshold or sin0 < 1e-6:
        out = (1 - t) * v0 + t * v1
    else:
        s0 = math.sin(theta0 - theta0 * t) / sin0
        s1 = math.sin(theta0 * t) / sin0
        out = s0 * v0 + s1 * v1
    return cast_finite(out.reshape(a.shape), a.dtype)


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
    """One value of ``what`` per model: a number for all, or a list of one each."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [_number(value, what)] * n
    values = [_number(v, what) for v in value]
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
    the weights that count and scaled by ``lambda_``. Computed in float32 (float64 when an
    input is), the result in the base's dtype."""
    _check_inputs(tensors, base)
    densities = _per_model(density, len(tensors), "density")
    gammas = _per_model(gamma, len(tensors), "gamma")
    for d in densities:
        if not 0 < d <= 1:
            raise MethodError(f"density must be in (0, 1], got {d}")
    lambda_ = _number(lambda_, "lambda")
    weights = _check_weights(weights, len(tensors), normalize=normalize)
    for i, t in enumerate(tensors):
        if t.shape != base.shape:
            raise MethodError(
                f"tensor {i} has shape {tuple(t.shape)}, the base has {tuple(base.shape)}"
            )
    out_dtype = base.dtype
    dtype = _compute_dtype([base, *tensors])
    base = base.to(dtype)
    # one (n, *shape) buffer, updated in place: memory stays a few times the tensor's size
    stacked = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for i, t in enumerate(tensors):
        delta = stacked[i]
        torch.sub(t, base, out=delta)
        density, gamma = densities[i], gammas[i]
        if density < 1:
            if kind == "magnitude":
                delta.mul_(_magnitude_mask(delta, density))
            elif kind == "random":
                work = delta.float()
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
    w = _weights(tensors, weights, dtype)
    weighted = stacked.mul_(w)
    if consensus is not None:
        keep_sign = _sign_mask(weighted, consensus)
        divisor = torch.zeros(base.shape, dtype=dtype, device=base.device)
        for i in range(len(tensors)):
            divisor.add_(keep_sign[i].to(dtype) * w[i])
        weighted.mul_(keep_sign)
        del keep_sign
        mixed = weighted.sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)  # not near 0 where it is used: _check_weights saw to that
    del stacked, weighted
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return cast_finite(base + mixed, out_dtype)


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
    _check_inputs(tensors, extra=fishers, extra_what="Fisher information")
    eps = _number(eps, "eps")
    if eps < 0:
        raise MethodError(f"eps must be >= 0, got {eps}")
    weights = _check_weights(weights, len(tensors), normalize=True)
    _same_shapes(tensors)
    _same_shapes(fishers)
    dtype = _compute_dtype([*tensors, *fishers])
    stacked = torch.stack([t.to(dtype) for t in tensors], dim=0)
    f = torch.stack([x.to(dtype) for x in fishers], dim=0)
    w = _weights(tensors, weights, dtype)
    if f.shape != stacked.shape:
        raise MethodError(
            f"Fisher tensors have shape {tuple(f.shape[1:])}, tensors {tuple(stacked.shape[1:])}"
        )
    wf = w * f + eps
    return cast_finite((wf * stacked).sum(dim=0) / wf.sum(dim=0), tensors[0].dtype)


def _solve(den: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """``num @ den^-1``, solved as ``den W^T = num^T`` (``den`` is symmetric); least squares
    where ``den`` is singular or the solve is not finite."""
    try:
        out = torch.linalg.solve(den, num.T).T
        if bool(torch.isfinite(out).all()):
            return out
    except torch.linalg.LinAlgError:
        pass
    return torch.linalg.lstsq(den, num.T).solution.T


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
    alpha = _number(alpha, "alpha")
    if not 0 <= alpha <= 1:
        raise MethodError(f"alpha must be in [0, 1], got {alpha}")
    _check_inputs(tensors, extra=grams, extra_what="Gram matrix")
    _same_shapes(tensors)
    if tensors[0].dim() == 0:
        raise MethodError("regmean merges (out, in) weights, got a tensor of shape ()")
    dtype = tensors[0].dtype
    num = None
    den = None
    for i, (w, g) in enumerate(zip(tensors, grams, strict=True)):
        w2 = w.double().reshape(w.shape[0], math.prod(w.shape[1:]))
        if g.shape != (w2.shape[1], w2.shape[1]):
            raise MethodError(
                f"Gram matrix {i} has shape {tuple(g.shape)}, expected {(w2.shape[1],) * 2} "
                f"for a weight of shape {tuple(w.shape)}"
            )
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        num = w2 @ g if num is None else num + w2 @ g
        den = g if den is None else den + g
    if num is None or den is None:
        raise MethodError("merging needs at least one tensor")
    return cast_finite(_solve(den, num).reshape(tensors[0].shape), dtype)
