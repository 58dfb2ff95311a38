"""Out-of-core weight merging of checkpoints: ``netmeld merge-weights RECIPE.yaml -o OUT``.

The recipe is close to mergekit's::

    merge_method: ties
    base_model: ./base              # needed by the task-vector methods
    models:
      - model: ./math
        parameters: {weight: 0.6, density: 0.5}
      - model: ./code
        parameters: {weight: 0.4, density: [{filter: "mlp", value: 0.3}, {value: 0.5}]}
    parameters: {normalize: true}
    dtype: float32                  # the dtype the kernels compute in
    out_dtype: bfloat16             # default: dtype
    shard_size: 2GB

A parameter is a number, or a list of ``{filter, value}`` entries: the first entry whose
``filter`` is a substring of the tensor's name applies, and an entry without a filter is the
default. Per-model parameters are ``weight`` and the kernel's per-model ones (``density``,
``gamma``); the others are global. Tensors are read, merged and written one at a time, so
memory holds a few tensors whatever the model's size; the same kernel code runs in
:func:`merge_state_dicts` for models already in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from netmeld._progress import track
from netmeld.errors import IncompatibleMembersError, MethodError, RecipeError
from netmeld.io.recipe_file import StrictSpec, read_yaml
from netmeld.io.shards import CheckpointReader, ShardedWriter, parse_size
from netmeld.ops.merge import KERNELS, check_params, get_kernel, merge_tensor
from netmeld.runtime import resolve_device

PER_MODEL = ("weight", "density", "gamma")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class FilterValue(StrictSpec):
    """One entry of a parameter given per tensor: the first entry whose ``filter`` is in the
    tensor's name applies; an entry without a filter is the default."""

    filter: str | None = Field(
        default=None, description="applies to tensors whose name contains this; null: the default"
    )
    value: float | int | bool | str | None = Field(description="the parameter's value there")


ParamValue = float | int | bool | str | None | list[FilterValue]


class ModelEntry(StrictSpec):
    """One model of a ``merge-weights`` recipe."""

    model: str = Field(
        description="a safetensors file, or a folder of shards with an HF-style index; relative "
        "to the recipe"
    )
    parameters: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="this model's parameters: a value, or a list of *parameter value entry* "
        "(per tensor)",
    )

    @field_validator("parameters")
    @classmethod
    def _per_model_only(cls, value: dict[str, ParamValue]) -> dict[str, ParamValue]:
        bad = [k for k in value if k not in PER_MODEL]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not a per-model parameter (per-model: {', '.join(PER_MODEL)}); "
                "put global ones under the recipe's parameters"
            )
        return value


class MergeRecipe(StrictSpec):
    """A validated ``merge-weights`` recipe."""

    merge_method: str = Field(description="the merging kernel")
    models: list[ModelEntry] = Field(description="the checkpoints to merge (at least one)")
    base_model: str | None = Field(
        default=None,
        description="the checkpoint the models were fine-tuned from (needed by the task-vector "
        "kernels), as a model's `model`",
    )
    parameters: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="the kernel's global parameters (`normalize`, `lambda`, `t`, ...: `netmeld "
        "methods` lists them): a value, or a list of *parameter value entry* (per tensor)",
    )
    dtype: str | None = Field(
        default=None,
        description="the dtype the kernel computes in; null: the inputs' own (they must agree)",
    )
    out_dtype: str | None = Field(
        default=None, description="the dtype of the merged floating-point tensors; null: `dtype`"
    )
    shard_size: str | int = Field(
        default="5GB",
        description="the largest output shard: bytes, or a size such as `500MB`, `2GB`",
    )

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        value = value.replace("_", "-")
        if value not in KERNELS:
            raise ValueError(
                f"unknown merge method {value!r}; valid methods: {', '.join(sorted(KERNELS))}"
            )
        kernel = KERNELS[value]
        if kernel.needs != "none":
            raise ValueError(
                f"merge method {value!r} needs data ({kernel.needs}); use netmeld.merge_members "
                "from Python with data="
            )
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in _DTYPES:
            raise ValueError(f"dtype {value!r}: expected one of {', '.join(_DTYPES)}")
        return value

    @field_validator("models")
    @classmethod
    def _some_models(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        if not value:
            raise ValueError("list at least one model")
        return value


def read_merge_recipe(path: str | Path) -> tuple[MergeRecipe, Path]:
    """Read and validate a recipe; paths in it are relative to its folder."""
    recipe, folder = read_yaml(path, MergeRecipe, "'merge_method' and 'models'")
    _check_recipe_params(recipe, str(path))
    return recipe, folder


def _check_recipe_params(recipe: MergeRecipe, where: str) -> None:
    kernel = get_kernel(recipe.merge_method)
    if kernel.needs_base and recipe.base_model is None:
        raise RecipeError(f"recipe {where!r}: merge method {kernel.name!r} needs base_model")
    probe = {k: _resolve(v, "") for k, v in recipe.parameters.items()}
    for i, entry in enumerate(recipe.models):
        weight = entry.parameters.get("weight", 1.0)
        values = [e.value for e in weight] if isinstance(weight, list) else [weight]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(
                    f"recipe {where!r}: models[{i}] ({entry.model!r}): weight {value!r} is not a "
                    "number"
                )
            if not math.isfinite(value):
                raise RecipeError(
                    f"recipe {where!r}: models[{i}] ({entry.model!r}): weight {value!r} is not "
                    "finite"
                )
    for entry in recipe.models:
        for k, v in entry.parameters.items():
            if k != "weight":
                probe[k] = _resolve(v, "")
    try:
        check_params(kernel.name, {k: v for k, v in probe.items() if v is not None})
    except MethodError as exc:
        raise RecipeError(f"recipe {where!r}: {exc}") from exc


def _resolve(value: ParamValue, name: str) -> Any:
    if not isinstance(value, list):
        return value
    default = None
    for entry in value:
        if entry.filter is None:
            if default is None:
                default = entry
        elif entry.filter in name:
            return entry.value
    return None if default is None else default.value


def _params_for(recipe: MergeRecipe, name: str) -> tuple[list[float], dict[str, Any]]:
    weights = []
    per_model: dict[str, list[Any]] = {}
    for entry in recipe.models:
        w = _resolve(entry.parameters.get("weight", 1.0), name)
        weights.append(1.0 if w is None else float(w))
        for key in PER_MODEL[1:]:
            if key in entry.parameters:
                per_model.setdefault(key, []).append(_resolve(entry.parameters[key], name))
    params = {k: _resolve(v, name) for k, v in recipe.parameters.items()}
    for key, values in per_model.items():
        if len(values) != len(recipe.models):
            raise RecipeError(f"parameter {key!r} is set for some models but not all")
        params[key] = values if len(set(values)) > 1 else values[0]
    params = {k: v for k, v in params.items() if v is not None}
    return weights, params


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


@dataclass(frozen=True)
class TensorDiff:
    """How tensors ``got`` differ from the ``expected`` ones (both ``{name: shape}``): the
    one check behind :func:`check_same_tensors` and :func:`netmeld.members.load_into`, each
    wording its own error."""

    unmatched: list[str]  # expected tensors missing from got or of another shape, in order
    missing: list[str]  # expected tensors not in got, in expected's order
    reshaped: list[str]  # tensors of both with other shapes, in expected's order
    extra: list[str]  # tensors of got not expected, in got's order


def diff_tensors(
    expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]
) -> TensorDiff:
    """What :class:`TensorDiff` says of ``got`` against ``expected``."""
    missing = [k for k in expected if k not in got]
    reshaped = [k for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    odd = set(missing) | set(reshaped)
    return TensorDiff(
        unmatched=[k for k in expected if k in odd],
        missing=missing,
        reshaped=reshaped,
        extra=[k for k in got if k not in expected],
    )


def check_same_tensors(sources: Sequence[tuple[str, Mapping[str, Sequence[int]]]]) -> list[str]:
    """The tensor names every source has, in the first's order. ``sources`` are ``(what,
    {name: shape})``; a tensor missing from one, or of another shape, is an error naming the
    tensor, both sources and both shapes (the first mismatch in the first source's order)."""
    (first_what, first), *rest = sources
    for what, shapes in rest:
        diff = diff_tensors(first, shapes)
        if diff.unmatched:
            key = diff.unmatched[0]
            if key not in shapes:
                raise IncompatibleMembersError(
                    f"tensor {key!r} is in {first_what} but not in {what}"
                )
            raise IncompatibleMembersError(
                f"tensor {key!r} has shape {tuple(first[key])} in {first_what} and "
                f"{tuple(shapes[key])} in {what}"
            )
        if diff.extra:
            raise IncompatibleMembersError(
                f"tensor {diff.extra[0]!r} is in {what} but not in {first_what}"
            )
    return list(first)


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a state dict, for :func:`check_same_tensors`."""
    return {k: tuple(v.shape) for k, v in state.items()}


def merge_weights(
    recipe: MergeRecipe | str | Path,
    out: str | Path,
    *,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = "cpu",
    progress: bool | None = None,
) -> Path:
    """Merge the recipe's checkpoints into ``out`` tensor by tensor (see the module doc); the
    Python side of ``netmeld merge-weights``. Returns the folder written.

    ``device`` is where the kernels run (like mergekit's ``--cuda``): ``cpu`` (the default),
    ``auto`` (the GPU when torch sees one), ``cuda`` or ``cuda:N``. Each floating-point
    tensor's inputs are moved there, merged there, and the result comes back to the CPU to be
    written, one tensor at a time. A GPU asked for on a machine without one is a
    :class:`~netmeld.errors.DataError`, before anything is read or written."""
    dev = resolve_device(device)
    if not isinstance(recipe, MergeRecipe):
        recipe, base_dir = read_merge_recipe(recipe)
    root = Path(base_dir or ".")

    def where(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else root / q

    models = [(e.model, CheckpointReader(where(e.model))) for e in recipe.models]
    base = (
        None
        if recipe.base_model is None
        else (recipe.base_model, CheckpointReader(where(recipe.base_model)))
    )
    names = check_same_tensors([(repr(n), r.shapes) for n, r in ([base] if base else []) + models])
    kernel = get_kernel(recipe.merge_method)
    dtype = None if recipe.dtype is None else _DTYPES[recipe.dtype]
    if dtype is None:
        sources = ([base] if base else []) + models
        for name in names:
            kinds = {r.tensors[name].dtype for _, r in sources}
            if len(kinds) > 1:
                found = ", ".join(f"{r.tensors[name].dtype!s} in {n!r}" for n, r in sources)
                raise RecipeError(
                    f"tensor {name!r} has different dtypes ({found}); set 'dtype:' in the "
                    "recipe to merge in one"
                )
    out_dtype = _DTYPES[recipe.out_dtype] if recipe.out_dtype else dtype
    first = (base or models[0])[1]
    layout = []
    for name in names:
        info = first.tensors[name]
        target = info.dtype
        if out_dtype is not None and info.dtype.is_floating_point:
            target = out_dtype
        layout.append((name, target, info.shape))
    writer = ShardedWriter(
        out,
        layout,
        shard_size=parse_size(recipe.shard_size),
        overwrite=overwrite,
        metadata={"netmeld_merge_method": kernel.name},
    )
    with writer:
        for name in track(writer.order, f"merging ({kernel.name})", enabled=progress):
            tensors = [_cast(r.get(name), dtype) for _, r in models]
            base_t = None if base is None else _cast(base[1].get(name), dtype)
            target = writer.dtype_of(name)
            if not tensors[0].is_floating_point():
                merged = base_t if base_t is not None else tensors[0]
            else:
                weights, params = _params_for(recipe, name)
                merged = merge_tensor(
                    kernel.name,
                    [t.to(dev) for t in tensors],
                    base=None if base_t is None else base_t.to(dev),
                    weights=weights,
                    params=params,
                    key=name,
                    out_dtype=target,
                ).cpu()
            writer.write(name, merged.to(target))
            del tensors, base_t, merged
    return Path(out)


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    extra: Mapping[str, Sequence[torch.Tensor]] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory with the same kernels; ``names`` limits which tensors are
    merged (the others are the base's, or the first model's). ``extra`` maps a tensor name to
    the per-model Fisher diagonals or Gram matrices that ``fisher``/``regmean`` need."""
    sources = [("the base model", shapes_of(base))] if base is not None else []
    sources += [(f"model {i}", shapes_of(m)) for i, m in enumerate(models)]
    check_same_tensors(sources)
    chosen = set(names) if names is not None else None
    out = {}
    reference = base if base is not None else models[0]
    for key, ref in reference.items():
        if (chosen is not None and key not in chosen) or not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        kernel = get_kernel(method)
        out[key] = merge_tensor(
            kernel.name,
            [m[key] for m in models],
            base=None if base is None else base[key],
            weights=weights,
            params=params,
            key=key,
            extra=None if extra is None else extra.get(key),
        )
    return out


def __getattr__(name: str) -> Any:
    if name == "merge_checkpoints":  # 0.1.0's name; the CLI verb is ``merge-weights``
        import warnings

        warnings.warn(
            "merge_checkpoints is now netmeld.merge_weights (the CLI's verb: netmeld "
            "merge-weights); the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return merge_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
