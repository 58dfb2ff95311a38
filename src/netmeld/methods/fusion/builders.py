from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import nn

from netmeld.errors import IncompatibleMembersError, LabelError, MemberError
from netmeld.members.graph import find_head
from netmeld.members.member import Architecture, Member
from netmeld.methods.fusion.parts import (
    TASK_SEPARATOR,
    WEIGHTINGS,
    HierarchicalNet,
    MultiTaskNet,
    ParallelNet,
    Part,
    _default_labels,
    _flat,
    _fused_model,
    _input_shape,
    _make_part,
    _names,
    _out_shape,
    _part_spec,
    adapter,
)
from netmeld.model.combined import CombinedModel
from netmeld.runtime import seeded

# -- builders ---------------------------------------------------------------------------------


def parallel(
    branches: Sequence[Part] | Mapping[str, Part],
    labels: Sequence[str] | None = None,
    *,
    fuse: Literal["concat", "sum", "attention", "gating"] = "concat",
    dim: int | None = None,
    inputs: Mapping[str, Sequence[int]] | None = None,
    input_shape: Sequence[int] | None = None,
    freeze: Sequence[str] = (),
    name: str = "parallel",
    seed: int = 0,
) -> CombinedModel:
    """Branches side by side, their features fused, one head over ``labels``.

    Args:
        branches: members (their bodies, with their preprocessing), architectures (fresh, head
            dropped) or feature-extracting modules; a mapping names them, else members keep
            their names and the rest are ``b0``, ``b1``, ...
        labels: the fused classifier's labels; default: the members' labels, in order.
        fuse: ``concat`` (features side by side), ``sum`` (each projected to ``dim``, added),
            ``attention`` (projected, weighted by a softmax over per-branch scores) or
            ``gating`` (weighted by a softmax gate on all branches' features).
        dim: the width branches are projected to (``sum``/``attention``/``gating``); default
            the narrowest branch's.
        inputs: per branch, the indices of the input's dimension 1 it reads (columns of a
            table, channels of an image); default: all of it. Different inputs per branch.
        input_shape: the fused model's input shape; default: the members' common shape.
        freeze: parts (``"a"``) or blocks (``"a.layer1"``) not to train.
        seed: draws the starting weights of fresh architectures and of the new layers
            (projections, attention, gate, head); the caller's random state is left as it was.
    """
    named = _names(branches)
    if len(named) < 1:
        raise IncompatibleMembersError("parallel needs at least one branch")
    shape = _input_shape(list(named.values()), input_shape)
    labels = list(labels) if labels is not None else _default_labels(list(named.values()))
    if not labels:
        raise LabelError("parallel: pass labels= (no branch is a member with labels)")
    select = {k: [int(i) for i in v] for k, v in (inputs or {}).items()}
    unknown = sorted(set(select) - set(named))
    if unknown:
        raise IncompatibleMembersError(f"inputs name unknown branches {unknown}; {list(named)}")
    for n, p in named.items():  # a table member's own column positions, unless inputs= says
        columns = p.preprocessing.columns if isinstance(p, Member) else None
        if columns is not None and n not in select:
            if not all(isinstance(c, int) for c in columns):
                raise IncompatibleMembersError(
                    f"branch {n!r} reads columns by name {list(columns)}; give their positions "
                    "in the fused input with inputs={name: [...]}"
                )
            select[n] = [int(c) for c in columns]
    specs = [_part_spec(p, n) for n, p in named.items()]
    with seeded(seed):  # fresh architectures and the new layers
        modules = {
            n: _make_part(p, s, shape, select.get(n))
            for (n, p), s in zip(named.items(), specs, strict=True)
        }
        dims = {n: _flat(_out_shape(m, shape, f"branch {n!r}")) for n, m in modules.items()}
        net = ParallelNet(modules, dims, len(labels), fuse, dim)
    net.freeze(freeze)
    options = {"fuse": fuse, "dim": dim, "inputs": select or None}
    return _fused_model(
        net,
        labels,
        shape,
        specs,
        options,
        name,
        "head",
        {"fuse": fuse, "branches": list(named), "freeze": list(freeze), "inputs": select or None},
    )


def _second_network(
    second: Part,
    labels: list[str],
    second_input_shape: Sequence[int] | None,
    got: tuple[int, ...],
) -> tuple[Member, nn.Module, tuple[int, ...]]:
    """The second network of :func:`hierarchical` as a member over ``labels``, its module (a
    copy, trainable) and the input shape it reads (``got``, the first network's features,
    where nothing else says)."""
    if isinstance(second, Member):
        if len(second.labels) != len(labels):
            raise LabelError(
                f"hierarchical: the second member {second.name!r} has {len(second.labels)} "
                f"labels, {len(labels)} given"
            )
        module = copy.deepcopy(second.module).requires_grad_(True)
        return second, module, tuple(second_input_shape or second.preprocessing.input_shape)
    if isinstance(second, (str, Architecture)):
        arch = Architecture.parse(second)
        module = arch.build(num_classes=len(labels))
        member = Member(
            module,
            labels,
            name="second",
            preprocessing={"input_shape": (1,)},
            architecture=arch,
        )
        if second_input_shape is None:
            raise IncompatibleMembersError(
                "hierarchical: pass second_input_shape= (what the fresh second network reads)"
            )
        return member, module, tuple(second_input_shape)
    module = copy.deepcopy(second).requires_grad_(True)
    member = Member(module, labels, name="second", preprocessing={"input_shape": (1,)})
    return member, module, tuple(second_input_shape) if second_input_shape is not None else got


def hierarchical(
    first: Part,
    second: Part,
    labels: Sequence[str] | None = None,
    *,
    cut: str | None = None,
    second_input_shape: Sequence[int] | None = None,
    adapt: Literal["auto", "none"] = "auto",
    input_shape: Sequence[int] | None = None,
    freeze: Sequence[str] = (),
    name: str = "hierarchical",
    seed: int = 0,
) -> CombinedModel:
    """``first``'s features feed ``second``, which classifies.

    Args:
        first: a member (its body up to the head's input, or up to submodule ``cut``), an
            architecture or a feature-extracting module.
        second: a member, an architecture (fresh, with ``len(labels)`` outputs) or a module
            whose output is logits over ``labels``. Its own preprocessing is not applied: it
            reads features.
        cut: where to take ``first``'s features (a submodule name, e.g. ``"layer2"``).
        second_input_shape: what ``second`` reads; default: a member's input shape.
        adapt: ``auto`` inserts a 1x1 conv (channels), a bilinear resize (size) or a linear
            projection (vectors) where the shapes differ, listed in ``model.method['params']
            ['adapters']``; ``none`` raises an error naming both shapes instead.
        freeze: ``"first"``, ``"second"``, ``"adapt"`` or blocks (``"first.layer1"``).
        seed: draws the starting weights of fresh architectures and of the adapters; the
            caller's random state is left as it was.
    """
    shape = _input_shape([first], input_shape)
    if labels is None:
        if not isinstance(second, Member):
            raise LabelError("hierarchical: pass labels= (the second network is not a member)")
        labels = list(second.labels)
    labels = list(labels)
    first_spec = _part_spec(first, "first")
    with seeded(seed):  # fresh architectures and the adapters
        first_part = _make_part(first, first_spec, shape, None, cut=cut)
        got = _out_shape(first_part, shape, "the first network")
        second_member, second_module, want = _second_network(
            second, labels, second_input_shape, got
        )
        adapt_module, notes = adapter(got, want, adapt)
    second_spec = _part_spec(second_member, "second")
    if second_spec is not None:
        second_spec["preprocessing"] = None
    out = _out_shape(
        nn.Sequential(adapt_module, second_module), got, "the second network on adapted features"
    )
    if out != (len(labels),):
        raise IncompatibleMembersError(
            f"the second network outputs shape {out}, expected ({len(labels)},) logits over "
            f"{len(labels)} labels"
        )
    net = HierarchicalNet(first_part, adapt_module, second_module)
    net.freeze(freeze)
    head = "second." + find_head(
        Member(
            second_module,
            labels,
            name="second",
            preprocessing={"input_shape": (1,)},
            head=second_member.head,
        )
    )
    return _fused_model(
        net,
        labels,
        shape,
        [first_spec, second_spec],
        {"cut": cut, "second_input_shape": list(want)},
        name,
        head,
        {
            "first_features": list(got),
            "second_input": list(want),
            "adapters": notes,
            "cut": cut,
            "freeze": list(freeze),
        },
    )


def multitask(
    trunk: Part,
    tasks: Mapping[str, Sequence[str]],
    *,
    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed",
    loss_weights: Mapping[str, float] | None = None,
    alpha: float = 1.5,
    input_shape: Sequence[int] | None = None,
    freeze: Sequence[str] = (),
    name: str = "multitask",
    seed: int = 0,
) -> CombinedModel:
    """A shared trunk with a linear head per task; labels are ``"task/label"``.

    Args:
        trunk: a member (its body), an architecture (fresh, head dropped) or a module.
        tasks: each task's labels, in order.
        weighting: how :func:`fit` weighs the tasks' losses: ``fixed`` (``loss_weights``,
            default 1 each), ``uncertainty`` (learned ``exp(-s_t) L_t + s_t / 2``; Kendall et
            al. 2018) or ``gradnorm`` (learned weights that balance the tasks' gradient norms
            on the trunk's last layer at training rates ``r_t^alpha``; Chen et al. 2018).
        freeze: ``"trunk"``, ``"heads"`` or trunk blocks (``"trunk.layer1"``).
        seed: draws the starting weights of a fresh trunk and of the heads; the caller's random
            state is left as it was.
    """
    if not tasks:
        raise LabelError("multitask needs at least one task")
    if weighting not in WEIGHTINGS:
        raise MemberError(f"weighting {weighting!r}: choose one of {list(WEIGHTINGS)}")
    for task, task_labels in tasks.items():
        if TASK_SEPARATOR in task or not task:
            raise LabelError(f"task name {task!r}: must be non-empty, without '/'")
        if not task_labels:
            raise LabelError(f"task {task!r} has no labels")
    weights = {t: float((loss_weights or {}).get(t, 1.0)) for t in tasks}
    unknown = sorted(set(loss_weights or {}) - set(tasks))
    if unknown:
        raise LabelError(f"loss_weights name unknown tasks {unknown}; tasks: {list(tasks)}")
    shape = _input_shape([trunk], input_shape)
    spec = _part_spec(trunk, "trunk")
    sizes = {t: len(v) for t, v in tasks.items()}
    with seeded(seed):  # a fresh trunk and the heads
        part = _make_part(trunk, spec, shape, None)
        dim = _flat(_out_shape(part, shape, "the trunk"))
        net = MultiTaskNet(part, dim, sizes)
    net.freeze(freeze)
    labels = [f"{t}{TASK_SEPARATOR}{label}" for t, v in tasks.items() for label in v]
    return _fused_model(
        net,
        labels,
        shape,
        [spec],
        {"tasks": sizes},
        name,
        "heads",
        {
            "tasks": {t: list(v) for t, v in tasks.items()},
            "weighting": weighting,
            "loss_weights": weights,
            "alpha": alpha,
            "freeze": list(freeze),
        },
    )
