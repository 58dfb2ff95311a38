"""Multi-teacher distillation: one compact student learns the union of its teachers' labels
from their calibrated soft outputs, on unlabeled inputs (knowledge amalgamation).

The teacher is any :class:`~netmeld.combined.CombinedModel` (its union head is what makes
the soft targets comparable across members: fit it with ``calibrate``, ``infomax``, ...), or
a list of members combined with ``union=``. The student is by default a copy of the first
member's architecture with a new head over the union's labels, started from that member's
weights; any module with one output per union label can be given instead. Training runs on
:mod:`netmeld.engine` (checkpoints, resume, DDP, AMP). The result is a one-member combined
model that saves, loads and evaluates like every other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.combined import CombinedModel, Preprocess
from netmeld.data import load_data
from netmeld.engine import TrainConfig, tensor_batches, train
from netmeld.errors import DataError, MemberError
from netmeld.graph import find_head
from netmeld.members import Architecture, Member


@torch.no_grad()
def _teacher_logits(
    teacher: CombinedModel, inputs: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    teacher.eval()
    return torch.cat(
        [teacher(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    )


def _default_student(teacher: CombinedModel, init: Literal["member", "scratch"]) -> Member:
    first = teacher.members[0]
    if first.architecture is None:
        raise MemberError(
            f"member {first.name!r} has no architecture to copy for the student; pass student="
        )
    n = len(teacher.labels)
    arch = first.architecture
    if "num_classes" in arch.kwargs:
        arch = Architecture(arch.spec, {**arch.kwargs, "num_classes": n})
    module = arch.build(num_classes=n)
    if init == "member":
        head = find_head(first)
        body = {k: v for k, v in first.module.state_dict().items() if not k.startswith(head + ".")}
        missing, _ = module.load_state_dict(body, strict=False)
        if any(not k.startswith(head + ".") for k in missing):
            raise MemberError(
                f"the student built from {arch.spec!r} lacks member "
                f"{first.name!r}'s tensors ({missing[0]!r}); pass student="
            )
    return Member(
        module,
        list(teacher.labels),
        name="student",
        preprocessing=first.preprocessing,
        architecture=arch,
    )


def distill(
    teacher: CombinedModel | Sequence[Member],
    data: Any = None,
    *,
    student: nn.Module | Member | None = None,
    init: Literal["member", "scratch"] = "member",
    union: str = "concat",
    union_params: dict[str, Any] | None = None,
    temperature: float = 4.0,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 3e-3,
    config: TrainConfig | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> CombinedModel:
    """Distil ``teacher`` into one student over its labels, from unlabeled ``data``.

    Args:
        teacher: a combined model, or members combined first with ``union``/``union_params``
            (a union method that needs data gets ``data``).
        data: unlabeled inputs (tensor, ndarray, Dataset or image folder) of the teacher's
            input shape; in-distribution, or any proxy images.
        student: a module (its output: one logit per teacher label, in ``teacher.labels``
            order, on inputs preprocessed like the first member's) or a Member; default: the
            first member's architecture with a new head, from its weights (``init='member'``)
            or fresh (``'scratch'``).
        temperature: softens both distributions; the loss is ``T² · KL(teacher ‖ student)``.
        config: the engine's settings (checkpoints, resume, schedule); ``epochs``,
            ``batch_size``, ``lr`` and ``seed`` fill it when it is not given.
    """
    if data is None:
        raise DataError(
            "distillation needs unlabeled inputs (data=): in-distribution or proxy images"
        )
    if not isinstance(teacher, CombinedModel):
        from netmeld.meld import meld
        from netmeld.methods import get_method

        info = get_method(union)
        teacher = meld(
            list(teacher),
            union,
            data if info.data != "none" else None,
            params=union_params,
            seed=seed,
            progress=progress,
        )
    inputs = load_data(data, teacher.input_shape, what="distillation data").inputs
    if len(inputs) == 0:
        raise DataError("distillation needs unlabeled inputs, got none")
    if temperature <= 0:
        raise DataError(f"temperature must be > 0, got {temperature}")
    targets = _teacher_logits(teacher, inputs)
    labels = list(teacher.labels)
    if student is None:
        member = _default_student(teacher, init)
    elif isinstance(student, Member):
        member = student
    else:
        first = teacher.members[0]
        member = Member(
            copy.deepcopy(student), labels, name="student", preprocessing=first.preprocessing
        )
    if list(member.labels) != labels:
        raise MemberError(
            f"the student's labels {list(member.labels)[:5]} differ from the teacher's "
            f"{labels[:5]}; the student must predict the union in the teacher's order"
        )
    prep = Preprocess(teacher.input_shape, member.preprocessing)
    with torch.no_grad():
        x = prep(inputs)
        out = member.module.eval()(x[:2])
    if out.shape[-1] != len(labels):
        raise MemberError(
            f"the student outputs {out.shape[-1]} logits, the teacher has {len(labels)} labels"
        )
    cfg = config or TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    if config is not None and seed != cfg.seed:
        cfg = replace(cfg, seed=seed)
    t = temperature

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, tb = batch
        s = model(xb)
        return F.kl_div(
            F.log_softmax(s / t, dim=1),
            F.log_softmax(tb / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)

    module = member.module
    for p in module.parameters():
        p.requires_grad_(True)
    train(
        module,
        step,
        len(x),
        tensor_batches(x, targets),
        cfg,
        device=device,
        progress=progress,
        description="distilling",
    )
    module.cpu().eval()
    model = CombinedModel(
        [member], input_shape=teacher.input_shape, feature_names=teacher.feature_names
    )
    model.method = {
        "name": "distill",
        "params": {
            "temperature": temperature,
            "epochs": cfg.epochs,
            "init": init,
            "examples": len(x),
        },
        "teacher": {"members": teacher.member_names, "method": teacher.method.get("name")},
    }
    return model
