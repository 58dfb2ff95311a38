"""Hugging Face transformers classifiers saved with ``save_pretrained``, read offline.

A folder holds ``config.json`` (the architecture, ``id2label``), ``model.safetensors`` (or
shards and their index) and ``preprocessor_config.json`` (images) or tokenizer files (text).
:func:`read_pretrained` checks all of it before transformers builds anything: the config is
strict JSON naming one of transformers' own ``...ForImageClassification`` or
``...ForSequenceClassification`` classes (a config asking for custom code, ``auto_map``, is
refused: netmeld never runs code from a downloaded folder), every safetensors header is
validated (:class:`~netmeld.io.shards.CheckpointReader`), and no weight may be missing or left
over. Nothing is downloaded; ``pytorch_model.bin`` files are refused (pickle).

A member wraps the model as ``HFClassifier``: ``body`` is the whole transformers model with its
classification layer replaced by ``nn.Identity`` (so it returns the head's input: ViT's CLS
token, ConvNeXt's pooled features, RoBERTa's ``dense -> tanh`` output, DistilBERT's
``pre_classifier`` output), and ``head`` is that layer. torch.fx treats the body as one
operation, so members with the same body tensors (heads transfer-learned on one frozen
backbone) share it and a combined model runs it once; a fine-tuned backbone shares nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netmeld.errors import CheckpointError, MemberError, UntrustedCodeError
from netmeld.io.shards import BadJson, CheckpointReader, strict_json

HF_BUILDER = "netmeld.io.hf:hf_classifier"
TASKS = {
    "image": ("ForImageClassification", "AutoModelForImageClassification"),
    "text": ("ForSequenceClassification", "AutoModelForSequenceClassification"),
}
MAX_JSON_BYTES = 16 * 2**20
CONFIG_FILE, PREPROCESSOR_FILE = "config.json", "preprocessor_config.json"


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MemberError(
            "Hugging Face members need transformers: pip install 'netmeld[transformers]'"
        ) from exc
    return transformers


def read_json(path: Path) -> dict[str, Any]:
    """A strict JSON object from ``path`` (at most 16 MiB; no NaN, no key twice); errors name
    the file."""
    where = repr(str(path))
    if not path.is_file():
        raise MemberError(f"{where} does not exist")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise MemberError(f"{where} is larger than {MAX_JSON_BYTES:,} bytes")
    try:
        data = strict_json(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise MemberError(f"{where} is not UTF-8 text: {exc}") from exc
    except (ValueError, RecursionError, BadJson) as exc:
        raise MemberError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MemberError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def check_config(config: Mapping[str, Any], where: str) -> str:
    """The task (``image`` or ``text``) of a transformers config; refuses custom code."""
    if "auto_map" in config or config.get("trust_remote_code"):
        raise UntrustedCodeError(
            f"{where} asks for custom model code (auto_map); netmeld builds only transformers' "
            "own classes and never runs code from a model folder"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise MemberError(f"{where}: no 'model_type' (is this a transformers config.json?)")
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or len(architectures) != 1
        or not isinstance(architectures[0], str)
    ):
        raise MemberError(
            f"{where}: 'architectures' must name one class, e.g. ['ViTForImageClassification']"
        )
    for task, (suffix, _) in TASKS.items():
        if architectures[0].endswith(suffix):
            return task
    raise MemberError(
        f"{where}: {architectures[0]!r} is not an image or sequence classifier; netmeld reads "
        "...ForImageClassification and ...ForSequenceClassification models"
    )


def _config_and_class(config: Mapping[str, Any], task: str, where: str) -> tuple[Any, Any]:
    """transformers' config object for ``config`` (checked first) and the Auto class of
    ``task``."""
    transformers = transformers_module()
    check_config(config, where)
    settings = dict(config)
    model_type = settings.pop("model_type")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MemberError(f"{where}: transformers cannot read this config: {exc}") from exc
    return cfg, getattr(transformers, TASKS[task][1])


def build_model(config: Mapping[str, Any], task: str, where: str) -> nn.Module:
    """The transformers classifier ``config`` describes, with fresh weights."""
    cfg, auto = _config_and_class(config, task, where)
    try:
        model = auto.from_config(cfg)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise MemberError(f"{where}: transformers cannot build this config: {exc}") from exc
    return model.eval()


def head_path(model: nn.Module, where: str) -> str:
    """The classification layer of a transformers classifier: ``classifier`` when it is a
    Linear, else the last Linear inside it (ResNet's ``classifier.1``, RoBERTa's
    ``classifier.out_proj``); ``score`` or ``fc`` where a family names it so."""
    for attr in ("classifier", "score", "fc", "head"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Linear):
            return attr
        if isinstance(sub, nn.Module):
            inner = [n for n, m in sub.named_modules() if isinstance(m, nn.Linear)]
            if inner:
                return f"{attr}.{inner[-1]}"
    raise MemberError(f"{where}: no classification layer (a Linear named classifier) found")


class HFBody(nn.Module):
    """A transformers classifier without its classification layer: it returns the head's
    input. torch.fx calls it as one operation (``netmeld_leaf``). A text body reads texts as
    :mod:`netmeld.data.text` encodes them and tokenises them with its own tokenizer."""

    netmeld_leaf = True

    def __init__(
        self,
        model: nn.Module,
        task: str,
        *,
        tokenizer: str | None = None,
        text: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.tokenizer_json = tokenizer
        self.text = dict(text or {})
        self._tokenizer: Any = None
        if task == "text":
            if tokenizer is None:
                raise MemberError("a text member needs its tokenizer (tokenizer.json)")
            self._tokenizer = make_tokenizer(tokenizer, self.text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "image":
            return self.model(pixel_values=x).logits
        from netmeld.data.text import decode_texts

        encoded = self._tokenizer.encode_batch(decode_texts(x))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long, device=x.device)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long, device=x.device)
        return self.model(input_ids=ids, attention_mask=mask).logits


def make_tokenizer(tokenizer_json: str, text: Mapping[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON, truncating and padding as the member did."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MemberError(
            "text members need tokenizers: pip install 'netmeld[transformers]'"
        ) from exc
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # the Rust library's own complaint
        raise MemberError(f"a text member's tokenizer.json cannot be read: {exc}") from exc
    tok.enable_truncation(int(text.get("max_length", 512)))
    tok.enable_padding(pad_id=int(text.get("pad_id", 0)), pad_token=str(text.get("pad_token", "")))
    return tok


def text_settings(folder: Path, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The tokenizer of a text classifier's folder as ``tokenizer.json`` text, and how it pads
    and truncates; transformers reads the tokenizer files (a tokenizer asking for custom code
    is refused)."""
    transformers = transformers_module()
    where = repr(str(folder))
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file() and "auto_map" in read_json(tok_config):
        raise UntrustedCodeError(
            f"{str(tok_config)!r} asks for custom tokenizer code (auto_map); netmeld never runs "
            "code from a model folder"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MemberError(f"{where}: its tokenizer cannot be read: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise MemberError(f"{where}: netmeld needs a fast tokenizer (tokenizer.json)")
    limits = [tok.model_max_length, config.get("max_position_embeddings"), 512]
    max_length = min(int(v) for v in limits if isinstance(v, int) and v > 0)
    text = {
        "max_length": max_length,
        "pad_id": int(tok.pad_token_id) if tok.pad_token_id is not None else 0,
        "pad_token": str(tok.pad_token or ""),
    }
    return tok.backend_tokenizer.to_str(), text


class HFClassifier(nn.Module):
    """``head(body(x))``: a transformers classifier split at its classification layer."""

    def __init__(self, body: HFBody, head: nn.Linear, head_name: str) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.head_name = head_name  # where the layer sits in the transformers model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def transformers_model(self, head: nn.Linear | None = None) -> nn.Module:
        """A copy of the wrapped transformers model with its classification layer put back
        (or ``head`` in its place)."""
        import copy

        model = copy.deepcopy(self.body.model)
        model.set_submodule(self.head_name, copy.deepcopy(self.head if head is None else head))
        return model


def split_model(
    model: nn.Module,
    task: str,
    where: str,
    tokenizer: str | None = None,
    text: Mapping[str, Any] | None = None,
) -> HFClassifier:
    head_name = head_path(model, where)
    head = model.get_submodule(head_name)
    assert isinstance(head, nn.Linear)
    model.set_submodule(head_name, nn.Identity())
    return HFClassifier(HFBody(model, task, tokenizer=tokenizer, text=text), head, head_name)


def hf_classifier(
    *,
    config: dict[str, Any],
    task: str,
    files: dict[str, str] | None = None,
    text: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> HFClassifier:
    """The builder a saved combined model names (``netmeld.io.hf:hf_classifier``): the
    classifier ``config`` describes, fresh weights, split at its classification layer.
    ``files``: the folder's preprocessor and tokenizer files (``tokenizer.json`` is what a text
    member tokenises with); ``text``: its truncation and padding; ``num_classes``: another
    number of outputs (a student over the union of the labels, say)."""
    if task not in TASKS:
        raise MemberError(f"transformers member: task {task!r}, expected 'image' or 'text'")
    if num_classes is not None and num_classes != len(config.get("id2label") or {}):
        config = dict(config)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    where = "a transformers member's config"
    tokenizer = (files or {}).get("tokenizer.json") if task == "text" else None
    return split_model(build_model(config, task, where), task, where, tokenizer, text)


def _weights(folder: Path) -> CheckpointReader:
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return CheckpointReader(folder)
    if any(folder.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{str(folder)!r} holds its weights as pytorch_model.bin (a pickle); netmeld reads "
            "only safetensors: convert it with save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"{str(folder)!r} holds no model.safetensors")


def load_pretrained(folder: Path, config: Mapping[str, Any], task: str) -> nn.Module:
    """The classifier of a ``save_pretrained`` folder, its weights loaded by transformers (which
    knows its own checkpoint key names) after netmeld checked every safetensors header; a
    missing, unexpected or reshaped tensor is an error naming it (transformers would only warn
    and leave fresh random weights)."""
    where = repr(str(folder))
    cfg, auto = _config_and_class(config, task, where)
    _weights(folder)  # headers, offsets and shards checked before transformers reads them
    bars = transformers_module().utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # netmeld's own progress is enough
    try:
        model, info = auto.from_pretrained(
            str(folder),
            config=cfg,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: transformers cannot load it: {exc}") from exc
    finally:
        if shown:
            bars.enable_progress_bar()
    for kind, what in (
        ("missing_keys", "is missing"),
        ("unexpected_keys", "is not in the architecture config.json describes"),
        ("mismatched_keys", "has another shape than config.json describes"),
    ):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{where}: tensor {keys[0]!r} {what}{more}")
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values")
    return model.eval()


def image_preprocessing(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """netmeld preprocessing from ``preprocessor_config.json`` (netmeld's inputs are in
    ``[0, 1]``; a processor that does not rescale wants ``[0, 255]``)."""
    channels = int(config.get("num_channels", 3))
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        size = config.get("image_size")
        if not isinstance(size, int):
            raise MemberError(
                f"{str(folder)!r} has no {PREPROCESSOR_FILE} and its config no image_size; "
                "pass preprocessing={'input_shape': [3, H, W], 'mean': ..., 'std': ...}"
            )
        return {"input_shape": [channels, size, size]}
    proc = read_json(path)
    where = repr(str(path))
    size = proc.get("crop_size") if proc.get("do_center_crop") else None
    size = size or proc.get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            hw = [size["height"], size["width"]]
        elif "shortest_edge" in size:
            hw = [size["shortest_edge"]] * 2
        else:
            hw = []
    elif isinstance(size, int):
        hw = [size, size]
    else:
        hw = []
    if len(hw) != 2 or not all(isinstance(v, int) and 0 < v <= 8192 for v in hw):
        raise MemberError(f"{where}: 'size' must give height and width, got {size!r}")
    out: dict[str, Any] = {"input_shape": [channels, *hw]}
    # the model reads x * k - offset (x: netmeld's image in [0, 1]), normalised by mean and std
    # (EfficientNet's include_top divides by std once more)
    rescale = proc.get("do_rescale", True)
    factor = proc.get("rescale_factor", 1 / 255) if rescale else 1.0
    if not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise MemberError(f"{where}: rescale_factor must be a positive number, got {factor!r}")
    k = 255.0 * float(factor)
    offset = 1.0 if rescale and proc.get("rescale_offset") else 0.0
    mean, std = [0.0], [1.0]
    if proc.get("do_normalize", True) and "image_mean" in proc and "image_std" in proc:
        mean, std = proc["image_mean"], proc["image_std"]
        if not isinstance(mean, list) or not isinstance(std, list):
            raise MemberError(f"{where}: image_mean and image_std must be lists")
    if proc.get("include_top") and isinstance(proc.get("image_std"), list):
        top = [float(v) for v in proc["image_std"]]
        base = std if len(std) == len(top) else [float(std[0])] * len(top)
        std = [float(a) * b for a, b in zip(base, top, strict=True)]
    means = [(float(v) + offset) / k for v in mean]
    stds = [float(v) / k for v in std]
    if means != [0.0] or stds != [1.0]:
        out["mean"], out["std"] = means, stds
    return out


def default_names(labels: list[str]) -> bool:
    """Whether ``labels`` are transformers' placeholder names ``LABEL_0``, ``LABEL_1``, ..."""
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def read_labels(config: Mapping[str, Any], where: str) -> list[str]:
    """The labels of ``config.id2label`` in output order; every index present once."""
    id2label = config.get("id2label")
    if id2label is None:  # transformers leaves out the default LABEL_0... names
        count = config.get("num_labels", 2)
        if not isinstance(count, int) or not 0 < count <= 1_000_000:
            raise MemberError(f"{where}: no id2label and no valid num_labels; pass labels=[...]")
        id2label = {i: f"LABEL_{i}" for i in range(count)}
    if not isinstance(id2label, dict) or not id2label:
        raise MemberError(f"{where}: id2label must map output indices to names")
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as exc:
        raise MemberError(f"{where}: id2label keys must be output indices: {exc}") from exc
    if sorted(by_index) != list(range(len(by_index))):
        raise MemberError(
            f"{where}: id2label must map 0..{len(by_index) - 1}, got {sorted(by_index)[:8]}"
        )
    return [by_index[i] for i in range(len(by_index))]
