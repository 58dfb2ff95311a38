"""``netmeld inspect`` as a function: which members share a trunk, where each diverges, what
each owns.

>>> netmeld.inspect(["recipe.yaml"])            # or model folders, Members, combined models
[{'member': 'pets', 'shared_with': ['people'], 'trunk_parameters': 11176512, ...}]

Inspecting builds each member's network to trace it, but a member read from a file is only
built from a trusted builder (see :func:`netmeld.trust_builder`): inspecting a tampered folder
or recipe runs none of its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netmeld.errors import MemberError
from netmeld.members.member import Member
from netmeld.members.trust import reading_files
from netmeld.model.combined import CombinedModel

Item = str | Path | Member | CombinedModel


def inspect(
    items: Item | Sequence[Item],
    *,
    architecture: str | None = None,
    architecture_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per member of ``items`` (each a :class:`Member`, a :class:`CombinedModel`, a
    saved model folder, a meld recipe ``.yaml``, a transformers ``save_pretrained`` folder, or
    a checkpoint when ``architecture`` names
    how to build it): ``member``, ``labels``, ``group``, ``shared_with``,
    ``trunk_parameters``, ``own_parameters``, ``head``, ``head_parameters``, ``diverges_at``
    (the first layer the member does not share), ``traced`` and ``total_parameters``."""
    from netmeld.members.graph import plan_groups, share_summary, trace_member

    if isinstance(items, (str, Path, Member, CombinedModel)):
        items = [items]
    members = _inspect_members(items, architecture, architecture_kwargs or {})
    traced = [trace_member(m) for m in members]
    rows = share_summary(traced, plan_groups(traced))
    by_name = {m.name: m for m in members}
    return [{"member": r["member"], "labels": list(by_name[r["member"]].labels)} | r for r in rows]


def _inspect_members(
    items: Sequence[Item], arch: str | None, arch_kwargs: dict[str, Any]
) -> list[Member]:
    from netmeld.cli.recipes import read_recipe, recipe_members
    from netmeld.members.checkpoint import read_state_dict
    from netmeld.members.member import Member, Preprocessing
    from netmeld.model.artifact import load
    from netmeld.model.combined import CONFIG_FILE

    members: list[Member] = []
    for item in items:
        if isinstance(item, Member):
            members.append(item)
            continue
        if isinstance(item, CombinedModel):
            members.extend(item.members)
            continue
        p = Path(item)
        if p.is_dir() and (p / CONFIG_FILE).is_file():
            members.extend(load(p).members)
        elif p.is_dir() and (p / "config.json").is_file():  # a transformers folder
            members.append(Member.from_pretrained(p, name=_unique(p.resolve().name, members)))
        elif p.suffix in (".yaml", ".yml"):
            with reading_files(f"recipe {str(p)!r}"):
                recipe, base = read_recipe(p)
                members.extend(recipe_members(recipe, base))
        else:
            if arch is None:
                raise MemberError(
                    f"{item!r}: give a recipe (.yaml), a netmeld model folder, a transformers "
                    "folder (save_pretrained), or a checkpoint with architecture= (--arch in "
                    "the CLI)"
                )
            tensors = read_state_dict(p)
            num = _num_outputs(arch, arch_kwargs, tensors, str(item))
            members.append(
                Member.from_checkpoint(
                    p,
                    arch,
                    [f"class{i}" for i in range(num)],
                    name=_unique(p.stem, members),
                    preprocessing=Preprocessing((3, 224, 224)),
                    architecture_kwargs=arch_kwargs,
                )
            )
    return members


def _unique(name: str, members: Sequence[Any]) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9_\-]", "-", name) or "member"
    taken = {m.name for m in members}
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def _num_outputs(arch: str, arch_kwargs: dict[str, Any], tensors: dict[str, Any], item: str) -> int:
    """The number of classes a checkpoint's head has, read from its tensors."""
    from netmeld.members.graph import find_head
    from netmeld.members.member import Architecture, Member, Preprocessing

    module = Architecture.parse(arch, arch_kwargs).build()
    out = [m for m in module.modules() if hasattr(m, "out_features")]
    probe = (
        Member(
            module,
            [f"c{i}" for i in range(int(getattr(out[-1], "out_features", 0)))],
            name="probe",
            preprocessing=Preprocessing((3, 224, 224)),
        )
        if out
        else None
    )
    head = find_head(probe) if probe is not None else None
    key = f"{head}.weight" if head else None
    if key is None or key not in tensors:
        raise MemberError(f"{item!r}: cannot find the head tensor {key!r} in the checkpoint")
    return int(tensors[key].shape[0])
