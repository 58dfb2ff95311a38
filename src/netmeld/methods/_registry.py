"""The registry of combination methods, looked up by name."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from netmeld.errors import MethodError

if TYPE_CHECKING:
    from netmeld.methods._extract import Extracted
    from netmeld.model.combined import CombinedModel

DataNeed = Literal["none", "statistics", "unlabeled", "labeled"]
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class MethodParams(BaseModel):
    """Base of every method's parameters: frozen, and unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


FitFn = Callable[["CombinedModel", "Extracted | None", "torch.Tensor | None", Any], None]


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, the data it needs, its parameters and its fit function."""

    name: str
    data: DataNeed
    summary: str
    reference: str
    params: type[MethodParams]
    fit: FitFn
    open_labels: bool = False  # the data's labels may include labels no member knows
    unlabeled: bool = False  # a labeled method that also reads unlabeled inputs (semi-supervised)

    def validate_params(self, params: dict[str, Any] | None) -> MethodParams:
        try:
            return self.params.model_validate(params or {})
        except ValidationError as exc:
            fields = ", ".join(self.params.model_fields) or "none"
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                for e in exc.errors()
            )
            raise MethodError(
                f"method {self.name!r}: bad parameters ({problems}); its parameters are: {fields}"
            ) from exc


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    data: DataNeed,
    params: type[MethodParams] = MethodParams,
    reference: str = "",
    open_labels: bool = False,
    unlabeled: bool = False,
) -> Callable[[FitFn], FitFn]:
    """Register ``fit(model, extracted, targets, params)`` under ``name``.

    A clash with a registered name or a malformed name (lowercase words joined by ``-``) is an
    error. The function's docstring's first line is the method's summary. With
    ``open_labels`` the labeled data may hold labels no member knows; the fit then reads the
    label space from ``extracted.label_space``. With ``unlabeled`` (a labeled method only) the
    method also reads unlabeled inputs, given to :func:`~netmeld.meld` as ``unlabeled=``; their
    head inputs are ``extracted.unlabeled``.
    """
    if not _NAME.match(name):
        raise MethodError(f"method name {name!r}: use lowercase words joined by '-'")
    if data not in ("none", "statistics", "unlabeled", "labeled"):
        raise MethodError(
            f"method {name!r}: data must be 'none', 'statistics', 'unlabeled' or 'labeled'"
        )
    if unlabeled and data != "labeled":
        raise MethodError(f"method {name!r}: only a labeled method can also read unlabeled data")

    def decorate(fn: FitFn) -> FitFn:
        if name in _REGISTRY:
            raise MethodError(f"method {name!r} is registered already")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        _REGISTRY[name] = MethodInfo(
            name, data, summary, reference, params, fn, open_labels, unlabeled
        )
        return fn

    return decorate


def get_method(name: str) -> MethodInfo:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(
            f"unknown method {name!r}; valid methods: {', '.join(list_methods())}"
        ) from None


def list_methods(data: DataNeed | None = None) -> list[str]:
    """Names of the registered methods, optionally only those needing ``data``."""
    return [n for n, info in _REGISTRY.items() if data is None or info.data == data]


def method_infos() -> list[MethodInfo]:
    return list(_REGISTRY.values())
