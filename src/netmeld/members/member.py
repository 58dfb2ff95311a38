"""What a member is: a trained classifier, its ordered label names, its input preprocessing.

A :class:`Member` is made from an in-memory ``nn.Module`` (torchvision and timm objects
included) or from a checkpoint plus an architecture. Checkpoints are read without unpickling:
safetensors, or ``torch.load(..., weights_only=True)`` for ``.pt``/``.pth`` files.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netmeld.errors import MemberError, NetmeldError, UntrustedCodeError
from netmeld.members.checkpoint import load_into, read_state_dict
from netmeld.members.trust import check_builder

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


# a module may be built with this many numbers beyond twice the tensors it is to take (the
# tensor-by-tensor check then names the mismatch); more is refused before allocating
BUILD_SLACK = 10_000_000
MAX_INPUT_NUMBERS = 2**28  # one input of a member: at most this many numbers (1 GiB)


@dataclass(frozen=True)
class Preprocessing:
    """How a member wants its input.

    Inputs given to netmeld are raw: images are float ``(C, H, W)`` with values in ``[0, 1]``,
    vectors are float ``(F,)``. A member normalises them as ``(x - mean) / std`` per channel.

    Args:
        input_shape: the shape of one input the member reads, ``(C, H, W)`` or ``(F,)``.
        mean: per-channel mean subtracted after scaling to ``[0, 1]`` (one value per channel,
            or one value for all); ``None`` for no normalisation.
        std: per-channel standard deviation, same rules as ``mean``.
        columns: for a member reading vectors (tables), the columns of the combined model's
            input it reads, in its own order: names (matched against the combined model's
            ``feature_names``) or integer positions. ``None`` reads the whole input.
    """

    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    columns: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or any(s <= 0 for s in shape) or math.prod(shape) > MAX_INPUT_NUMBERS:
            raise MemberError(
                f"preprocessing: input_shape must be positive sizes like (3, 224, 224) or (F,), "
                f"at most {MAX_INPUT_NUMBERS:,} numbers per input, got {self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", shape)
        channels = shape[0]
        for what in ("mean", "std"):
            value = getattr(self, what)
            if value is None:
                continue
            if isinstance(value, (int, float)):
                value = (float(value),)
            value = tuple(float(v) for v in value)
            if len(value) not in (1, channels):
                raise MemberError(
                    f"preprocessing: {what} has {len(value)} values, expected 1 or {channels} "
                    f"(one per channel of input_shape {shape})"
                )
            if not all(math.isfinite(v) for v in value):
                raise MemberError(f"preprocessing: {what} must be finite numbers, got {value}")
            if what == "std" and any(v <= 0 for v in value):
                raise MemberError(f"preprocessing: std must be positive, got {value}")
            object.__setattr__(self, what, value)
        if (self.mean is None) != (self.std is None):
            raise MemberError("preprocessing: give both mean and std, or neither")
        if self.columns is not None:
            columns = tuple(
                c if isinstance(c, str) else int(c)
                for c in self.columns  # numpy ints too
            )
            if len(shape) != 1 or len(columns) != shape[0]:
                raise MemberError(
                    f"preprocessing: {len(columns)} columns given for input_shape {shape}; "
                    "columns are for vector inputs and must number input_shape[0]"
                )
            if len(set(columns)) != len(columns):
                raise MemberError(f"preprocessing: columns repeat: {list(columns)}")
            if any(isinstance(c, int) and c < 0 for c in columns):
                raise MemberError(f"preprocessing: column positions must be >= 0: {columns}")
            object.__setattr__(self, "columns", columns)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "columns": None if self.columns is None else list(self.columns),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            input_shape=tuple(data["input_shape"]),
            mean=None if data.get("mean") is None else tuple(data["mean"]),
            std=None if data.get("std") is None else tuple(data["std"]),
            columns=None if data.get("columns") is None else tuple(data["columns"]),
        )


@dataclass(frozen=True)
class Architecture:
    """How to rebuild a member's module without pickle.

    ``spec`` is ``"torchvision:NAME"``, ``"timm:NAME"`` or an importable
    ``"package.module:callable"``; ``kwargs`` are passed to the builder (JSON values only).
    """

    spec: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.spec or not all(self.spec.split(":", 1)):
            raise MemberError(
                f"architecture {self.spec!r}: expected 'torchvision:NAME', 'timm:NAME' or "
                "'package.module:callable'"
            )
        try:
            json.dumps(dict(self.kwargs))
        except TypeError as exc:
            raise MemberError(
                f"architecture {self.spec!r}: kwargs must be JSON values, got {self.kwargs!r}"
            ) from exc
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @classmethod
    def parse(
        cls, spec: str | Architecture, kwargs: Mapping[str, Any] | None = None
    ) -> Architecture:
        if isinstance(spec, Architecture):
            return spec
        if ":" not in spec:
            spec = f"torchvision:{spec}"
        return cls(spec, dict(kwargs or {}))

    def build(self, num_classes: int | None = None) -> nn.Module:
        """Build the module with fresh weights.

        ``num_classes`` is passed to torchvision and timm builders, and to a callable that has a
        ``num_classes`` parameter, unless ``kwargs`` sets it.
        """
        source, name = self.spec.split(":", 1)
        check_builder(self.spec)  # before anything is imported
        kwargs = dict(self.kwargs)
        builder: Callable[..., Any]
        if source == "torchvision":
            import torchvision

            try:
                builder = torchvision.models.get_model_builder(name)
            except ValueError as exc:
                raise MemberError(
                    f"architecture {self.spec!r}: torchvision has no model named {name!r}"
                ) from exc
            if num_classes is not None:
                kwargs.setdefault("num_classes", num_classes)
        elif source == "timm":
            try:
                import timm
            except ImportError as exc:
                raise MemberError(
                    f"architecture {self.spec!r} needs timm: pip install 'netmeld[timm]'"
                ) from exc
            if name not in timm.list_models():
                raise MemberError(f"architecture {self.spec!r}: timm has no model named {name!r}")
            if num_classes is not None:
                kwargs.setdefault("num_classes", num_classes)
            kwargs.setdefault("pretrained", False)

            def builder(**kw: Any) -> Any:
                return timm.create_model(name, **kw)

        else:
            try:
                module = importlib.import_module(source)
            except ImportError as exc:
                raise MemberError(
                    f"architecture {self.spec!r}: cannot import module {source!r} ({exc})"
                ) from exc
            builder = getattr(module, name, None)  # type: ignore[assignment]
            if not callable(builder):
                raise MemberError(
                    f"architecture {self.spec!r}: module {source!r} has no callable {name!r}"
                )
            if num_classes is not None and _accepts(builder, "num_classes"):
                kwargs.setdefault("num_classes", num_classes)
        try:
            model = builder(**kwargs)
        except NetmeldError:
            raise
        except Exception as exc:  # the builder's own complaint, e.g. a negative width
            raise MemberError(
                f"architecture {self.spec!r}: calling the builder with {kwargs} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise MemberError(
                f"architecture {self.spec!r}: the builder returned {type(model).__name__}, "
                "expected a torch.nn.Module"
            )
        return model

    def build_within(self, num_classes: int | None, numbers: int) -> nn.Module:
        """:meth:`build`, after checking on the ``meta`` device (no memory) that the module
        holds not much more than ``numbers`` numbers, those of the tensors it is about to take
        (twice them plus :data:`BUILD_SLACK`): a width from a file that would need terabytes is
        refused before anything is allocated. For loading: the caller's random state is left
        as it was."""
        try:
            with torch.device("meta"):
                probe = self.build(num_classes=num_classes)
            needed = sum(t.numel() for t in probe.state_dict().values())
        except UntrustedCodeError:
            raise
        except Exception:  # a builder that cannot run on meta: build it for real below
            needed = 0
        if needed > 2 * numbers + BUILD_SLACK:  # a smaller mismatch: load_into names the tensor
            raise MemberError(
                f"architecture {self.spec} with {dict(self.kwargs)} has {needed:,} numbers, "
                f"the tensors it is to take only {numbers:,}; refusing to build it"
            )
        with torch.random.fork_rng(devices=[]):  # its fresh weights are replaced: no draws
            return self.build(num_classes=num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kwargs": dict(self.kwargs)}


def read_labels(labels: Sequence[str] | str | Path) -> tuple[str, ...]:
    """Labels from a list, or from a file (one per line, or a JSON list)."""
    if isinstance(labels, (str, Path)) and Path(labels).is_file():
        text = Path(labels).read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
        return tuple(str(v) for v in items)
    if isinstance(labels, (str, Path)):
        raise MemberError(
            f"labels: {str(labels)!r} is neither a list of label names nor an existing file"
        )
    return tuple(str(v) for v in labels)


class Member:
    """A trained classifier with its label names, input preprocessing and a name.

    Args:
        module: the classifier; its output must be logits over ``labels``, in that order.
        labels: the ordered label names (column ``i`` of the output is ``labels[i]``).
        name: a short identifier (letters, digits, ``_`` and ``-``).
        preprocessing: input shape and normalisation; see :class:`Preprocessing`.
        architecture: how to rebuild ``module`` when a combined model is loaded; inferred for
            torchvision and timm models when left out.
        head: the qualified name of the classification head (a ``nn.Linear``) when the
            torchvision/timm conventions and the "last Linear" rule would not find it.
    """

    def __init__(
        self,
        module: nn.Module,
        labels: Sequence[str] | str | Path,
        *,
        name: str,
        preprocessing: Preprocessing | Mapping[str, Any],
        architecture: Architecture | str | None = None,
        head: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise MemberError(
                f"member {name!r}: expected a torch.nn.Module, got {type(module).__name__}"
            )
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise MemberError(
                f"member name {name!r}: use letters, digits, '_' and '-' (starting with a "
                "letter or digit)"
            )
        self.name = name
        self.module = module.eval()
        self.labels = read_labels(labels)
        if not self.labels:
            raise MemberError(f"member {name!r}: labels are empty")
        seen: set[str] = set()
        for label in self.labels:
            if not label:
                raise MemberError(f"member {name!r}: a label name is empty")
            if label in seen:
                raise MemberError(f"member {name!r}: label {label!r} appears twice")
            seen.add(label)
        if not isinstance(preprocessing, Preprocessing):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.preprocessing = preprocessing
        if isinstance(architecture, str):
            architecture = Architecture.parse(architecture)
        self.architecture = architecture or _infer_architecture(module)
        self.head = head

    def __repr__(self) -> str:
        arch = self.architecture.spec if self.architecture else type(self.module).__name__
        return (
            f"Member(name={self.name!r}, labels={list(self.labels)!r}, architecture={arch!r}, "
            f"input_shape={self.preprocessing.input_shape})"
        )

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        architecture: Architecture | str,
        labels: Sequence[str] | str | Path,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any],
        architecture_kwargs: Mapping[str, Any] | None = None,
        head: str | None = None,
    ) -> Member:
        """A member from a checkpoint file and an architecture.

        ``architecture`` is ``"resnet18"`` or ``"torchvision:resnet18"``, ``"timm:NAME"``, or an
        importable ``"package.module:callable"``. The checkpoint is a ``.safetensors`` file or a
        ``.pt``/``.pth`` file read with ``torch.load(weights_only=True)``.
        """
        path = Path(path)
        label_names = read_labels(labels)
        name = name or re.sub(r"[^A-Za-z0-9_\-]", "-", path.stem)
        arch = Architecture.parse(architecture, architecture_kwargs)
        tensors = read_state_dict(path)
        what = f"member {name!r} ({str(path)!r})"
        numbers = sum(t.numel() for t in tensors.values())
        try:
            module = arch.build_within(len(label_names), numbers)
        except UntrustedCodeError:
            raise
        except MemberError as exc:
            raise MemberError(f"{what}: {exc}") from exc
        load_into(module, tensors, what=what)
        return cls(
            module,
            label_names,
            name=name,
            preprocessing=preprocessing,
            architecture=arch,
            head=head,
        )

    @classmethod
    def from_keras(
        cls,
        model: Any,
        labels: Sequence[str] | str | Path,
        *,
        name: str | None = None,
        output: str | int | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> Member:
        """A member from a Keras 3 model: a ``keras.Model`` or a ``.keras``/``.h5`` file path.

        ``output`` picks one output of a multi-output model (its layer name or index).
        ``preprocessing`` defaults to the model's input shape with no normalisation (a Keras
        model usually rescales inside, e.g. with a ``Rescaling`` layer); netmeld's ``[0, 1]``
        images are passed as they are. The member rebuilds from the model's JSON config.
        """
        from netmeld.members.bridges import KERAS_BUILDER, load_keras, wrap_keras

        keras_model, source = load_keras(model)
        label_names = read_labels(labels)
        if isinstance(preprocessing, Mapping):
            preprocessing = Preprocessing.from_dict(preprocessing)
        shape = None if preprocessing is None else preprocessing.input_shape
        module, kwargs = wrap_keras(keras_model, output, len(label_names), source, shape)
        return cls(
            module,
            label_names,
            name=name or (Path(source).stem if source else keras_model.name).replace(".", "-"),
            preprocessing=preprocessing or Preprocessing(input_shape=module.input_shape),
            architecture=Architecture(KERAS_BUILDER, kwargs),
            head="fc",
        )

    @classmethod
    def from_keras_outputs(
        cls,
        model: Any,
        labels: Mapping[str, Sequence[str]],
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> list[Member]:
        """One member per output of a multi-output Keras model (``labels``: output name ->
        labels). The members share the Keras trunk's weights, so a combined model runs it
        once."""
        from netmeld.members.bridges import load_keras

        keras_model, source = load_keras(model)
        stem = Path(source).stem if source else keras_model.name
        return [
            cls.from_keras(
                keras_model,
                output_labels,
                name=f"{name or stem}-{output}".replace(".", "-"),
                output=output,
                preprocessing=preprocessing,
            )
            for output, output_labels in labels.items()
        ]

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        labels: Sequence[str] | str | Path,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> Member:
        """A member from an ``.onnx`` classifier (converted with onnx2torch; a final softmax is
        cut so it returns logits). ``preprocessing`` defaults to the graph's input shape, no
        normalisation. A saved combined model stores the graph without its weights."""
        from netmeld.members.bridges import ONNX_BUILDER, convert_onnx

        module, graph, shape = convert_onnx(path)
        if preprocessing is None:
            if not shape or any(s <= 0 for s in shape):
                raise MemberError(
                    f"ONNX model {str(path)!r}: its input shape is not fixed ({shape}); pass "
                    "preprocessing={'input_shape': ...}"
                )
            preprocessing = Preprocessing(input_shape=shape)
        return cls(
            module,
            labels,
            name=name or Path(path).stem.replace(".", "-"),
            preprocessing=preprocessing,
            architecture=Architecture(ONNX_BUILDER, {"graph": graph}),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        labels: Sequence[str] | str | Path | None = None,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> Member:
        """A member from a transformers classifier saved with ``save_pretrained`` (offline).

        Labels come from ``config.id2label`` (transformers' default ``LABEL_0``... names are a
        warning: pass ``labels``); preprocessing from ``preprocessor_config.json``. The folder
        is checked first (see :mod:`netmeld.io.hf`): custom code and pickled weights are refused.
        """
        from netmeld.io.hf import HF_BUILDER
        from netmeld.members.pretrained import read_pretrained

        names = None if labels is None else list(read_labels(labels))
        parts = read_pretrained(path, names, name=name, preprocessing=preprocessing)
        return cls(
            parts.module,
            parts.labels,
            name=parts.name,
            preprocessing=parts.preprocessing,
            architecture=Architecture(HF_BUILDER, parts.builder_kwargs),
            head="head",
        )

    @classmethod
    def from_timm(
        cls,
        model: nn.Module,
        labels: Sequence[str] | str | Path,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> Member:
        """A member from a timm model: preprocessing and architecture come from its config."""
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        arch_name = cfg.get("architecture")
        if not arch_name:
            raise MemberError("from_timm: the model has no pretrained_cfg['architecture']")
        if preprocessing is None:
            preprocessing = Preprocessing(
                input_shape=tuple(cfg.get("input_size", (3, 224, 224))),
                mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            )
        label_names = read_labels(labels)
        return cls(
            model,
            label_names,
            name=name or arch_name.replace(".", "-"),
            preprocessing=preprocessing,
            architecture=Architecture(f"timm:{arch_name}"),
        )

    @classmethod
    def from_torchvision(
        cls,
        model: nn.Module,
        labels: Sequence[str] | str | Path,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        image_size: int = 224,
    ) -> Member:
        """A member from a torchvision model object (the architecture is found by its tensors).

        Preprocessing defaults to torchvision's ImageNet normalisation at ``image_size``.
        """
        arch = _infer_architecture(model)
        if arch is None:
            raise MemberError(
                f"from_torchvision: {type(model).__name__} matches no torchvision architecture; "
                "use Member(module, labels, architecture='package.module:callable', ...)"
            )
        if preprocessing is None:
            preprocessing = Preprocessing(
                input_shape=(3, image_size, image_size),
                mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225),
            )
        return cls(
            model,
            labels,
            name=name or arch.spec.split(":", 1)[1],
            preprocessing=preprocessing,
            architecture=arch,
        )


def _accepts(fn: Callable[..., Any], parameter: str) -> bool:
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _infer_architecture(module: nn.Module) -> Architecture | None:
    """Find the torchvision or timm builder whose model has exactly ``module``'s tensors."""
    cls_module = type(module).__module__
    if cls_module.startswith("timm."):
        arch_name = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
        if arch_name:
            return Architecture(f"timm:{arch_name}", _num_classes_kwargs(module))
        return None
    if not cls_module.startswith("torchvision.models"):
        return None
    import torchvision

    target = _shapes(module)
    kwargs = _num_classes_kwargs(module)
    prefix = type(module).__name__.lower().replace("_", "")
    for name in torchvision.models.list_models(module=torchvision.models):
        if not name.replace("_", "").startswith(prefix[:6]):
            continue
        try:
            with torch.device("meta"):
                candidate = torchvision.models.get_model_builder(name)(**kwargs)
        except Exception:  # a builder that refuses these kwargs is not a match
            continue
        if type(candidate) is type(module) and _shapes(candidate) == target:
            return Architecture(f"torchvision:{name}", kwargs)
    return None


def _num_classes_kwargs(module: nn.Module) -> dict[str, Any]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return {"num_classes": linears[-1].out_features} if linears else {}
