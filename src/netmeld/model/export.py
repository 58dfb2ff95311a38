"""A combined model as the ecosystem's own checkpoint: transformers, torchvision or timm.

When every member runs one shared trunk (the same body tensors, no neck of its own) and the
union on top is linear in the trunk's features, the whole combined model *is* the trunk plus one
``nn.Linear`` over the union of the labels, and can be written so that transformers, torchvision
or timm load it alone, without netmeld:

- the union head with no router and no label two members share (``concat``, ``weight-norm``,
  ``calibrate``, ...): row ``k`` is the owning member's head row times its scale, its bias plus
  the member's offset and the label's bias;
- a head computed from statistics or fitted over the trunk (``ridge``, ``lda``, a linear
  ``transfer`` head) without a random projection.

Anything else (a router, stacking, an ensemble, a label two members know, ``max-logit``, a
projection, an extension) is not one linear layer, and the error says why and points to ONNX.
Every export is checked: the written model, rebuilt, must give the combined model's logits.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netmeld._atomic import make_temp, swap_in
from netmeld._outputs import check_replaceable, write_marker
from netmeld.data.text import encode_texts, is_text_shape
from netmeld.errors import ExportError

if TYPE_CHECKING:
    from netmeld.members.member import Member
    from netmeld.model.combined import CombinedModel

FORMATS = ("onnx", "transformers", "torchvision", "timm")
LABELS_FILE = "labels.json"
CHECK_ATOL = 1e-4


def _not_linear(why: str) -> ExportError:
    return ExportError(
        f"this combined model is not one plain model: {why}; export it with --format onnx "
        "(any combined model), or keep it as a netmeld folder"
    )


def shared_trunk_member(model: CombinedModel) -> Member:
    """The member whose body is the whole model's trunk (all members share it)."""
    if len(model.plan) != 1:
        groups = " | ".join("+".join(g.members) for g in model.plan)
        raise _not_linear(f"its members do not share one trunk (groups: {groups})")
    for name in model.member_names:
        if not isinstance(model.necks[name], nn.Identity):
            raise _not_linear(f"member {name!r} has layers of its own after the shared trunk")
    if model.untraced and len(model.members) > 1:
        raise _not_linear("a member could not be traced, so its trunk is not known to be shared")
    return model.members[0]


def linear_union(model: CombinedModel) -> nn.Linear:
    """The combined model's head over the shared trunk's features as one ``nn.Linear`` over
    :attr:`~CombinedModel.labels` (a copy); :class:`ExportError` saying why when it is not."""
    shared_trunk_member(model)
    if model.extension is not None:
        raise _not_linear("its extension scores new labels by cosine similarity")
    if model.combiner is not None:
        as_linear = getattr(model.combiner, "as_linear", None)
        if as_linear is None:
            raise _not_linear(f"its {model.combiner.kind!r} combiner is not linear")
        try:
            return copy.deepcopy(as_linear())
        except Exception as exc:  # MethodError: a random projection
            raise _not_linear(str(exc)) from exc
    union = model.union
    if union.router is not None:
        raise _not_linear("a router chooses the member per input (a gate of softmaxes)")
    if union.task_score != "energy":
        raise _not_linear(f"members are weighed by their {union.task_score} score")
    if (union.mask.sum(1) > 1).any():
        shared = [model.labels[int(i)] for i in (union.mask.sum(1) > 1).nonzero().flatten()]
        raise _not_linear(f"label {shared[0]!r} is known to several members (logsumexp)")
    weights, biases = [], []
    for i, name in enumerate(model.member_names):
        head = model.heads[name]
        assert isinstance(head, nn.Linear)
        weights.append(head.weight * union.scale[i])
        own = head.bias if head.bias is not None else torch.zeros(head.out_features)
        biases.append(own * union.scale[i] + union.offset[i])
    weight = torch.cat(weights)
    bias = torch.cat(biases) + union.class_bias
    order = union.index[:, 0]
    linear = nn.Linear(weight.shape[1], len(order))
    with torch.no_grad():
        linear.weight.copy_(weight[order])
        linear.bias.copy_(bias[order])
    return linear


def export_model(
    model: CombinedModel, out: str | Path, format: str, *, overwrite: bool = False
) -> float:
    """Write ``model`` as a plain ``format`` checkpoint folder (see the module docs), atomically;
    returns the largest difference between its logits and the combined model's."""
    if format not in FORMATS[1:]:
        raise ExportError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    member = shared_trunk_member(model)
    head = linear_union(model)
    spec = member.architecture.spec if member.architecture is not None else ""
    wanted = {"transformers": "netmeld.io.hf:", "torchvision": "torchvision:", "timm": "timm:"}
    if not spec.startswith(wanted[format]):
        raise ExportError(
            f"--format {format} needs members that are {format} models; member "
            f"{member.name!r} is {spec or type(member.module).__name__!r}"
        )
    out = Path(out)
    check_replaceable(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(out)
    try:
        if format == "transformers":
            built = _write_transformers(model, member, head, tmp)
        else:
            built = _write_state_dict(model, member, head, tmp)
        diff = _check(model, built)
        write_marker(tmp, f"{format} export")
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return diff


def _write_transformers(
    model: CombinedModel, member: Member, head: nn.Linear, folder: Path
) -> nn.Module:
    from netmeld.io.hf import HFBody, HFClassifier

    module = member.module
    assert isinstance(module, HFClassifier)
    hf_model: Any = module.transformers_model(head)
    labels = list(model.labels)
    hf_model.config.id2label = dict(enumerate(labels))
    hf_model.config.label2id = {label: i for i, label in enumerate(labels)}
    hf_model.config.num_labels = len(labels)
    if hasattr(hf_model, "num_labels"):
        hf_model.num_labels = len(labels)
    hf_model.save_pretrained(str(folder), safe_serialization=True)
    assert member.architecture is not None
    for name, content in member.architecture.kwargs.get("files", {}).items():
        (folder / name).write_text(content, encoding="utf-8")
    body = HFBody(
        hf_model, module.body.task, tokenizer=module.body.tokenizer_json, text=module.body.text
    )
    return _Preprocessed(model, member, body)


def _write_state_dict(
    model: CombinedModel, member: Member, head: nn.Linear, folder: Path
) -> nn.Module:
    from safetensors.torch import save_file

    head_name = model.head_names[member.name]
    state = {
        k: v for k, v in member.module.state_dict().items() if not k.startswith(head_name + ".")
    }
    state[f"{head_name}.weight"] = head.weight.detach()
    state[f"{head_name}.bias"] = head.bias.detach()
    assert member.architecture is not None
    arch = member.architecture
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    kwargs = {k: v for k, v in arch.kwargs.items() if k != "num_classes"}
    info = {
        "labels": list(model.labels),
        "architecture": arch.spec.split(":", 1)[1],
        "builder": arch.spec.split(":", 1)[0],
        "num_classes": len(model.labels),
        "kwargs": kwargs,
        "preprocessing": member.preprocessing.to_dict(),
    }
    (folder / LABELS_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    plain = type(arch)(arch.spec, kwargs)  # the union's class count, not the member's
    rebuilt = plain.build(num_classes=len(model.labels))
    rebuilt.load_state_dict(state)
    return _Preprocessed(model, member, rebuilt.eval())


class _Preprocessed(nn.Module):
    """The exported model behind the combined model's input preprocessing (for the check)."""

    def __init__(self, model: CombinedModel, member: Member, inner: nn.Module) -> None:
        super().__init__()
        self.preprocess = model.preprocess[str(model.group_of[member.name])]
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.preprocess(x))


def _check(model: CombinedModel, built: nn.Module) -> float:
    if is_text_shape(model.input_shape):
        x = encode_texts(["a short text", "another, longer text to read", "netmeld"])
    else:
        x = torch.rand(3, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((built.eval()(x) - model.eval()(x)).abs().max())
    if not diff <= CHECK_ATOL:
        raise ExportError(f"the exported model's logits differ from netmeld's by {diff:.2e}")
    return diff


__all__ = ["FORMATS", "export_model", "linear_union", "shared_trunk_member"]
