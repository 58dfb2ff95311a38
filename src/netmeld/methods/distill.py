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
import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netmeld._progress import track
from netmeld.data import Stream, open_data
from netmeld.engine import TrainConfig, resolve_config, small_fit, train
from netmeld.errors import DataError, MemberError
from netmeld.members.graph import find_head
from netmeld.members.member import Architecture, Member
from netmeld.model.combined import CombinedModel
from netmeld.model.inputs import Preprocess
from netmeld.runtime import on_device, resolve_device, seeded


@torch.no_grad()
@torch.no_grad()
def _teacher_pass(
    teacher: CombinedModel,
    inputs: Stream,
    device: str | torch.device | None,
    progress: bool | None,
    features: bool = False,
) -> torch.Tensor:
    """The teacher's logits (or with ``features`` its members' head inputs side by side) over
    the inputs, a batch at a time on ``device``."""
    teacher.eval()
    dev = resolve_device(device)
    parts = []
    with on_device(teacher, dev):
        for batch in inputs.batches(progress=progress, description="running the teacher"):
            x = batch.inputs.to(dev)
            out = teacher.run_members(x)
            parts.append((out.router_input if features else teacher.logits_from(out, x)).cpu())
    return torch.cat(parts)


def _default_student(
    teacher: CombinedModel,
    init: Literal["member", "merge", "scratch"],
    inputs: Stream,
    seed: int,
) -> Member:
    """The first member's architecture with a new head over the union (fresh parts drawn from
    ``seed``), started from that member's body, the members' merged bodies or from scratch."""
    first = teacher.members[0]
    if first.architecture is None:
        raise MemberError(
            f"member {first.name!r} has no architecture to copy for the student; pass student="
        )
    n = len(teacher.labels)
    arch = first.architecture
    if "num_classes" in arch.kwargs:
        arch = Architecture(arch.spec, {**arch.kwargs, "num_classes": n})
    with seeded(seed):
        module = arch.build(num_classes=n)
    if init in ("member", "merge"):
        source = first
        if init == "merge":  # the members' bodies merged in weight space (aligned if needed)
            from netmeld.methods.merge import merge_members

            if len(teacher.members) < 2:
                raise MemberError("init='merge' needs at least two teacher members")
            sample = inputs.gather(torch.arange(min(2048, len(inputs))))
            merged = merge_members(teacher.members, "linear", data=sample, seed=seed)
            source = merged.members[0]
        head = find_head(source)
        body = {k: v for k, v in source.module.state_dict().items() if not k.startswith(head + ".")}
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


def _tv(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def synthesize(
    teacher: CombinedModel,
    n: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 64,
    bn_weight: float = 1.0,
    tv_weight: float = 0.05,
    l2_weight: float = 1e-4,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """``n`` inputs made from nothing but the teacher (DeepInversion, Yin et al. 2020): random
    noise optimised so that the teacher predicts a random union label for each with confidence
    while the statistics of every BatchNorm layer's input match that layer's running mean and
    variance, with total-variation and L2 priors. Inputs are raw (``[0, 1]``, the teacher's
    input shape). Without BatchNorm layers only the priors constrain the inputs (a warning)."""
    import warnings

    if n < 1:
        raise DataError(f"data-free distillation needs a budget of at least 1 input, got {n}")
    teacher.eval()
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    norms = [
        m
        for m in teacher.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    if not norms:
        warnings.warn(
            "the teacher has no BatchNorm statistics: data-free inputs are constrained only by "
            "its predictions and smoothness priors; prefer proxy images",
            stacklevel=2,
        )
    terms: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        assert isinstance(mod, nn.modules.batchnorm._BatchNorm)
        rm, rv = mod.running_mean, mod.running_var
        assert rm is not None and rv is not None
        terms.append((mean - rm).norm() + (var - rv).norm())

    def inversion_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        terms.clear()
        loss = F.cross_entropy(teacher(x), y)
        if terms:
            loss = loss + bn_weight * torch.stack(terms).mean()
        return loss + tv_weight * _tv(x) + l2_weight * (x * x).mean()

    handles = [m.register_forward_hook(hook) for m in norms]
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        batches = range(0, n, batch_size)
        for start in track(batches, "synthesizing inputs", total=len(batches), enabled=progress):
            size = min(batch_size, n - start)
            x = torch.rand(size, *teacher.input_shape, generator=gen)
            y = torch.randint(len(teacher.labels), (size,), generator=gen)
            loss = functools.partial(inversion_loss, x, y)
            small_fit([x], loss, steps, lr=lr, after_step=functools.partial(x.clamp_, 0, 1))
            out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.cat(out)


def _teacher_features(
    teacher: CombinedModel,
    inputs: Stream,
    device: str | torch.device | None,
    progress: bool | None,
) -> torch.Tensor:
    """The teachers' penultimate features, side by side and standardised per column."""
    feats = _teacher_pass(teacher, inputs, device, progress, features=True)
    return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)


class _Hinted(nn.Module):
    """The student with a linear projection of its penultimate features onto the teachers'
    (FitNets-style hints; Romero et al. 2015); the projection is dropped after training."""

    def __init__(self, student: nn.Module, member: Member, teacher_dim: int) -> None:
        super().__init__()
        self.student = student
        head = student.get_submodule(find_head(member))
        assert isinstance(head, nn.Linear)
        self.project = nn.Linear(head.in_features, teacher_dim)
        self._features: list[torch.Tensor] = []
        self.handle = head.register_forward_pre_hook(
            lambda _m, args: self._features.append(args[0])
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._features.clear()
        logits = self.student(x)
        return logits, self.project(self._features[-1].flatten(1))


# How a student trains unless told otherwise: ``netmeld.distill`` and ``netmeld distill``
# recipes both read these.
SCHEDULE = TrainConfig(epochs=50, batch_size=64, lr=3e-3, weight_decay=1e-4)


def _teacher_and_inputs(
    teacher: CombinedModel | Sequence[Member],
    data: Any,
    union: str,
    union_params: dict[str, Any] | None,
    data_free: int | None,
    synthesis: dict[str, Any] | None,
    seed: int,
    progress: bool | None,
) -> tuple[CombinedModel, Stream]:
    """The teacher (members combined with ``union`` first) and the inputs distilled on:
    ``data`` (read batch by batch), or ``data_free`` inputs synthesized from the teacher."""
    if not isinstance(teacher, CombinedModel):
        from netmeld.methods._registry import get_method
        from netmeld.methods.meld import meld

        info = get_method(union)
        teacher = meld(
            list(teacher),
            union,
            data if info.data != "none" else None,
            params=union_params,
            seed=seed,
            progress=progress,
        )
    if data is None:
        assert data_free
        made = synthesize(
            teacher, int(data_free), seed=seed, progress=progress, **(synthesis or {})
        )
        return teacher, open_data(made, teacher.input_shape, what="synthesized inputs")
    return teacher, open_data(data, teacher.input_shape, what="distillation data")


def _student(
    teacher: CombinedModel,
    student: nn.Module | Member | None,
    init: Literal["member", "merge", "scratch"],
    inputs: Stream,
    seed: int,
) -> tuple[Member, Preprocess]:
    """The student member (checked to predict the teacher's labels in its order) and its
    preprocessing of the teacher's inputs."""
    labels = list(teacher.labels)
    if student is None:
        member = _default_student(teacher, init, inputs, seed)
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
        out = member.module.eval()(prep(inputs.gather(torch.arange(min(2, len(inputs))))))
    if out.shape[-1] != len(labels):
        raise MemberError(
            f"the student outputs {out.shape[-1]} logits, the teacher has {len(labels)} labels"
        )
    return member, prep


def _fit_student(
    member: Member,
    prep: Preprocess,
    targets: torch.Tensor,
    teacher: CombinedModel,
    inputs: Stream,
    temperature: float,
    hint_weight: float,
    cfg: TrainConfig,
    device: str | None,
    progress: bool | None,
) -> None:
    """Train the student on ``T² · KL(teacher ‖ student)`` over the inputs (each batch read
    and preprocessed for the student when it is drawn; ``targets`` the teacher's logits), plus
    the feature hint, on the engine."""
    t = temperature
    module = member.module
    for p in module.parameters():
        p.requires_grad_(True)
    trained: nn.Module = module
    extra: list[torch.Tensor] = []
    if hint_weight > 0:
        teacher_feats = _teacher_features(teacher, inputs, device, progress)
        with seeded(cfg.seed):  # the projection's start
            trained = _Hinted(module, member, teacher_feats.shape[1])
        extra = [teacher_feats]

    @torch.no_grad()
    def batches(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (prep(inputs.gather(idx)), targets[idx], *(t[idx] for t in extra))

    def step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        xb, tb = batch[0], batch[1]
        s = model(xb)
        hint = None
        if hint_weight > 0:
            s, projected = s
            hint = F.mse_loss(projected, batch[2])
        loss = F.kl_div(
            F.log_softmax(s / t, dim=1),
            F.log_softmax(tb / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        return loss if hint is None else loss + hint_weight * hint

    train(
        trained,
        step,
        len(inputs),
        batches,
        cfg,
        device=device,
        progress=progress,
        description="distilling",
    )
    if isinstance(trained, _Hinted):
        trained.handle.remove()


def distill(
    teacher: CombinedModel | Sequence[Member],
    data: Any = None,
    *,
    student: nn.Module | Member | None = None,
    init: Literal["member", "merge", "scratch"] = "member",
    union: str = "concat",
    union_params: dict[str, Any] | None = None,
    temperature: float = 4.0,
    hint_weight: float = 0.0,
    epochs: int = SCHEDULE.epochs,
    batch_size: int = SCHEDULE.batch_size,
    lr: float = SCHEDULE.lr,
    config: TrainConfig | None = None,
    data_free: int | None = None,
    synthesis: dict[str, Any] | None = None,
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
            first member's architecture with a new head, from its weights (``init='member'``),
            from the members' bodies merged in weight space (``'merge'``: ``linear`` after
            permutation alignment where they come from different initialisations) or fresh
            (``'scratch'``).
        temperature: softens both distributions; the loss is ``T² · KL(teacher ‖ student)``.
        hint_weight: adds ``hint_weight · MSE`` between a learnt linear projection of the
            student's penultimate features and the teachers' (standardised, side by side).
        config: the engine's settings (checkpoints, resume, schedule); ``epochs``,
            ``batch_size``, ``lr`` and ``seed`` fill it when it is not given.
        data_free: with no ``data``, synthesize this many inputs from the teachers' BatchNorm
            statistics (:func:`synthesize`, DeepInversion); ``synthesis`` sets its options.
    """
    if data is None and not data_free:
        raise DataError(
            "distillation needs unlabeled inputs (data=): in-distribution or proxy images, "
            "or data_free=N to synthesize N inputs from the teachers"
        )
    teacher, inputs = _teacher_and_inputs(
        teacher, data, union, union_params, data_free, synthesis, seed, progress
    )
    if temperature <= 0:
        raise DataError(f"temperature must be > 0, got {temperature}")
    targets = _teacher_pass(teacher, inputs, device, progress)
    member, prep = _student(teacher, student, init, inputs, seed)
    cfg = resolve_config(
        config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, defaults=SCHEDULE
    )
    _fit_student(
        member, prep, targets, teacher, inputs, temperature, hint_weight, cfg, device, progress
    )
    member.module.cpu().eval()
    model = CombinedModel(
        [member], input_shape=teacher.input_shape, feature_names=teacher.feature_names
    )
    model.method = {
        "name": "distill",
        "params": {
            "temperature": temperature,
            "epochs": cfg.epochs,
            "init": init,
            "hint_weight": hint_weight,
            "examples": len(inputs),
            "data_free": data is None,
        },
        "teacher": {"members": teacher.member_names, "method": teacher.method.get("name")},
    }
    return model
