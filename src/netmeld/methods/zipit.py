"""ZipIt! (Stoica et al. 2024): two members trained on disjoint tasks merged by pairing their
most correlated features, within and across the models, on unlabeled data; fully, or for their
first layers only (partial zipping). Each member keeps its own head over its own labels, the
zipped layers are shared, and the heads are combined by any union-head method (``union=``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from netmeld.errors import IncompatibleMembersError, MethodError
from netmeld.members.member import Member
from netmeld.methods._bodies import body_states, check_members, prepared, rebuild, union_of
from netmeld.methods.permutation import (
    PermutationSpec,
    channel_stats,
    correlation_stats,
    permutation_spec,
    rescale_outputs,
    reset_batchnorm,
)
from netmeld.model.combined import CombinedModel
from netmeld.ops.matching import zip_matching
from netmeld.runtime import resolve_device

# per group: the merge matrix (n_out, 2n) and the unmerge matrix (2n, n_out)
Mats = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
Sides = list[dict[str, torch.Tensor]]  # one matrix per group, for member 0 and member 1


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


def _zip_depth(spec: PermutationSpec, layers: int | None, name: str) -> tuple[int, list[int]]:
    """How many weighted layers to zip (``layers``, checked; default: all), and the valid
    depths."""
    valid = zip_layers(spec)
    if not valid:
        raise MethodError(f"member {name!r} has no hidden layer to zip")
    depth = valid[-1] if layers is None else layers
    if depth not in valid:
        raise MethodError(
            f"cannot zip the first {depth} layers of member {name!r}: a group of units would "
            f"be half merged; valid depths: {valid}"
        )
    return depth, valid


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


def _sides(mats: Mats, n: Mapping[str, int]) -> tuple[Sides, Sides]:
    """Each member's share of the merge matrices (its columns) and of the unmerge matrices
    (its rows)."""
    side_out = [
        {g: m[:, : n[g]] for g, (m, _) in mats.items()},
        {g: m[:, n[g] :] for g, (m, _) in mats.items()},
    ]
    side_in = [
        {g: u[: n[g]] for g, (_, u) in mats.items()},
        {g: u[n[g] :] for g, (_, u) in mats.items()},
    ]
    return side_out, side_in


def _zipped_states(
    full_states: list[dict[str, torch.Tensor]],
    spec: PermutationSpec,
    zipped_groups: set[str],
    side_out: Sides,
    side_in: Sides,
) -> list[dict[str, torch.Tensor]]:
    """Both members' state dicts after zipping: merged tensors equal in both, the others
    unmerged into each member's space where they read zipped units."""
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
    return new_states


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
    device: str | torch.device | None = "auto",
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
        device: where the members run over ``data`` (the feature correlations, the
            BatchNorm reset or REPAIR, the union method's data pass), batch by batch:
            ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or
            ``cuda:N``; a GPU asked for on a machine without one is a
            :class:`~netmeld.errors.DataError`. The members are put back where they were and
            the zipped model is on the CPU.
    """
    dev = resolve_device(device)
    members = list(members)
    if len(members) != 2:
        raise IncompatibleMembersError(f"zip merges exactly 2 members, got {len(members)}")
    check_members(members)
    _, keys = body_states(members)
    inputs = prepared(members[0], data, device=dev)
    a, b = members
    spec = permutation_spec(a.module, inputs[:2], what=f"member {a.name!r}")
    depth, valid = _zip_depth(spec, layers, a.name)
    hidden = [i for i, (_, g) in enumerate(spec.layers) if g is not None]
    zipped_layers = {spec.layers[i][0] for i in hidden[:depth]}
    zipped_groups = {g for i in hidden[:depth] if (g := spec.layers[i][1]) is not None}
    stats = correlation_stats(a.module, b.module, spec, inputs, groups=zipped_groups, device=dev)
    mats = {g: zip_matching(s.joint_correlation(), alpha=alpha) for g, s in stats.items()}
    side_out, side_in = _sides(mats, {g: spec.sizes[g] for g in zipped_groups})
    full_states = [dict(m.module.state_dict()) for m in members]
    new_states = _zipped_states(full_states, spec, zipped_groups, side_out, side_in)
    rebuilt = [rebuild(m, new_states[i]) for i, m in enumerate(members)]
    if repair_stats:
        _restore_statistics(
            rebuilt, members, spec, keys, zipped_groups, zipped_layers, mats, inputs, dev
        )
    model = union_of(rebuilt, union, union_params, data, seed, progress, device=dev)
    model.method["merge"] = {
        "method": "zipit",
        "layers": depth,
        "valid_layers": valid,
        "alpha": alpha,
    }
    return model


def _restore_statistics(
    rebuilt: list[Member],
    originals: list[Member],
    spec: PermutationSpec,
    keys: Sequence[str],
    zipped_groups: set[str],
    zipped_layers: set[str],
    mats: Mats,
    inputs: torch.Tensor,
    dev: torch.device,
) -> None:
    """BatchNorm statistics reset on ``inputs`` (the zipped groups' kept equal in both
    members, a shared trunk), or REPAIR for a network without BatchNorm; the networks run on
    ``dev`` batch by batch and stay where they were."""
    has_bn = any(
        isinstance(x, nn.modules.batchnorm._BatchNorm) for x in rebuilt[0].module.modules()
    )
    if not has_bn:
        _zip_repair(rebuilt, originals, spec, zipped_layers, mats, inputs, dev)
        return
    for m in rebuilt:
        reset_batchnorm(m.module, inputs, device=dev)
    merged_bn = [
        k
        for k in keys
        if k.endswith(("running_mean", "running_var"))
        and (spec.axes.get(k) or (None,))[0] is not None
        and spec.axes[k][0][0] in zipped_groups  # type: ignore[index]
    ]
    stats = {k: rebuilt[0].module.state_dict()[k] for k in merged_bn}
    rebuilt[1].module.load_state_dict({**rebuilt[1].module.state_dict(), **stats})


@torch.no_grad()
def _zip_repair(
    rebuilt: list[Member],
    originals: list[Member],
    spec: PermutationSpec,
    zipped_layers: set[str],
    mats: Mats,
    inputs: torch.Tensor,
    dev: torch.device,
) -> None:
    """REPAIR for a zipped network without BatchNorm: each merged unit's output mean and
    standard deviation are set to the average of the units it merged, layer by layer (the
    networks run on ``dev``)."""
    modules = [m.module for m in rebuilt]
    for layer, group in spec.layers:
        if layer not in zipped_layers or group is None:
            continue
        merge = mats[group][0]
        ends = [channel_stats(m.module, layer, inputs, 256, dev) for m in originals]
        t_mean = merge @ torch.cat([ends[0][0], ends[1][0]])
        t_std = merge @ torch.cat([ends[0][1], ends[1][1]])
        rescale_outputs(modules, layer, t_mean, t_std, inputs, device=dev)
