"""The recipe reference: every key of every recipe kind (meld, distill, train, merge-weights)
with its type, default and meaning, as markdown tables generated from the pydantic schemas
and from the registries that hold the choices validated in code (methods, merge kernels,
fusion kinds, fuse modes, weightings). The README's "Recipe reference" is this text;
``python -m netmeld.cli.recipes.reference`` prints it and ``--write README.md`` puts it
between the README's markers (``tests/test_readme.py`` fails when they differ)."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from netmeld.cli.recipes.meld import MemberSpec, MergeSpec, PreprocessingSpec, Recipe
from netmeld.cli.recipes.training import (
    DistillRecipe,
    DistillSchedule,
    PartSpec,
    StudentSpec,
    TrainRecipe,
    TrainSchedule,
)
from netmeld.io.checkpoint_merge import _DTYPES, PER_MODEL, FilterValue, MergeRecipe, ModelEntry

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"

# Each table: its title, the schema, and one line on where the entry is used.
TABLES: list[tuple[str, type[BaseModel], str]] = [
    ("meld recipe", Recipe, "`netmeld meld RECIPE.yaml -o OUT`, `netmeld inspect RECIPE.yaml`"),
    (
        "member entry",
        MemberSpec,
        "one of a meld recipe's `members:`, a distill recipe's `teachers:`, a part's `member:`",
    ),
    ("preprocessing entry", PreprocessingSpec, "a member's or a student's `preprocessing:`"),
    ("merge entry", MergeSpec, "a meld recipe's `merge:` (the bodies merged before `method`)"),
    ("distill recipe", DistillRecipe, "`netmeld distill RECIPE.yaml -o OUT`"),
    ("student entry", StudentSpec, "a distill recipe's `student:`"),
    ("distill schedule", DistillSchedule, "a distill recipe's `schedule:`"),
    ("train recipe", TrainRecipe, "`netmeld train RECIPE.yaml -o OUT`"),
    (
        "part entry",
        PartSpec,
        "one of a train recipe's `branches:`, its `first:`, `second:`, `trunk:`",
    ),
    ("train schedule", TrainSchedule, "a train recipe's `schedule:`"),
    ("merge-weights recipe", MergeRecipe, "`netmeld merge-weights RECIPE.yaml -o OUT`"),
    ("model entry", ModelEntry, "one of a merge-weights recipe's `models:`"),
    (
        "parameter value entry",
        FilterValue,
        "a merge-weights parameter given per tensor, as a list of these",
    ),
]


def _methods() -> list[str]:
    from netmeld.methods import list_methods

    return list_methods()


def _kernels() -> list[str]:
    from netmeld.ops.merge import KERNELS

    return [*KERNELS, "zipit"]


def _checkpoint_kernels() -> list[str]:
    from netmeld.ops.merge import KERNELS

    return [name for name, kernel in KERNELS.items() if kernel.needs == "none"]


def _fusion(name: str) -> Callable[[], Sequence[str]]:
    def choices() -> Sequence[str]:
        from netmeld.methods.fusion import parts

        return list(getattr(parts, name))

    return choices


def _synthesis() -> list[str]:
    from netmeld.methods.distill import synthesize

    return [
        f"{p.name}={p.default}"
        for p in inspect.signature(synthesize).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("seed", "progress")
    ]


# Choices validated in code rather than by the type, read from where the code keeps them.
CHOICES: dict[tuple[type[BaseModel], str], tuple[str, Callable[[], Sequence[str]]]] = {
    (Recipe, "method"): ("one of", _methods),
    (DistillRecipe, "union"): ("one of", _methods),
    (MergeSpec, "method"): ("one of", _kernels),
    (TrainRecipe, "build"): ("one of", _fusion("FUSION_KINDS")),
    (TrainRecipe, "fuse"): ("one of", _fusion("FUSIONS")),
    (TrainRecipe, "weighting"): ("one of", _fusion("WEIGHTINGS")),
    (MergeRecipe, "merge_method"): ("one of (`-` or `_`)", _checkpoint_kernels),
    (MergeRecipe, "dtype"): ("one of", lambda: list(_DTYPES)),
    (MergeRecipe, "out_dtype"): ("one of", lambda: list(_DTYPES)),
    (ModelEntry, "parameters"): ("keys", lambda: list(PER_MODEL)),
    (DistillRecipe, "synthesis"): ("keys (and defaults)", _synthesis),
}

_NAMES = {model: title for title, model, _ in TABLES}
_SCALARS = {str: "string", int: "int", float: "number", bool: "bool", type(None): "null"}


def _type(annotation: Any) -> str:
    """A field's type in words (no ``|``: it would split the table's cell)."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"*{_NAMES[annotation]}*"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [_type(a) for a in args if a is not type(None)]
        text = words[-1] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
        if type(None) in args:
            text += ", or null" if " or " in text else " or null"
        return text
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        inner = _type(args[0])
        return f"list of ({inner})" if " or " in inner else f"list of {inner}"
    if origin is dict:
        if args[1] is Any:
            return "mapping"
        inner = _type(args[1])
        return f"mapping of {_type(args[0])} to " + (f"({inner})" if " or " in inner else inner)
    raise TypeError(f"recipe reference: no words for the type {annotation!r}")


def _yaml(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return (
        str(yaml.safe_dump(value, default_flow_style=True, width=1000))
        .strip()
        .removesuffix("\n...")
    )


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "its defaults"
        return f"`{_yaml(value)}`"
    return f"`{_yaml(field.default)}`"


def _meaning(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"{model.__name__}.{name} has no Field(description=...)")
    text = " ".join(field.description.split())
    if (model, name) in CHOICES:
        what, choices = CHOICES[(model, name)]
        text += f"; {what}: " + ", ".join(f"`{c}`" for c in choices())
    return text.replace("|", "\\|")


def _table(title: str, model: type[BaseModel], where: str) -> str:
    rows = [
        f"**{title}** — {where}",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        key = field.alias or name
        rows.append(
            f"| `{key}` | {_type(field.annotation)} | {_default(field)} | "
            f"{_meaning(model, name, field)} |"
        )
    return "\n".join(rows)


def recipe_reference() -> str:
    """Every key of every recipe kind as markdown tables, one per schema, in ``TABLES``' order."""
    return "\n\n".join(_table(*entry) for entry in TABLES) + "\n"


def replace_section(text: str, reference: str | None = None) -> str:
    """``text`` (the README) with the part between the markers replaced by the reference."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    body = recipe_reference() if reference is None else reference
    return f"{head}{START}\n\n{body}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netmeld.cli.recipes.reference",
        description="Print the recipe reference, or write it between the markers of a file.",
    )
    parser.add_argument("--write", metavar="README.md", help="replace the section in this file")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(recipe_reference())
        return 0
    path = Path(args.write)
    path.write_text(replace_section(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
