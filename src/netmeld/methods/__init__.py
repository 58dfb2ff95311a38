"""Combination methods, registered by name. Each family lives in its own module."""

# registers the methods, in the order `netmeld methods` lists them
from netmeld.methods import union, semi  # noqa: F401, I001
from netmeld.methods import ensemble, fusion, statistics, transfer  # noqa: F401
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
