"""Members from Hugging Face ``save_pretrained`` folders (:meth:`Member.from_pretrained`).

The folder is read and checked by :mod:`netmeld.io.hf`; this module turns it into a member's
parts: labels from ``id2label``, preprocessing from the image processor (or, for text, the
tokenizer), and the builder arguments that rebuild the model from its config alone, so a saved
combined model needs neither the folder nor pickle.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from netmeld.data.text import TEXT_SHAPE
from netmeld.errors import MemberError
from netmeld.io import hf


@dataclass
class PretrainedParts:
    """What a member is made of, read from a ``save_pretrained`` folder."""

    module: nn.Module
    labels: list[str]
    name: str
    preprocessing: Any  # a Preprocessing, or its dict
    builder_kwargs: dict[str, Any]  # of hf.HF_BUILDER: rebuilds the module from its config


def read_pretrained(
    path: str | Path,
    labels: Sequence[str] | None,
    *,
    name: str | None,
    preprocessing: Any,
) -> PretrainedParts:
    """Read and check the folder at ``path``; ``labels`` replace ``id2label``'s names."""
    folder = Path(path)
    if not folder.is_dir():
        raise MemberError(f"{str(folder)!r} is not a folder (a save_pretrained folder expected)")
    config_path = folder / hf.CONFIG_FILE
    where = repr(str(config_path))
    config = hf.read_json(config_path)
    task = hf.check_config(config, where)
    label_names = _labels(config, labels, where)
    name = name or re.sub(r"[^A-Za-z0-9_\-]", "-", folder.resolve().name) or "hf"
    settings = _config_for(config, label_names)
    files = _kept_files(folder)
    kwargs: dict[str, Any] = {"config": settings, "task": task, "files": files}
    tokenizer = None
    if task == "text":
        tokenizer, kwargs["text"] = hf.text_settings(folder, config)
        files["tokenizer.json"] = tokenizer
        if preprocessing is not None:
            raise MemberError(f"{str(folder)!r}: a text member's preprocessing is its tokenizer")
        preprocessing = {"input_shape": list(TEXT_SHAPE)}
    elif preprocessing is None:
        preprocessing = hf.image_preprocessing(folder, config)
    model = hf.load_pretrained(folder, settings, task)
    module = hf.split_model(model, task, where, tokenizer, kwargs.get("text"))
    return PretrainedParts(module.eval(), label_names, name, preprocessing, kwargs)


def _labels(config: Mapping[str, Any], given: Sequence[str] | None, where: str) -> list[str]:
    names = hf.read_labels(config, where)
    if given is not None:
        chosen = list(given)
        if len(chosen) != len(names):
            raise MemberError(
                f"{where}: {len(chosen)} labels given for a classifier with {len(names)} outputs"
            )
        return chosen
    if hf.default_names(names):
        warnings.warn(
            f"{where}: id2label has transformers' default names ({names[0]}, ...); pass "
            "labels=[...] (a recipe: 'labels:') with the real names, or the combined model's "
            "labels will be these",
            stacklevel=4,
        )
    return names


def _config_for(config: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The config to rebuild the model from: the folder's, with the member's label names."""
    settings = dict(config)
    settings["id2label"] = {str(i): label for i, label in enumerate(labels)}
    settings["label2id"] = {label: i for i, label in enumerate(labels)}
    return settings


KEPT_FILES = (
    hf.PREPROCESSOR_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _kept_files(folder: Path) -> dict[str, str]:
    """The preprocessor and tokenizer files an export writes back beside the weights."""
    kept = {}
    for name in KEPT_FILES:
        path = folder / name
        if path.is_file():
            if path.stat().st_size > hf.MAX_JSON_BYTES:
                raise MemberError(f"{str(path)!r} is larger than {hf.MAX_JSON_BYTES:,} bytes")
            try:
                kept[name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise MemberError(f"{str(path)!r} is not UTF-8 text: {exc}") from exc
    return kept
