"""The registry of weight-space merging kernels: :data:`KERNELS` names every kernel of
:mod:`netmeld.ops.kernels` with the paper it comes from, its parameters and their defaults, and
how it is called; :func:`merge_tensor` calls one by name with checked parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import torch

from netmeld.errors import MethodError
from netmeld.ops.kernels import (
    Consensus,
    breadcrumbs,
    cast_finite,
    dare,
    fisher,
    linear,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = [
    "KERNELS",
    "Consensus",
    "Kernel",
    "breadcrumbs",
    "check_params",
    "dare",
    "fisher",
    "get_kernel",
    "linear",
    "merge_tensor",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
]


# -- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A registered merging kernel: what it needs, its parameters and their defaults."""

    name: str
    reference: str
    needs_base: bool
    needs: Literal["none", "fisher", "gram"]
    defaults: Mapping[str, Any]
    fn: Callable[..., torch.Tensor]
    summary: str
    call: Call  # how merge_tensor calls fn: (tensors, base, weights, params, key, extra)


Call = Callable[..., torch.Tensor]


def _task(fn: Call) -> Call:
    """Task-vector kernels: ``fn(base, tensors, weights, **params)``."""
    return lambda tensors, base, weights, p, key, extra: fn(base, tensors, weights, **p)


def _keyed(fn: Call) -> Call:
    """Kernels seeded per tensor (DARE): the tensor's name is passed as ``key``."""
    return lambda tensors, base, weights, p, key, extra: fn(base, tensors, weights, key=key, **p)


def _weighted(fn: Call) -> Call:
    """Kernels without a base: ``fn(tensors, weights, **params)``."""
    return lambda tensors, base, weights, p, key, extra: fn(tensors, weights, **p)


def _pair(fn: Call) -> Call:
    """Kernels of exactly two models: ``fn(a, b, t)``."""

    def call(
        tensors: Sequence[torch.Tensor], base: Any, weights: Any, p: Any, key: Any, extra: Any
    ):
        if len(tensors) != 2:
            raise MethodError(f"slerp merges exactly 2 models, got {len(tensors)}")
        return fn(tensors[0], tensors[1], float(p["t"]))

    return call


def _stats(fn: Call, *, weighted: bool) -> Call:
    """Kernels that read per-model statistics (Fisher diagonals, Gram matrices) in ``extra``."""
    if weighted:
        return lambda tensors, base, weights, p, key, extra: fn(tensors, extra, weights, **p)
    return lambda tensors, base, weights, p, key, extra: fn(tensors, extra, **p)


def _k(
    name: str,
    fn: Callable[..., torch.Tensor],
    reference: str,
    defaults: Mapping[str, Any],
    *,
    needs_base: bool,
    needs: Literal["none", "fisher", "gram"] = "none",
    call: Callable[[Call], Call] = _task,
) -> Kernel:
    summary = (fn.__doc__ or "").strip().split("\n")[0]
    return Kernel(name, reference, needs_base, needs, dict(defaults), fn, summary, call(fn))


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        _k(
            "linear",
            linear,
            "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
            {"normalize": True},
            needs_base=False,
            call=_weighted,
        ),
        _k(
            "slerp",
            slerp,
            "Shoemake 1985; as used by mergekit",
            {"t": 0.5},
            needs_base=False,
            call=_pair,
        ),
        _k(
            "task-arithmetic",
            task_arithmetic,
            "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
            {"lambda_": 1.0, "normalize": False},
            needs_base=True,
        ),
        _k(
            "ties",
            ties,
            "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
            {"density": 0.2, "consensus": "sum", "lambda_": 1.0, "normalize": True},
            needs_base=True,
        ),
        _k(
            "dare",
            dare,
            "Yu et al. 2024, Language models are Super Mario (arXiv:2311.03099)",
            {
                "density": 0.5,
                "seed": 0,
                "rescale": True,
                "consensus": None,
                "lambda_": 1.0,
                "normalize": False,
            },
            needs_base=True,
            call=_keyed,
        ),
        _k(
            "dare-ties",
            dare,
            "Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES sign election)",
            {
                "density": 0.5,
                "seed": 0,
                "rescale": True,
                "consensus": "sum",
                "lambda_": 1.0,
                "normalize": False,
            },
            needs_base=True,
            call=_keyed,
        ),
        _k(
            "breadcrumbs",
            breadcrumbs,
            "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
            {"density": 0.9, "gamma": 0.01, "consensus": None, "lambda_": 1.0, "normalize": False},
            needs_base=True,
        ),
        _k(
            "fisher",
            fisher,
            "Matena & Raffel 2022, Merging models with Fisher-weighted "
            "averaging (arXiv:2111.09832)",
            {"eps": 1e-8},
            needs_base=False,
            needs="fisher",
            call=lambda fn: _stats(fn, weighted=True),
        ),
        _k(
            "regmean",
            regmean,
            "Jin et al. 2023, Dataless knowledge fusion by merging weights "
            "of language models (arXiv:2212.09849)",
            {"alpha": 0.9},
            needs_base=False,
            needs="gram",
            call=lambda fn: _stats(fn, weighted=False),
        ),
    ]
}


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; an unknown name lists the valid ones."""
    if name not in KERNELS:
        raise MethodError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(KERNELS))}"
        )
    return KERNELS[name]


def check_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` completed with the kernel's defaults; an unknown parameter is an error that
    lists the kernel's parameters."""
    kernel = get_kernel(name)
    params = dict(params or {})
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    unknown = sorted(set(params) - set(kernel.defaults))
    if unknown:
        valid = ", ".join(p.rstrip("_") for p in kernel.defaults) or "none"
        raise MethodError(
            f"merge method {name!r} has no parameter {unknown[0].rstrip('_')!r}; "
            f"its parameters are: {valid}"
        )
    out = {**kernel.defaults, **params}
    for key, value in out.items():
        _check_param(name, key, kernel.defaults[key], value)
    return out


# (low, high, low inclusive, high inclusive) of the parameters with a range
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "density": (0.0, 1.0, False, True),
    "gamma": (0.0, 1.0, True, False),
    "alpha": (0.0, 1.0, True, True),
    "eps": (0.0, math.inf, True, False),
}
_PER_MODEL = ("density", "gamma")  # a number, or a list of one per model


def _check_param(method: str, key: str, default: Any, value: Any) -> None:
    """``value`` of parameter ``key`` is of its default's kind (a bool, an integer seed, a
    finite number, or for per-model parameters a list of them) and in its range."""
    shown = key.rstrip("_")
    where = f"merge method {method!r}: {shown}"
    if key == "consensus":
        if value not in (None, "sum", "count"):
            raise MethodError(f"{where} must be 'sum', 'count' or null, got {value!r}")
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise MethodError(f"{where} must be true or false, got {value!r}")
        return
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise MethodError(f"{where} must be an integer, got {value!r}")
        return
    values = value if key in _PER_MODEL and isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise MethodError(f"{where} must be a finite number, got {v!r}")
        if key in _RANGES:
            low, high, low_in, high_in = _RANGES[key]
            v = float(v)
            if not ((low <= v if low_in else low < v) and (v <= high if high_in else v < high)):
                interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise MethodError(f"{where} must be in {interval}, got {v:g}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _copy_shared(
    key: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> torch.Tensor:
    """An integer or bool tensor is not averaged: every model (and the base) must hold the same
    values, which are returned (the base's, or the first model's)."""
    inputs = [("the base", base)] if base is not None else []
    inputs += [(f"model {i}", t) for i, t in enumerate(tensors)]
    (ref_what, ref), *rest = inputs
    for what, t in rest:
        if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
            kind = (
                f"is {_dtype_name(t.dtype)} in {what} and {_dtype_name(ref.dtype)} in {ref_what}"
                if t.dtype != ref.dtype
                else f"is {_dtype_name(t.dtype)} and differs between {ref_what} and {what}"
            )
            raise MethodError(
                f"tensor {key!r} {kind}: integer and bool tensors are not merged "
                "arithmetically, only copied when every model holds the same values"
            )
    return ref.clone()


def merge_tensor(
    name: str,
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    key: str = "",
    extra: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor with the kernel registered as ``name``.

    ``key`` (the tensor's name) seeds DARE and is named in every error; ``extra`` holds the
    per-model Fisher diagonals or Gram matrices that ``fisher`` and ``regmean`` need. The
    result has the dtype of the base (or of the first model), or ``out_dtype`` for a
    floating-point one; a value it cannot hold is an error. Integer and bool tensors are copied
    when every input holds the same values, and an error otherwise."""
    kernel = get_kernel(name)
    p = check_params(name, params)
    if kernel.needs_base and base is None:
        raise MethodError(f"merge method {name!r} needs the common base model's tensors")
    if kernel.needs != "none" and extra is None:
        raise MethodError(
            f"merge method {name!r} needs data: the models' "
            f"{'Fisher information' if kernel.needs == 'fisher' else 'input Gram matrices'}"
        )
    inputs = [*tensors, *([] if base is None else [base])]
    try:
        if tensors and any(not t.is_floating_point() for t in inputs):
            merged = _copy_shared(key, tensors, base)
        else:
            merged = kernel.call(tensors, base, weights, p, key, extra)
        if out_dtype is None or not merged.is_floating_point():
            return merged
        return cast_finite(merged, out_dtype)
    except MethodError as exc:
        if not key or str(exc).startswith(f"tensor {key!r}"):
            raise
        raise MethodError(f"tensor {key!r}: {exc}") from exc
