"""Members merged in weight space into one body, with their heads kept and unioned.

:func:`merge_members` merges the bodies of members of one architecture with a kernel of
:mod:`netmeld.ops.merge` (members fine-tuned from a common base directly; members from
different initialisations after permutation alignment); :func:`zip_members` merges two
members trained on disjoint tasks ZipIt!-style, fully or for their first layers only. Either
way each member keeps its own head over its own labels, the merged members share their merged
layers, and the result is the usual :class:`~netmeld.combined.CombinedModel`, with the heads
combined by any union-head method (``union=``). Tensors every member has bit for bit (a
frozen part of a common base) are kept as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netmeld._progress import track
from netmeld.data import load_data
from netmeld.errors import DataError, IncompatibleMembersError, MethodError
from netmeld.io.checkpoint_merge import check_same_tensors, merge_state_dicts, shapes_of
from netmeld.members.graph import find_head
from netmeld.members.member import Member, read_state_dict
from netmeld.methods.permutation import (
    PermutationSpec,
    correlation_stats,
    permutation_spec,
    permute_state,
    repair,
    reset_batchnorm,
)
from netmeld.model.combined import CombinedModel
from netmeld.model.inputs import Preprocess
from netmeld.ops.matching import (
    activation_matching,
    weight_matching,
    zip_matching,
)
from netmeld.ops.merge import get_kernel

AlignChoice = Literal["auto", "weight", "activation", "none"]


# -- helpers --------------------------------------------------------------------------------


def _check_members(members: Sequence[Member]) -> None:
    if len(members) < 2:
        raise IncompatibleMembersError("weight merging needs at least two members")
    first = members[0]
    for m in members[1:]:
        if type(m.module) is not type(first.module):
            raise IncompatibleMembersError(
                f"members {first.name!r} and {m.name!r} have different architectures "
                f"({type(first.module).__name__} and {type(m.module).__name__})"
            )
        if m.preprocessing.input_shape != first.preprocessing.input_shape or (
            m.preprocessing.mean,
            m.preprocessing.std,
        ) != (first.preprocessing.mean, first.preprocessing.std):
            raise IncompatibleMembersError(
                f"members {first.name!r} and {m.name!r} preprocess their inputs differently; "
                "merged layers need one input"
            )


def _head_keys(member: Member) -> tuple[str, set[str]]:
    head = find_head(member)
    keys = {k for k in member.module.state_dict() if k.startswith(head + ".")}
    return head, keys


def _body_states(members: Sequence[Member]) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Each member's body tensors (no head), checked for equal names and shapes."""
    states = []
    for m in members:
        _, head = _head_keys(m)
        states.append({k: v for k, v in m.module.state_dict().items() if k not in head})
    check_same_tensors(
        [(f"member {m.name!r}", shapes_of(st)) for m, st in zip(members, states, strict=True)]
    )
    return states, list(states[0])


def _prepared(member: Member, data: Any) -> torch.Tensor:
    """Raw ``data`` (tensor, ndarray, folder, ...) preprocessed for ``member``."""
    shape = member.preprocessing.input_shape
    inputs = load_data(data, shape, what="merge data").inputs
    if len(inputs) == 0:
        raise DataError("merge data is empty")
    with torch.no_grad():
        return Preprocess(shape, member.preprocessing)(inputs)


def _load_base(base: Any, like: Member) -> dict[str, torch.Tensor]:
    if isinstance(base, Member):
        return dict(base.module.state_dict())
    if isinstance(base, nn.Module):
        return dict(base.state_dict())
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, (str, Path)):
        return read_state_dict(base)
    raise MethodError(
        f"base: expected a Member, nn.Module, state dict or checkpoint path, got "
        f"{type(base).__name__} (merging member {like.name!r})"
    )


def body_similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of two bodies' weights (BatchNorm statistics left out): near 1 for
    models fine-tuned from one base, near 0 for independent initialisations."""
    keys = [
        k
        for k, v in a.items()
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))
    ]
    va = torch.cat([a[k].double().flatten() for k in keys])
    vb = torch.cat([b[k].double().flatten() for k in keys])
    return float((va @ vb) / (va.norm() * vb.norm()).clamp_min(1e-12))


def _rebuild(member: Member, state: Mapping[str, torch.Tensor], name: str | None = None) -> Member:
    module = copy.deepcopy(member.module)
    module.load_state_dict(dict(state))
    return Member(
        module,
        member.labels,
        name=name or member.name,
        preprocessing=member.preprocessing,
        architecture=member.architecture,
        head=member.head,
    )


def _union(
    members: list[Member],
    union: str,
    union_params: dict[str, Any] | None,
    data: Any,
    seed: int,
    progress: bool | None,
) -> CombinedModel:
    from netmeld.methods._registry import get_method
    from netmeld.methods.meld import meld

    info = get_method(union)
    return meld(
        members,
        union,
        data if info.data != "none" else None,
        params=union_params,
        seed=seed,
        progress=progress,
    )


# -- data statistics for Fisher and RegMean ------------------------------------------------


def fisher_diagonal(
    member: Member,
    inputs: torch.Tensor,
    *,
    keys: Sequence[str],
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``member``'s parameters ``keys`` on preprocessed
    ``inputs``: the mean squared per-example gradient of ``log p(y|x)`` with ``y`` drawn from
    the model's own prediction (no labels needed)."""
    from torch.func import functional_call, grad, vmap

    module = member.module
    was_training = module.training
    module.eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    wanted = [k for k in keys if k in params]
    fisher = {k: torch.zeros_like(params[k]) for k in wanted}
    gen = torch.Generator().manual_seed(seed)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size]
        with torch.no_grad():
            probs = module(x).softmax(1)
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        grads = per_example(params, x, y)
        for k in wanted:
            fisher[k] += (grads[k] ** 2).sum(0)
    module.train(was_training)
    return {k: v / len(inputs) for k, v in fisher.items()}


def _add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


@torch.no_grad()
def input_grams(
    member: Member, inputs: torch.Tensor, *, keys: Sequence[str], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """``X^T X`` of the inputs of every Linear and (ungrouped) Conv2d layer whose weight is in
    ``keys``: what RegMean needs. A convolution's inputs are its unfolded patches."""
    module = member.module
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, sub in module.named_modules():
        key = f"{name}.weight"
        if key not in keys:
            continue
        if isinstance(sub, nn.Linear):

            def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, key: str = key) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                _add(grams, key, x.T @ x)

        elif isinstance(sub, nn.Conv2d) and sub.groups == 1 and isinstance(sub.padding, tuple):

            def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, key: str = key) -> None:
                assert isinstance(_m, nn.Conv2d) and isinstance(_m.padding, tuple)
                patches = F.unfold(args[0], _m.kernel_size, _m.dilation, _m.padding, _m.stride)
                x = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
                _add(grams, key, x.T @ x)

        else:
            continue
        handles.append(sub.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            module(inputs[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return grams


# -- merging members that share an architecture -------------------------------------------


def _align_to_first(
    members: Sequence[Member],
    states: list[dict[str, torch.Tensor]],
    method: Literal["weight", "activation"],
    prepared: torch.Tensor | None,
    seed: int,
) -> tuple[list[Member], PermutationSpec]:
    first = members[0]
    example = (
        prepared[:2] if prepared is not None else torch.zeros(2, *first.preprocessing.input_shape)
    )
    spec = permutation_spec(first.module, example, what=f"member {first.name!r}")
    body_axes = {k: v for k, v in spec.axes.items() if k in states[0]}
    out = [first]
    for m, state in zip(members[1:], states[1:], strict=True):
        if method == "weight":
            perms = weight_matching(body_axes, spec.sizes, states[0], state, seed=seed)
        else:
            if prepared is None:
                raise DataError("activation matching needs data (inputs, no labels)")
            stats = correlation_stats(first.module, m.module, spec, prepared)
            perms = {g: activation_matching(s.correlation()) for g, s in stats.items()}
        out.append(_rebuild(m, permute_state(m.module.state_dict(), spec, perms)))
    return out, spec


def merge_members(
    members: Sequence[Member],
    method: str = "linear",
    *,
    base: Any = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    data: Any = None,
    align: AlignChoice = "auto",
    union: str = "concat",
    union_params: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> CombinedModel:
    """Merge the members' bodies with the kernel ``method`` into one body; keep each member's
    head and combine the heads with the union-head method ``union``.

    Args:
        members: members of one architecture (their heads may differ: other label sets).
        method: a kernel of :data:`netmeld.ops.merge.KERNELS` (``linear``, ``slerp``,
            ``task-arithmetic``, ``ties``, ``dare``, ``dare-ties``, ``breadcrumbs``,
            ``fisher``, ``regmean``).
        base: the common base the members were fine-tuned from (a Member, module, state dict
            or checkpoint path); needed by the task-vector kernels.
        weights, params: the kernel's per-model weights and parameters.
        data: inputs (labels optional) for ``fisher``/``regmean``, activation matching, the
            BatchNorm reset after merging, and a union method that needs data.
        align: permute members 2.. onto member 1 first: ``weight`` (no data), ``activation``
            (data), ``none``, or ``auto``: weight matching when the bodies look independently
            initialised (cosine similarity below 0.5) and no base is given.
        union, union_params: how the kept heads are combined (any registered union method).
    """
    members = list(members)
    _check_members(members)
    kernel = get_kernel(method)
    states, keys = _body_states(members)
    prepared = _prepared(members[0], data) if data is not None else None
    similarity = body_similarity(states[0], states[1])
    if align == "auto":
        align = "weight" if similarity < 0.5 and base is None else "none"
    spec = None
    if align in ("weight", "activation"):
        if base is not None:
            raise MethodError(
                "align: members fine-tuned from a common base are already aligned; "
                "pass align='none' with base="
            )
        members, spec = _align_to_first(members, states, align, prepared, seed)
        states, keys = _body_states(members)
    elif align != "none":
        raise MethodError(f"align must be 'auto', 'weight', 'activation' or 'none', got {align!r}")
    base_state = None
    if base is not None:
        full = _load_base(base, members[0])
        missing = [k for k in keys if k not in full]
        if missing:
            raise IncompatibleMembersError(
                f"tensor {missing[0]!r} of the members' bodies is not in the base model"
            )
        base_state = {k: full[k] for k in keys}
    shared = [k for k in keys if all(torch.equal(s[k], states[0][k]) for s in states[1:])]
    differing = [k for k in keys if k not in shared]
    merged: dict[str, torch.Tensor] = {}
    if kernel.needs != "none":
        if prepared is None:
            raise DataError(f"merge method {method!r} needs data (inputs; labels are not needed)")
        stat_fn = fisher_diagonal if kernel.needs == "fisher" else input_grams
        extras = [
            stat_fn(m, prepared, keys=differing)
            for m in track(members, f"{kernel.needs} statistics", enabled=progress)
        ]
        with_extra = [k for k in differing if all(k in e for e in extras)]
        merged |= merge_state_dicts(
            method,
            states,
            weights=weights,
            params=params,
            extra={k: [e[k] for e in extras] for k in with_extra},
            names=with_extra,
        )
        rest = [k for k in differing if k not in with_extra]
        plain = merge_state_dicts("linear", states, weights=weights, names=rest)
        merged |= {k: plain[k] for k in rest}
    else:
        merged = merge_state_dicts(
            method, states, base=base_state, weights=weights, params=params, names=differing
        )
    body = {k: states[0][k] if k in shared else merged[k] for k in keys}
    rebuilt = []
    for m in members:
        state = dict(m.module.state_dict())
        state.update(body)
        rebuilt.append(_rebuild(m, state))
    if prepared is not None:
        if spec is not None:  # aligned members: REPAIR (a BatchNorm reset where there is one)
            repair(
                rebuilt[0].module,
                [m.module for m in members],
                spec,
                prepared,
                weights=None if weights is None else [w / sum(weights) for w in weights],
            )
        else:
            reset_batchnorm(rebuilt[0].module, prepared)
        stats = {k: v for k, v in rebuilt[0].module.state_dict().items() if k in keys}
        for m in rebuilt[1:]:
            m.module.load_state_dict({**m.module.state_dict(), **stats})
    model = _union(rebuilt, union, union_params, data, seed, progress)
    model.method["merge"] = {
        "method": method,
        "params": dict(params or {}),
        "weights": None if weights is None else list(weights),
        "aligned": align,
        "similarity": round(similarity, 4),
        "merged_tensors": len(differing),
        "shared_tensors": len(shared),
    }
    return model


# -- ZipIt! -----------------------------------------------------------------------------------


def zip_layers(spec: PermutationSpec) -> list[int]:
    """The valid partial-zip depths: ``k`` such that every group produced by the first ``k``
    weighted layers is produced by none after them (the last is a full zip)."""
    producers: dict[str, list[int]] = {}
    for i, (_, g) in enumerate(spec.layers):
        if g is not None:
            producers.setdefault(g, []).append(i)
    hidden = [i for i, (_, g) in enumerate(spec.layers) if g is not None]
    valid = []
    for k in range(1, len(hidden) + 1):
        inside = set(hidden[:k])
        groups = {spec.layers[i][1] for i in inside}
        if all(set(producers[g]) <= inside for g in groups if g is not None):
            valid.append(k)
    return valid


def _apply_side(
    tensor: torch.Tensor,
    axes: Sequence[tuple[str, int] | None],
    out_mats: Mapping[str, torch.Tensor],
    in_mats: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Contract axis 0 with ``out_mats[g]`` (``n_out, n``) and axes >= 1 with ``in_mats[g]``
    (``n, n_out``), a channel repeated ``repeat`` times staying with its channel."""
    t = tensor.double()
    for axis, desc in enumerate(axes):
        if desc is None:
            continue
        group, repeat = desc
        mats = out_mats if axis == 0 else in_mats
        if group not in mats:
            continue
        mat = mats[group]
        if axis != 0:
            mat = mat.T  # (n_out, n): rows index the new units
        moved = t.movedim(axis, 0)
        rest = moved.shape[1:]
        n = moved.shape[0] // repeat
        blocks = moved.reshape(n, repeat, -1)
        new = torch.einsum("on,nrk->ork", mat, blocks).reshape(mat.shape[0] * repeat, *rest)
        t = new.movedim(0, axis)
    return t.to(tensor.dtype)


def zip_members(
    members: Sequence[Member],
    data: Any,
    *,
    layers: int | None = None,
    alpha: float = 0.5,
    union: str = "concat",
    union_params: dict[str, Any] | None = None,
    repair_stats: bool = True,
    seed: int = 0,
    progress: bool | None = None,
) -> CombinedModel:
    """ZipIt! (Stoica et al. 2024): merge two members trained on different tasks (any labels)
    by pairing their most correlated features, within and across the models, on unlabeled
    ``data``; their heads are kept and combined with ``union``.

    Args:
        layers: zip only the first ``layers`` weighted layers and run the rest per member on
            the unmerged features (partial zipping: more accuracy, more compute); must be one
            of :func:`zip_layers`' depths; default: everything but the heads.
        alpha: the share of a layer's units that may be paired within one model (ZipIt!'s β).
        repair_stats: reset BatchNorm statistics (or REPAIR the layers of a network without
            BatchNorm) on ``data`` after zipping.
    """
    members = list(members)
    if len(members) != 2:
        raise IncompatibleMembersError(f"zip merges exactly 2 members, got {len(members)}")
    _check_members(members)
    _, keys = _body_states(members)
    prepared = _prepared(members[0], data)
    a, b = members
    spec = permutation_spec(a.module, prepared[:2], what=f"member {a.name!r}")
    valid = zip_layers(spec)
    if not valid:
        raise MethodError(f"member {a.name!r} has no hidden layer to zip")
    depth = valid[-1] if layers is None else layers
    if depth not in valid:
        raise MethodError(
            f"cannot zip the first {depth} layers of member {a.name!r}: a group of units would "
            f"be half merged; valid depths: {valid}"
        )
    hidden = [i for i, (_, g) in enumerate(spec.layers) if g is not None]
    zipped_layers = {spec.layers[i][0] for i in hidden[:depth]}
    zipped_groups = {g for i in hidden[:depth] if (g := spec.layers[i][1]) is not None}
    stats = correlation_stats(a.module, b.module, spec, prepared, groups=zipped_groups)
    mats = {g: zip_matching(s.joint_correlation(), alpha=alpha) for g, s in stats.items()}
    n = {g: spec.sizes[g] for g in zipped_groups}
    side_out = [
        {g: m[:, : n[g]] for g, (m, _) in mats.items()},
        {g: m[:, n[g] :] for g, (m, _) in mats.items()},
    ]
    side_in = [
        {g: u[: n[g]] for g, (_, u) in mats.items()},
        {g: u[n[g] :] for g, (_, u) in mats.items()},
    ]
    full_states = [dict(m.module.state_dict()) for m in members]
    new_states: list[dict[str, torch.Tensor]] = [dict(s) for s in full_states]
    for key in full_states[0]:
        axes = spec.axes.get(key)
        if axes is None or not full_states[0][key].is_floating_point():
            continue
        # a tensor whose output units are zipped is merged (the zip depth is valid, so those
        # are exactly the zipped layers and their norms); the others read zipped units at most
        in_zipped = bool(axes) and axes[0] is not None and axes[0][0] in zipped_groups
        if in_zipped:  # a merged tensor: the same in both members
            merged = sum(
                _apply_side(full_states[s][key], axes, side_out[s], side_in[s]).double()
                for s in (0, 1)
            )
            assert isinstance(merged, torch.Tensor)
            for s in (0, 1):
                new_states[s][key] = merged.to(full_states[s][key].dtype)
        else:  # a member's own tensor reading zipped features: unmerge into its space
            for s in (0, 1):
                new_states[s][key] = _apply_side(full_states[s][key], axes, {}, side_in[s])
    rebuilt = [_rebuild(m, new_states[i]) for i, m in enumerate(members)]
    if repair_stats:
        has_bn = any(
            isinstance(x, nn.modules.batchnorm._BatchNorm) for x in rebuilt[0].module.modules()
        )
        if has_bn:
            for m in rebuilt:
                reset_batchnorm(m.module, prepared)
            # merged groups' BatchNorms must stay identical in both members (a shared trunk)
            merged_bn = [
                k
                for k in keys
                if k.endswith(("running_mean", "running_var"))
                and (spec.axes.get(k) or (None,))[0] is not None
                and spec.axes[k][0][0] in zipped_groups  # type: ignore[index]
            ]
            stats = {k: rebuilt[0].module.state_dict()[k] for k in merged_bn}
            rebuilt[1].module.load_state_dict({**rebuilt[1].module.state_dict(), **stats})
        else:
            _zip_repair(rebuilt, members, spec, zipped_layers, mats, prepared)
    model = _union(rebuilt, union, union_params, data, seed, progress)
    model.method["merge"] = {
        "method": "zipit",
        "layers": depth,
        "valid_layers": valid,
        "alpha": alpha,
    }
    return model


@torch.no_grad()
def _zip_repair(
    rebuilt: list[Member],
    originals: list[Member],
    spec: PermutationSpec,
    zipped_layers: set[str],
    mats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    inputs: torch.Tensor,
) -> None:
    """REPAIR for a zipped network without BatchNorm: each merged unit's output mean and
    standard deviation are set to the average of the units it merged, layer by layer."""
    from netmeld.methods.permutation import channel_stats, rescale_outputs

    modules = [m.module for m in rebuilt]
    for layer, group in spec.layers:
        if layer not in zipped_layers or group is None:
            continue
        merge = mats[group][0]
        ends = [channel_stats(m.module, layer, inputs, 256) for m in originals]
        t_mean = merge @ torch.cat([ends[0][0], ends[1][0]])
        t_std = merge @ torch.cat([ends[0][1], ends[1][1]])
        rescale_outputs(modules, layer, t_mean, t_std, inputs)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` (batch 1) through the Linear
    and Conv layers that run (a shared trunk counts once)."""
    total = 0

    def hook(mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += out.numel() // out.shape[0] * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = mod.weight[0].numel()
            total += out.numel() // out.shape[0] * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total
