"""The saved folder: ``netmeld.json`` + ``model.safetensors``, its format version, and the
aliases that keep folders saved by earlier releases loading after code moved.

Format versions: 1 (netmeld 0.1.0) named builders by their 0.1.0 import paths
(``netmeld.fusion:build``, ``netmeld.bridges:keras_classifier``); 2 names today's. Reading a
version-1 folder maps the old paths through :data:`BUILDER_ALIASES`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from netmeld.errors import (
    CheckpointError,
    DataError,
    ExportError,
    IncompatibleMembersError,
    LabelError,
    MemberError,
    ModelFileError,
    validation_problems,
)
from netmeld.io.checkpoint_merge import diff_tensors
from netmeld.io.recipe_file import StrictSpec
from netmeld.io.shards import CODES, CheckpointReader, TensorInfo
from netmeld.members.graph import CapturedBody, Group
from netmeld.members.member import MAX_INPUT_NUMBERS, Architecture, Member, Preprocessing
from netmeld.members.trust import reading_files
from netmeld.model.combined import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    CombinedModel,
    _unique_state,
)
from netmeld.model.heads import Extension, combiner_from_config

READABLE_VERSIONS = (1, FORMAT_VERSION)
# builder import paths of earlier releases -> where the builder lives now
BUILDER_ALIASES: dict[str, str] = {
    "netmeld.fusion:build": "netmeld.methods.fusion.parts:build",
    "netmeld.bridges:keras_classifier": "netmeld.members.bridges:keras_classifier",
    "netmeld.bridges:onnx_module": "netmeld.members.bridges:onnx_module",
}


def current_spec(spec: str) -> str:
    """Today's import path of a builder named ``spec`` by any release."""
    return BUILDER_ALIASES.get(spec, spec)


def load(path: str | Path, *, trust_code: bool = False) -> CombinedModel:
    """Rebuild a combined model saved with :meth:`CombinedModel.save` (no pickle involved).

    Only trusted architecture builders run (torchvision, timm, netmeld's own, those registered
    with :func:`netmeld.trust_builder`); a folder naming any other callable is refused unless
    ``trust_code=True`` (see :mod:`netmeld.members.trust`).
    """
    with reading_files(f"model folder {str(path)!r}", trust_code=trust_code):
        return _load(Path(path))


MAX_CONFIG_BYTES = 256 * 2**20  # a netmeld.json larger than this is refused unread


class _ArchitectureEntry(StrictSpec):
    spec: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class _MemberEntry(StrictSpec):
    name: str
    labels: list[str] = Field(min_length=1)
    architecture: _ArchitectureEntry
    preprocessing: dict[str, Any]
    head: str | None = None


class _GroupEntry(StrictSpec):
    members: list[str] = Field(min_length=1)
    cut: int | None = Field(default=None, ge=0)


class _UnionEntry(StrictSpec):
    router_dim: int | None = Field(default=None, gt=0)
    router_source: Literal["features", "input"] = "features"
    task_score: Literal["energy", "max-logit"] = "energy"
    scale: list[float] = Field(default_factory=list)
    offset: list[float] = Field(default_factory=list)


class _CombinerEntry(StrictSpec):
    kind: str
    config: dict[str, Any] = Field(default_factory=dict)


class SavedConfig(StrictSpec):
    """The schema of ``netmeld.json``: checked whole before anything is built."""

    format: Literal["netmeld"]
    format_version: int
    netmeld_version: str | None = None
    input_shape: list[int] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    label_members: dict[str, list[str]] = Field(default_factory=dict)
    members: list[_MemberEntry] = Field(min_length=1)
    plan: list[_GroupEntry]
    feature_names: list[str] | None = None
    union: _UnionEntry = Field(default_factory=_UnionEntry)
    combiner: _CombinerEntry | None = None
    extension: dict[str, Any] | None = None
    method: dict[str, Any] = Field(default_factory=dict)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def read_config(config_path: Path) -> SavedConfig:
    """``netmeld.json`` parsed and checked against :class:`SavedConfig`; every problem a
    :class:`ModelFileError` naming the file and the key."""
    where = repr(str(config_path))
    if not config_path.is_file():
        raise ModelFileError(
            f"{str(config_path.parent)!r} is not a netmeld model folder (no {CONFIG_FILE})"
        )
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelFileError(
            f"{where} is {size:,} bytes; a netmeld.json is at most {MAX_CONFIG_BYTES:,}"
        )
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{where} is not UTF-8 text: {exc}") from exc
    except RecursionError as exc:
        raise ModelFileError(f"{where} is nested too deeply to be a netmeld.json") from exc
    except ValueError as exc:  # JSONDecodeError and the refused constants
        raise ModelFileError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelFileError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != "netmeld" or raw.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{where}: format {raw.get('format')!r} version "
            f"{raw.get('format_version')!r}, expected netmeld version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        config = SavedConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelFileError(f"{where}: {validation_problems(exc)}") from exc
    if any(n <= 0 for n in config.input_shape) or math.prod(config.input_shape) > MAX_INPUT_NUMBERS:
        raise ModelFileError(
            f"{where}: input_shape {config.input_shape}: expected positive sizes, at most "
            f"{MAX_INPUT_NUMBERS:,} numbers per input"
        )
    names = [m.name for m in config.members]
    if len(set(names)) != len(names):
        raise ModelFileError(f"{where}: two members are named alike in {names}")
    for i, group in enumerate(config.plan):
        unknown = sorted(set(group.members) - set(names))
        if unknown:
            raise ModelFileError(f"{where}: plan[{i}] names unknown members {unknown}")
    return config


def _tensor_headers(weights_path: Path) -> dict[str, TensorInfo]:
    """The tensors of the weights file, from its header only, checked as every checkpoint is
    (:class:`~netmeld.io.shards.CheckpointReader`: offsets, sizes, dtypes)."""
    if not weights_path.is_file():
        raise ModelFileError(f"{str(weights_path.parent)!r}: {WEIGHTS_FILE} is missing")
    try:
        return CheckpointReader(weights_path).tensors
    except CheckpointError as exc:
        raise ModelFileError(str(exc)) from exc


def _bounded(value: Any, limit: int, where: str) -> None:
    """Every integer in ``value`` (a saved setting that sizes a layer) is at most ``limit``:
    the file's tensors hold that many numbers, and no layer can be wider than all of them."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if value > limit:
            raise ModelFileError(
                f"{where}: size {value:,} is larger than all the saved tensors together "
                f"({limit:,} numbers); refusing to allocate it"
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _bounded(v, limit, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _bounded(v, limit, f"{where}[{i}]")


def _build_member(spec: _MemberEntry, numbers: int, where: str) -> Member:
    """A member rebuilt from its entry; its architecture is first built on the ``meta`` device
    (no memory) and refused when it needs more numbers than the file holds."""
    try:
        arch = Architecture(current_spec(spec.architecture.spec), spec.architecture.kwargs)
        try:
            preprocessing = Preprocessing.from_dict(spec.preprocessing)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"bad preprocessing {spec.preprocessing}: {exc}") from exc
        module = arch.build_within(len(spec.labels), numbers)
        return Member(
            module,
            spec.labels,
            name=spec.name,
            preprocessing=preprocessing,
            architecture=arch,
            head=spec.head,
        )
    except (MemberError, ModelFileError) as exc:
        raise ModelFileError(f"{where}: member {spec.name!r}: {exc}") from exc


def _load(path: Path) -> CombinedModel:
    from safetensors.torch import load_file

    config_path = path / CONFIG_FILE
    config = read_config(config_path)
    where = repr(str(config_path))
    weights_path = path / WEIGHTS_FILE
    headers = _tensor_headers(weights_path)
    numbers = sum(math.prod(info.shape) for info in headers.values())
    for key in ("combiner", "extension"):
        _bounded(getattr(config, key) and config.model_dump()[key], numbers, f"{where}: {key}")
    _bounded(config.union.router_dim, numbers, f"{where}: union.router_dim")
    members = [_build_member(spec, numbers, where) for spec in config.members]
    plan = [Group(tuple(g.members), g.cut) for g in config.plan]
    try:
        model = CombinedModel(
            members, input_shape=config.input_shape, plan=plan, feature_names=config.feature_names
        )
    except (MemberError, DataError, IncompatibleMembersError, LabelError) as exc:
        raise ModelFileError(f"{where}: {exc}") from exc
    if config.union.router_dim is not None:
        model.union.add_router(config.union.router_dim, config.union.router_source)
    model.union.task_score = config.union.task_score
    if config.combiner is not None:
        model.set_combiner(
            combiner_from_config(
                config.combiner.kind,
                config.combiner.config,
                [m.labels for m in members],
                model.union_labels,
            )
        )
    if config.extension is not None:
        try:
            extension = Extension(**config.extension)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{where}: bad extension settings: {exc}") from exc
        model.set_extension(extension)
    _check_tensors(weights_path, headers, _unique_state(model))
    tensors = load_file(str(weights_path))
    expected = _unique_state(model)
    for key, value in tensors.items():
        _check_values(weights_path, key, value)
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])
    model.method = dict(config.method)
    _restore_members(model)
    return model.eval()


@torch.no_grad()
def _restore_members(model: CombinedModel) -> None:
    """Give each member's own module its saved body. The folder holds a shared trunk once, in
    the combined model's parts; a member rebuilt from its architecture has fresh weights where
    it does not share them with those parts (all of its body, for members after the first of
    a group), and what reads ``model.members`` (a student started from a member's body, the
    statistics of a member's features) must see the trained ones. The members' own heads are
    not in the folder (the model's heads are what the method fitted); theirs stay as built."""
    for member in model.members:
        name = member.name
        trunk = model.trunks[str(model.group_of[name])]
        prefix = "model." if isinstance(trunk, CapturedBody) else ""  # it wraps the module
        parts = {
            **{k.removeprefix(prefix): v for k, v in trunk.state_dict().items()},
            **model.necks[name].state_dict(),
        }
        head = model.head_names[name] + "."
        for key, target in member.module.state_dict().items():
            source = parts.get(key)
            if not key.startswith(head) and source is not None and source.shape == target.shape:
                target.copy_(source)


def _check_tensors(
    weights_path: Path, headers: dict[str, TensorInfo], expected: dict[str, torch.Tensor]
) -> None:
    """The file holds exactly the model's tensors, each of its shape and dtype."""
    where = repr(str(weights_path))
    diff = diff_tensors(
        {k: v.shape for k, v in expected.items()}, {k: i.shape for k, i in headers.items()}
    )
    if diff.missing:
        raise ModelFileError(f"{where}: tensor {diff.missing[0]!r} is missing")
    if diff.reshaped:
        key = diff.reshaped[0]
        raise ModelFileError(
            f"{where}: tensor {key!r} has shape {tuple(headers[key].shape)}, expected "
            f"{tuple(expected[key].shape)}"
        )
    if diff.extra:
        raise ModelFileError(f"{where}: unexpected tensor {sorted(diff.extra)[0]!r}")
    for key, value in expected.items():
        if headers[key].dtype != value.dtype:
            raise ModelFileError(
                f"{where}: tensor {key!r} is {CODES.get(headers[key].dtype)}, expected "
                f"{CODES.get(value.dtype)}"
            )


def _check_values(weights_path: Path, key: str, value: torch.Tensor) -> None:
    """Saved numbers are finite, and BatchNorm variances are not negative."""
    if value.is_floating_point() and not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise ModelFileError(
            f"{str(weights_path)!r}: tensor {key!r} holds {bad} non-finite values (NaN or Inf)"
        )
    if key.endswith("running_var") and (value < 0).any():
        raise ModelFileError(f"{str(weights_path)!r}: tensor {key!r} has negative variances")


def export(
    model: CombinedModel, path: str | Path, *, format: str = "onnx", **options: Any
) -> float | None:
    """Write ``model`` in a standard format anyone can open without netmeld (``netmeld
    export``). ``onnx``: opset 17, dynamic batch, checked against PyTorch with onnxruntime;
    ``options`` are :func:`netmeld.members.bridges.export_onnx`'s (``opset``, ``overwrite``,
    ``check``, ``atol``). ``transformers``, ``torchvision``, ``timm``: a plain checkpoint folder
    of the members' shared trunk and one linear head over the union, when the model is that
    (see :mod:`netmeld.model.export`; ``options``: ``overwrite``). Returns the largest
    difference found by the check."""
    from netmeld.model.export import FORMATS, export_model

    if format not in FORMATS:
        raise ExportError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    if format != "onnx":
        return export_model(model, path, format, **options)
    from netmeld.members.bridges import export_onnx

    return export_onnx(model, path, **options)
