"""Which architecture builders a file may make netmeld run.

A saved folder or a recipe names each member's architecture as ``torchvision:NAME``,
``timm:NAME`` or ``package.module:callable`` plus keyword arguments. Building it imports that
module and calls that callable, so a file from someone else could name ``os:system``. While a
file is read (:func:`reading_files`), only these builders run:

- torchvision and timm models by their registered names;
- netmeld's own builders (:data:`NETMELD_BUILDERS`: the zoo, the Keras/ONNX wrappers, the fused
  networks, transformers' own classifier classes from a config that names no custom code);
- builders the user registered in their own process with :func:`trust_builder`.

Anything else is refused before its module is imported, unless the caller passed
``trust_code=True`` (``--trust-code`` in the CLI), as transformers' ``trust_remote_code``.
Python code that builds an :class:`~netmeld.members.member.Architecture` directly is the user's
own choice and is not restricted.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from netmeld.errors import UntrustedCodeError

NETMELD_BUILDERS: frozenset[str] = frozenset(
    {
        "netmeld.zoo:small_cnn",
        "netmeld.zoo:SmallCNN",
        "netmeld.zoo:mlp",
        "netmeld.zoo:MLP",
        "netmeld.zoo:vgg",
        "netmeld.zoo:VGG",
        "netmeld.zoo:resnet20",
        "netmeld.zoo:CifarResNet",
        "netmeld.members.bridges:keras_classifier",
        "netmeld.members.bridges:onnx_module",
        "netmeld.methods.fusion.parts:build",
        "netmeld.io.hf:hf_classifier",
    }
)
NAMED_SOURCES = ("torchvision", "timm")  # builders looked up in the library's own registry

_registered: set[str] = set()
_trust_all: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "netmeld_trust_code", default=False
)
_checking: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "netmeld_untrusted_source", default=None
)


def trust_builder(spec: str) -> None:
    """Let files read in this process build ``spec`` (``"package.module:callable"``)."""
    if ":" not in spec or not all(spec.split(":", 1)):
        raise UntrustedCodeError(f"trust_builder({spec!r}): expected 'package.module:callable'")
    _registered.add(spec)


def is_trusted(spec: str) -> bool:
    source = spec.split(":", 1)[0]
    return source in NAMED_SOURCES or spec in NETMELD_BUILDERS or spec in _registered


@contextlib.contextmanager
def reading_files(what: str, *, trust_code: bool = False) -> Iterator[None]:
    """While reading ``what`` (a folder, a recipe), refuse builders that are not trusted."""
    token = _checking.set(None if trust_code else what)
    try:
        yield
    finally:
        _checking.reset(token)


@contextlib.contextmanager
def trusting(trust: bool = True) -> Iterator[None]:
    """Within this block every file read may run the builders it names (``--trust-code``: the
    CLI wraps the whole command, so the folders and recipes it reads, however deep, are
    trusted)."""
    token = _trust_all.set(trust)
    try:
        yield
    finally:
        _trust_all.reset(token)


def check_builder(spec: str) -> None:
    """Raise :class:`UntrustedCodeError` if a file being read names an untrusted builder."""
    what = _checking.get()
    if what is None or _trust_all.get() or is_trusted(spec):
        return
    raise UntrustedCodeError(
        f"{what} names the architecture builder {spec!r}, which netmeld does not run from a "
        "file: building it would import and call arbitrary code. If you trust the file's "
        f"author, pass trust_code=True (CLI: --trust-code), or register it in your own code "
        f"with netmeld.trust_builder({spec!r})"
    )
