"""Members from Keras 3 models (``.keras`` and legacy ``.h5``) and from ONNX files, and the
export of any combined model to ONNX.

The members themselves are made by :meth:`Member.from_keras`, :meth:`Member.from_keras_outputs`
and :meth:`Member.from_onnx`; this module holds what they wrap the foreign model in.

**Keras.** Under ``KERAS_BACKEND=torch`` a ``keras.Model`` is a ``torch.nn.Module`` whose
weights are torch parameters. :meth:`Member.from_keras` wraps one as a classifier that reads
netmeld's ``(N, C, H, W)`` images (it feeds Keras ``(N, H, W, C)``), and replaces the output
``Dense`` layer (softmax or not) by an ``nn.Linear`` with the same weights that returns logits.
The member rebuilds from the model's JSON config, so a saved combined model needs no Keras file
and no pickle. A model with several inputs of one shape gets the image on each; a model with
several outputs gives one member per output (:meth:`Member.from_keras_outputs`); they share
their trunk.

**ONNX.** :meth:`Member.from_onnx` converts the graph with ``onnx2torch``; a final ``Softmax``
is cut off so the member returns logits. A saved combined model stores the graph without its weights
(those go to the safetensors file).

**Export.** :func:`export_onnx` writes any combined model as ONNX (opset 17, dynamic batch) and
checks it with onnxruntime against PyTorch.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netmeld.data.text import is_text_shape
from netmeld.errors import DataError, MemberError, ModelFileError

# -- Keras ------------------------------------------------------------------------------------


def _keras() -> Any:
    wanted = os.environ.setdefault("KERAS_BACKEND", "torch")
    if wanted != "torch":
        raise MemberError(
            f"Keras members need KERAS_BACKEND=torch (it is {wanted!r}); set it before Python "
            "imports keras"
        )
    try:
        import keras
    except ImportError as exc:
        raise MemberError("Keras members need Keras 3: pip install 'netmeld[keras]'") from exc
    if keras.backend.backend() != "torch":
        raise MemberError(
            f"keras was imported with the {keras.backend.backend()!r} backend; Keras members "
            "need KERAS_BACKEND=torch, set before Python imports keras"
        )
    return keras


def _producer(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise MemberError(
            "the Keras model is not functional (no layer graph); use a functional "
            "or Sequential model"
        )
    return history[0]


def _output_dense(keras: Any, model: Any, output: str | int | None) -> Any:
    """The output tensor ``output`` names (its index or its layer's name)."""
    try:
        outputs = list(model.outputs)
    except (AttributeError, ValueError) as exc:
        raise MemberError(
            f"the Keras model {model.name!r} is not built (it has no inputs yet): start it with "
            "keras.Input(shape) or call it on data once"
        ) from exc
    if output is None:
        if len(outputs) != 1:
            names = [_producer(o).name for o in outputs]
            raise MemberError(
                f"the Keras model has {len(outputs)} outputs {names}; pick one with output= "
                "(or use keras_members for all)"
            )
        tensor = outputs[0]
    elif isinstance(output, int):
        if not 0 <= output < len(outputs):
            raise MemberError(f"output {output}: the Keras model has {len(outputs)} outputs")
        tensor = outputs[output]
    else:
        by_name = {_producer(o).name: o for o in outputs}
        if output not in by_name:
            raise MemberError(f"output {output!r}: the Keras model's outputs are {list(by_name)}")
        tensor = by_name[output]
    return tensor


def _classifier(keras: Any, model: Any, output: str | int | None) -> tuple[Any, Any, str]:
    """``(dense, features, name)``: the ``Dense`` layer that produces ``output`` (through
    activation layers), the tensor of ``model``'s graph it reads, and the output's name. An
    output made by a nested model (``cnn2(cnn1(x))`` with ``cnn2`` a Sequential ending in its
    classifier) is looked into: its last ``Dense`` is the classifier, the rest of it the neck."""
    tensor = _output_dense(keras, model, output)
    name = _producer(tensor).name
    layer = _producer(tensor)
    while isinstance(layer, (keras.layers.Activation, keras.layers.Softmax)):
        tensor = layer.input
        layer = _producer(tensor)
    if isinstance(layer, keras.Model):  # a nested model: its own classifier, fed from outside
        history = tensor._keras_history
        outer = layer._inbound_nodes[history[1]].input_tensors
        inner_dense, _, _ = _classifier(keras, layer, None)
        if len(outer) != 1:
            raise MemberError(f"the nested Keras model {layer.name!r} must read one input")
        neck = keras.Model(layer.inputs, inner_dense.input, name=f"{layer.name}_neck")
        return inner_dense, neck(outer[0]), name
    if not isinstance(layer, keras.layers.Dense):
        raise MemberError(
            f"the Keras output {layer.name!r} is a {type(layer).__name__}; netmeld needs a Dense "
            "layer (optionally followed by an activation) as the classifier"
        )
    return layer, layer.input, name


class KerasClassifier(nn.Module):
    """A Keras 3 functional model as a PyTorch classifier returning logits.

    ``body`` is the Keras model up to the output ``Dense`` layer's input; ``fc`` is that layer as
    an ``nn.Linear``. Images arrive as ``(N, C, H, W)`` and are fed to Keras as ``(N, H, W, C)``.
    """

    def __init__(self, config: str, output: str | None = None, num_classes: int | None = None):
        super().__init__()
        keras = _keras()
        model = keras.models.model_from_json(config)
        self._bind(keras, model, output, num_classes, new_head=True)

    @classmethod
    def wrap(cls, model: Any, output: str | int | None, num_classes: int) -> KerasClassifier:
        """Wrap a loaded ``keras.Model`` (its weights kept); ``num_classes`` must match."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._bind(_keras(), model, output, num_classes)
        return module

    def _bind(
        self,
        keras: Any,
        model: Any,
        output: str | int | None,
        num_classes: int | None,
        new_head: bool = False,
    ) -> None:
        """Wrap ``model``; a ``num_classes`` other than the output's units is an error, or with
        ``new_head`` (a rebuilt architecture given a new label count) a fresh head."""
        dense, features, name = _classifier(keras, model, output)
        shapes = [tuple(i.shape[1:]) for i in model.inputs]
        if any(None in s for s in shapes) or len(set(shapes)) != 1:
            raise MemberError(
                f"the Keras model's inputs have shapes {shapes}; netmeld feeds one input of a "
                "fixed shape to each of them"
            )
        self.n_inputs = len(shapes)
        self.keras_input_shape = shapes[0]
        self.output_name = name
        body = keras.Model(model.inputs, features)
        self.body = body
        kernel = dense.kernel.value.detach()
        if num_classes is not None and num_classes != kernel.shape[1]:
            if not new_head:
                raise MemberError(
                    f"the Keras output {dense.name!r} has {kernel.shape[1]} units, "
                    f"{num_classes} labels given"
                )
            self.fc = nn.Linear(kernel.shape[0], num_classes, bias=dense.use_bias)
            return
        self.fc = nn.Linear(kernel.shape[0], kernel.shape[1], bias=dense.use_bias)
        with torch.no_grad():
            self.fc.weight.copy_(kernel.T)
            if dense.use_bias:
                self.fc.bias.copy_(dense.bias.value.detach())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input shape netmeld sees: ``(C, H, W)`` for Keras' ``(H, W, C)`` images."""
        s = self.keras_input_shape
        return (s[2], s[0], s[1]) if len(s) == 3 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        inputs = [x] * self.n_inputs if self.n_inputs > 1 else x
        features = self.body(inputs, training=self.training)
        return self.fc(features.flatten(1))


def keras_classifier(
    config: str, output: str | None = None, num_classes: int | None = None
) -> KerasClassifier:
    """Rebuild a :class:`KerasClassifier` with fresh weights from a Keras JSON config."""
    return KerasClassifier(config, output, num_classes)


def _load_keras_model(path: str | Path) -> Any:
    keras = _keras()
    path = Path(path)
    if not path.is_file():
        raise MemberError(f"Keras model {str(path)!r}: no such file")
    if path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise MemberError(f"Keras model {str(path)!r}: expected a .keras or .h5 file")
    try:
        # safe_mode (the default) refuses Lambda layers' pickled code.
        return keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        raise MemberError(f"Keras model {str(path)!r} could not be read: {exc}") from exc


KERAS_BUILDER = "netmeld.members.bridges:keras_classifier"
ONNX_BUILDER = "netmeld.members.bridges:onnx_module"


def load_keras(model: Any) -> tuple[Any, str | None]:
    """A ``keras.Model`` from a model or a ``.keras``/``.h5`` path, and that path (``None``
    for a model object)."""
    keras = _keras()
    source = str(model) if isinstance(model, (str, Path)) else None
    if source is not None:
        model = _load_keras_model(source)
    if not isinstance(model, keras.Model):
        raise MemberError(
            f"expected a keras.Model or a .keras/.h5 path, got {type(model).__name__}"
        )
    return model, source


def wrap_keras(
    model: Any,
    output: str | int | None,
    num_classes: int,
    source: str | None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[KerasClassifier, dict[str, Any]]:
    """The Keras model as a :class:`KerasClassifier` on one output, and the builder keyword
    arguments (JSON config, output name) that rebuild it. ``input_shape``, the member's
    preprocessing's, must be the model's (channels first)."""
    try:
        module = KerasClassifier.wrap(model, output, num_classes)
    except MemberError as exc:
        raise MemberError(f"{source or 'Keras model'}: {exc}") from exc
    if input_shape is not None and tuple(input_shape) != module.input_shape:
        raise MemberError(
            f"{source or 'Keras model'}: preprocessing input_shape {tuple(input_shape)} does "
            f"not fit the model, which reads {module.input_shape} (channels first; netmeld "
            "resizes other inputs to it)"
        )
    return module, {"config": model.to_json(), "output": module.output_name}


# -- ONNX -------------------------------------------------------------------------------------


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnx2torch
    except ImportError as exc:
        raise MemberError(
            "ONNX members need onnx and onnx2torch: pip install 'netmeld[onnx]'"
        ) from exc
    return onnx, onnx2torch


def _cut_softmax(onnx: Any, proto: Any) -> bool:
    """Make the graph output the input of a final Softmax/LogSoftmax; whether it cut one."""
    graph = proto.graph
    if len(graph.output) != 1:
        raise MemberError(f"the ONNX graph has {len(graph.output)} outputs; netmeld needs one")
    out = graph.output[0].name
    final = [n for n in graph.node if out in n.output]
    if not final or final[0].op_type not in ("Softmax", "LogSoftmax"):
        return False
    node = final[0]
    graph.node.remove(node)
    graph.output[0].name = node.input[0]
    return True


_FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _strip_weights(onnx: Any, proto: Any) -> str:
    """The graph, base64, with floating-point initializers' values dropped (their shapes and
    types kept; integer ones, such as reshape targets, are small and stay)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for init in copy.graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            for field in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(field)
    return base64.b64encode(copy.SerializeToString()).decode("ascii")


def onnx_module(graph: str, num_classes: int | None = None) -> nn.Module:
    """Rebuild an ONNX member's module (fresh, zero weights) from its stored graph."""
    onnx, onnx2torch = _onnx()
    import numpy as np
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto()
    proto.ParseFromString(base64.b64decode(graph))
    filled = []
    for init in proto.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            filled.append(init)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        filled.append(numpy_helper.from_array(np.zeros(tuple(init.dims), dtype=dtype), init.name))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(filled)
    return onnx2torch.convert(proto)


def convert_onnx(path: str | Path) -> tuple[nn.Module, str, tuple[int, ...]]:
    """An ``.onnx`` classifier as a torch module (a final softmax cut, so it returns logits),
    its graph without weights (the builder's argument), and its input shape (without the batch
    dimension; empty or with zeros where the graph leaves it open)."""
    onnx, onnx2torch = _onnx()
    path = Path(path)
    if not path.is_file():
        raise MemberError(f"ONNX model {str(path)!r}: no such file")
    try:
        proto = onnx.load(str(path))
        _cut_softmax(onnx, proto)
        module = onnx2torch.convert(proto)
    except MemberError as exc:
        raise MemberError(f"ONNX model {str(path)!r}: {exc}") from exc
    except Exception as exc:
        raise MemberError(f"ONNX model {str(path)!r} could not be converted: {exc}") from exc
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) for d in dims[1:])
    return module, _strip_weights(onnx, proto), shape


# -- export -----------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    overwrite: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> float | None:
    """Write ``model`` (a combined model) as ONNX with a dynamic batch size, atomically.

    With ``check`` (and onnxruntime installed) the file is run on random inputs of batch sizes 1
    and 3 and compared with PyTorch; the largest absolute difference is returned, and above
    ``atol`` it is an error.
    """
    path = Path(path)
    _check_onnx_replaceable(path, overwrite)
    input_shape = tuple(getattr(model, "input_shape", ()))
    if not input_shape:
        raise DataError("export needs a model with an input_shape")
    if is_text_shape(input_shape):
        raise ModelFileError(
            "a model of text members tokenises its texts in Python, which ONNX cannot hold; "
            "export it with --format transformers (a linear union over one shared encoder) or "
            "keep the netmeld folder"
        )
    model = model.eval()
    example = torch.rand(2, *input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    flexible = len(input_shape) == 3 and not getattr(model, "reads_input", False)
    axes = {0: "batch", 2: "height", 3: "width"} if flexible else {0: "batch"}
    try:
        try:
            with _quiet():  # torch prints its whole IR graph on a failure: one line instead
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    opset_version=opset,
                    dynamo=False,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": axes, "logits": {0: "batch"}},
                )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelFileError(f"ONNX export of {type(model).__name__} failed: {first}") from exc
        _mark_onnx(tmp, _metadata(model))
        diff = _check_onnx(model, tmp, input_shape) if check else None
        if diff is not None and diff > atol:
            raise ModelFileError(
                f"the exported ONNX model differs from PyTorch by {diff:.2e} (> {atol:g})"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


ONNX_MARK = ("written_by", "netmeld")  # metadata of every ONNX file netmeld writes


def _metadata(model: nn.Module) -> dict[str, str]:
    """What an ONNX file says about itself: the union's labels, the input it takes (any height
    and width, for images: each member resizes), each member's preprocessing."""
    import json

    from netmeld._version import __version__

    members = getattr(model, "members", [])
    return {
        "labels": json.dumps(list(getattr(model, "labels", []))),
        "input_shape": json.dumps(list(getattr(model, "input_shape", []))),
        "input_range": "images: float in [0, 1], NCHW; the model normalises per member",
        "members": json.dumps(
            [
                {
                    "name": m.name,
                    "labels": list(m.labels),
                    "preprocessing": m.preprocessing.to_dict(),
                }
                for m in members
            ]
        ),
        "netmeld_version": __version__,
    }


def _mark_onnx(path: Path, metadata: dict[str, str] | None = None) -> None:
    """Record in the file's metadata that netmeld wrote it (what ``overwrite`` checks), and
    ``metadata``."""
    try:
        import onnx
    except ImportError:  # torch.onnx without the onnx package: the file stays unmarked
        return
    proto = onnx.load(str(path), load_external_data=False)
    for key, value in [ONNX_MARK, *(metadata or {}).items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python's and the C++ library's output to stderr and stdout (file descriptors
    1 and 2) for the block, and its warnings."""
    import warnings

    saved = [os.dup(1), os.dup(2)]
    text = io.StringIO()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _check_onnx_replaceable(path: Path, overwrite: bool) -> None:
    """``overwrite`` replaces only an ONNX file netmeld wrote: never a link, a folder, or a
    file of the user's."""
    if path.is_symlink():
        raise ModelFileError(f"{str(path)!r} is a symbolic link; give the real path")
    if not path.exists():
        return
    if not overwrite:
        raise ModelFileError(f"{str(path)!r} exists; pass overwrite=True to replace it")
    if not path.is_file():
        raise ModelFileError(f"{str(path)!r} exists and is not a file; refusing to replace it")
    try:
        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
    except Exception:  # not ONNX at all, or unreadable
        props = {}
    if props.get(ONNX_MARK[0]) != ONNX_MARK[1]:
        raise ModelFileError(
            f"{str(path)!r} exists and is not an ONNX file netmeld wrote; refusing to replace "
            "it, even with overwrite"
        )


def _check_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, *input_shape), (3, *input_shape)]
    if len(input_shape) == 3 and not getattr(model, "reads_input", False):  # members resize
        shapes.append((2, input_shape[0], input_shape[1] + 7, input_shape[2] + 3))
    for shape in shapes:
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        if got.shape != expected.shape:
            raise ModelFileError(
                f"the exported ONNX model returns shape {got.shape}, PyTorch {expected.shape}"
            )
        worst = max(worst, float(abs(got - expected).max()))
    return worst


__all__ = [
    "KERAS_BUILDER",
    "ONNX_BUILDER",
    "KerasClassifier",
    "convert_onnx",
    "export_onnx",
    "keras_classifier",
    "load_keras",
    "onnx_module",
    "wrap_keras",
]
