"""The saved folder: ``netmeld.json`` + ``model.safetensors``, its format version, and the
aliases that keep folders saved by earlier releases loading after code moved.

Format versions: 1 (netmeld 0.1.0) named builders by their 0.1.0 import paths
(``netmeld.fusion:build``, ``netmeld.bridges:keras_classifier``); 2 names today's. Reading a
version-1 folder maps the old paths through :data:`BUILDER_ALIASES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from netmeld.errors import DataError, ModelFileError
from netmeld.members.graph import Group
from netmeld.members.member import Architecture, Member, Preprocessing
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


def _load(path: Path) -> CombinedModel:
    from safetensors.torch import load_file

    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFileError(f"{str(path)!r} is not a netmeld model folder (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{str(config_path)!r} is not valid JSON: {exc}") from exc
    if config.get("format") != "netmeld" or config.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{str(config_path)!r}: format {config.get('format')!r} version "
            f"{config.get('format_version')!r}, expected netmeld version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )
    members = []
    for spec in config["members"]:
        arch = Architecture(
            current_spec(spec["architecture"]["spec"]), spec["architecture"]["kwargs"]
        )
        module = arch.build(num_classes=len(spec["labels"]))
        members.append(
            Member(
                module,
                spec["labels"],
                name=spec["name"],
                preprocessing=Preprocessing.from_dict(spec["preprocessing"]),
                architecture=arch,
                head=spec["head"],
            )
        )
    plan = [Group(tuple(g["members"]), g["cut"]) for g in config["plan"]]
    model = CombinedModel(
        members,
        input_shape=config["input_shape"],
        plan=plan,
        feature_names=config.get("feature_names"),
    )
    if config["union"].get("router_dim") is not None:
        model.union.add_router(
            int(config["union"]["router_dim"]), config["union"].get("router_source", "features")
        )
    if config.get("combiner"):
        spec = config["combiner"]
        model.set_combiner(
            combiner_from_config(
                spec["kind"], spec["config"], [m.labels for m in members], model.union_labels
            )
        )
    if config.get("extension"):
        try:
            extension = Extension(**config["extension"])
        except TypeError as exc:
            raise ModelFileError(f"{str(config_path)!r}: bad extension settings: {exc}") from exc
        model.set_extension(extension)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"{str(path)!r}: {WEIGHTS_FILE} is missing")
    tensors = load_file(str(weights_path))
    expected = _unique_state(model)
    for key, value in expected.items():
        if key not in tensors:
            raise ModelFileError(f"{str(weights_path)!r}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ModelFileError(
                f"{str(weights_path)!r}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(value.shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelFileError(f"{str(weights_path)!r}: unexpected tensor {extra[0]!r}")
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])
    model.method = dict(config.get("method", {}))
    return model.eval()


EXPORT_FORMATS = ("onnx",)


def export(
    model: CombinedModel, path: str | Path, *, format: str = "onnx", **options: Any
) -> float | None:
    """Write ``model`` in a standard format anyone can open without netmeld (``netmeld
    export``). ``onnx``: opset 17, dynamic batch, checked against PyTorch with onnxruntime;
    ``options`` are :func:`netmeld.members.bridges.export_onnx`'s (``opset``, ``overwrite``,
    ``check``, ``atol``). Returns the largest difference found by the check."""
    if format not in EXPORT_FORMATS:
        raise DataError(f"export format {format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    from netmeld.members.bridges import export_onnx

    return export_onnx(model, path, **options)
