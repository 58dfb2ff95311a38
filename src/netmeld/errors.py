"""The exceptions netmeld raises for bad input.

Every error names the thing at fault (file, member, tensor, label) and what was expected.
All derive from :class:`NetmeldError`; most also derive from ``ValueError`` or ``TypeError``
so that callers catching the built-in types keep working.
"""

from __future__ import annotations


class NetmeldError(Exception):
    """Base class of every error netmeld raises on purpose."""


class MemberError(NetmeldError, ValueError):
    """A member is malformed: labels, preprocessing, architecture or name."""


class CheckpointError(NetmeldError, ValueError):
    """A checkpoint cannot be read, or its tensors do not fit the architecture."""


class LabelError(NetmeldError, ValueError):
    """A label name is unknown to the model or members."""


class IncompatibleMembersError(NetmeldError, ValueError):
    """Members cannot be combined as asked (input shapes, duplicate names, ...)."""


class DataError(NetmeldError, ValueError):
    """Data is empty, unreadable or of the wrong shape."""


class MethodError(NetmeldError, ValueError):
    """An unknown method, a bad parameter, or data of the wrong kind for a method."""


class ModelFileError(NetmeldError, ValueError):
    """A saved combined model is missing, malformed, or would be overwritten."""


class RecipeError(NetmeldError, ValueError):
    """A YAML recipe is malformed."""


class ExportError(NetmeldError, ValueError):
    """A combined model cannot be written in the format asked for (it says why)."""


class UntrustedCodeError(NetmeldError, PermissionError):
    """A saved folder or a recipe names a builder netmeld does not trust to run."""


def validation_problems(exc: Exception) -> str:
    """A pydantic ``ValidationError`` as one line: ``field.path: message; ...``."""
    errors = exc.errors()  # type: ignore[attr-defined]
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in errors
    )


class UnderdeterminedFitWarning(UserWarning):
    """A fit has fewer examples than parameters and nothing else pins the solution down."""
