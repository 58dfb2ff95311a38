"""What weight merging and ZipIt! share: members of one architecture checked, their bodies'
tensors (the heads left out), data preprocessed for them, a member rebuilt with new tensors,
and the kept heads combined by a union-head method."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from netmeld.data import load_data
from netmeld.errors import DataError, IncompatibleMembersError
from netmeld.io.checkpoint_merge import check_same_tensors, shapes_of
from netmeld.members.graph import find_head
from netmeld.members.member import Member
from netmeld.model.combined import CombinedModel
from netmeld.model.inputs import Preprocess
from netmeld.runtime import resolve_device


def check_members(members: Sequence[Member]) -> None:
    """At least two members of one architecture that read one input."""
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


def body_states(members: Sequence[Member]) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Each member's body tensors (no head), checked for equal names and shapes."""
    states = []
    for m in members:
        _, head = _head_keys(m)
        states.append({k: v for k, v in m.module.state_dict().items() if k not in head})
    check_same_tensors(
        [(f"member {m.name!r}", shapes_of(st)) for m, st in zip(members, states, strict=True)]
    )
    return states, list(states[0])


def prepared(
    member: Member,
    data: Any,
    *,
    device: str | torch.device | None = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Raw ``data`` (tensor, ndarray, folder, ...) preprocessed for ``member``, on the CPU
    (the passes over it move it to their device batch by batch). The preprocessing runs on
    ``device``, ``batch_size`` inputs at a time off the CPU."""
    shape = member.preprocessing.input_shape
    inputs = load_data(data, shape, what="merge data").inputs
    if len(inputs) == 0:
        raise DataError("merge data is empty")
    dev = resolve_device(device)
    with torch.no_grad():
        pre = Preprocess(shape, member.preprocessing)
        if dev.type == "cpu":
            return pre(inputs)
        pre.to(dev)
        return torch.cat(
            [
                pre(inputs[i : i + batch_size].to(dev)).cpu()
                for i in range(0, len(inputs), batch_size)
            ]
        )


def rebuild(member: Member, state: Mapping[str, torch.Tensor], name: str | None = None) -> Member:
    """A copy of ``member`` holding the tensors ``state``."""
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


def union_of(
    members: list[Member],
    union: str,
    union_params: dict[str, Any] | None,
    data: Any,
    seed: int,
    progress: bool | None,
    *,
    device: str | torch.device | None = "auto",
) -> CombinedModel:
    """The merged members' kept heads combined with the union-head method ``union``; the
    members run over ``data`` (where the method needs it) on ``device``."""
    from netmeld.methods._registry import get_method
    from netmeld.methods.meld import meld

    info = get_method(union)
    return meld(
        members,
        union,
        data if info.data != "none" else None,
        params=union_params,
        seed=seed,
        device=device,
        progress=progress,
    )
