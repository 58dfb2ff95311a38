"""Reading a YAML recipe file: parsed with ``yaml.safe_load`` (no tags, no objects), checked
as a pydantic schema, every problem a :class:`~netmeld.errors.RecipeError` naming the file.
Shared by the CLI's recipes and the ``merge-weights`` recipe."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from netmeld.errors import MethodError, RecipeError, validation_problems

Spec = TypeVar("Spec", bound=BaseModel)


class StrictSpec(BaseModel):
    """The base of every file schema: an unknown key is an error (a typo never passes
    silently), and a parsed entry cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path, spec: type[Spec], expected: str) -> tuple[Spec, Path]:
    """Parse and validate a YAML recipe as ``spec``; returns it and the folder its paths are
    relative to. ``expected`` says what the top-level mapping holds (for the error when the
    file is not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping with {expected}")
    try:
        return spec.model_validate(raw), path.parent
    except MethodError as exc:
        raise RecipeError(f"recipe {str(path)!r}: {exc}") from exc
    except ValidationError as exc:
        raise RecipeError(f"recipe {str(path)!r}: {validation_problems(exc)}") from exc
