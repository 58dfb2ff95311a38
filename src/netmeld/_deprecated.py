"""Import paths of netmeld 0.1.0 that moved when the package was layered.

``import netmeld.combined`` (and the other old paths below) keeps working for one release with a
``DeprecationWarning`` naming the new place. Old names that are also functions of the package
(``netmeld.meld``, ``netmeld.distill``, ``netmeld.extend``) are not aliased as modules: importing
a module of that name would replace the function on the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "netmeld.graph": ("netmeld.members.graph",),
    "netmeld.combined": ("netmeld.model.combined", "netmeld.model.artifact"),
    "netmeld.combiners": ("netmeld.model.heads",),
    "netmeld.shards": ("netmeld.io.shards",),
    "netmeld.bridges": ("netmeld.members.bridges",),
    "netmeld.permutation": ("netmeld.methods.permutation",),
    "netmeld.recipe": ("netmeld.cli.recipes",),
    "netmeld.scenarios": ("netmeld.demo.scenarios",),
    "netmeld.methods.weights": ("netmeld.methods.merge",),
}


# old module paths that are now also a function of the package (netmeld.merge_weights): served
# from sys.modules without replacing the function, warning when a name is taken from them
SHADOWED: dict[str, tuple[str, ...]] = {
    "netmeld.merge_weights": ("netmeld.io.checkpoint_merge", "netmeld.cli.recipes"),
}


# names of netmeld 0.1.0 that were renamed -> where the thing lives now (from the package)
RENAMED: dict[str, str] = {
    "fit": "train",
    "parallel": "fusion.parallel",
    "hierarchical": "fusion.hierarchical",
    "multitask": "fusion.multitask",
    "keras_member": "Member.from_keras",
    "keras_members": "Member.from_keras_outputs",
    "onnx_member": "Member.from_onnx",
    "export_onnx": "export",
}


def renamed(name: str) -> Any:
    """The object a renamed 0.1.0 name now stands for, with a ``DeprecationWarning``."""
    if name not in RENAMED:
        raise AttributeError(f"module 'netmeld' has no attribute {name!r}")
    new = RENAMED[name]
    warnings.warn(
        f"netmeld.{name} is now netmeld.{new}; the old name will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    obj: Any = importlib.import_module("netmeld")
    for part in new.split("."):
        obj = getattr(obj, part)
    return obj


class _Moved(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...], *, warn: bool = False) -> None:
        super().__init__(name, f"moved to {', '.join(targets)}")
        self._targets = targets
        self._warn = warn

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._warn:
            warnings.warn(
                f"{self.__name__} moved to {' and '.join(self._targets)}; the old import path "
                "will be removed in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        if attr in RENAMED:
            return renamed(attr)
        raise AttributeError(
            f"module {self.__name__!r} (moved to {self._targets[0]}) has no {attr!r}"
        )


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(targets)}; the old import path will be removed "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return _Moved(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Serve the old import paths (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
    for name, targets in SHADOWED.items():
        sys.modules.setdefault(name, _Moved(name, targets, warn=True))
