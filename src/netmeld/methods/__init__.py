"""Combination methods, registered by name. Each family lives in its own module."""

from netmeld.methods import ensemble, transfer, union  # noqa: F401  (registers the methods)
from netmeld.methods._registry import (
    MethodInfo,
    MethodParams,
    get_method,
    list_methods,
    method_infos,
    register_method,
)

__all__ = [
    "MethodInfo",
    "MethodParams",
    "get_method",
    "list_methods",
    "method_infos",
    "register_method",
]
