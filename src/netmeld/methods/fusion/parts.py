from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.errors import IncompatibleMembersError, MemberError
from netmeld.members.graph import CapturedBody, build_submodule, trace_member
from netmeld.members.member import Architecture, Member, Preprocessing
from netmeld.model.combined import CombinedModel
from netmeld.model.inputs import Preprocess

Part = Member | nn.Module | Architecture | str
FUSIONS = ("concat", "sum", "attention", "gating")
WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
TASK_SEPARATOR = "/"


# -- parts ------------------------------------------------------------------------------------


def _part_spec(part: Part, name: str, *, num_classes: int | None = None) -> dict[str, Any] | None:
    """The JSON description that rebuilds ``part`` (``None``: a plain module, not rebuildable)."""
    if isinstance(part, (str, Architecture)):
        arch = Architecture.parse(part)
        return {"name": name, "architecture": arch.to_dict(), "num_classes": num_classes or 1}
    if isinstance(part, Member):
        if part.architecture is None:
            return None
        return {
            "name": name,
            "architecture": part.architecture.to_dict(),
            "num_classes": len(part.labels),
            "head": part.head,
            "preprocessing": part.preprocessing.to_dict(),
        }
    return None


def _member_from_spec(spec: Mapping[str, Any]) -> Member:
    arch = Architecture(spec["architecture"]["spec"], spec["architecture"].get("kwargs", {}))
    n = int(spec.get("num_classes") or 1)
    module = arch.build(num_classes=n)
    prep = spec.get("preprocessing")
    return Member(
        module,
        [str(i) for i in range(n)],
        name=spec["name"],
        preprocessing=Preprocessing.from_dict(prep) if prep else {"input_shape": (1,)},
        architecture=arch,
        head=spec.get("head"),
    )


def _inside(node: Any, cut: str) -> bool:
    """Whether fx ``node`` computes part of submodule ``cut`` (a layer, or a block such as a
    ResNet's ``layer2``: its residual adds and activations too, by fx's module stack)."""
    paths = [str(node.target)] if node.op == "call_module" else []
    paths += [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    return any(p == cut or p.startswith(cut + ".") for p in paths)


def _body(member: Member, cut: str | None = None) -> nn.Module:
    """The member's computation up to its head's input, or up to submodule ``cut``'s output
    (a layer or a block of layers)."""
    t = trace_member(member)
    if cut is None:
        if not t.traced:
            # run whole; its own head computes nothing the fusion uses: keep it out of training
            # (an unused trainable parameter would also stop DDP)
            member.module.get_submodule(t.head_name).requires_grad_(False)
            return CapturedBody(member.module, t.head_name)
        return build_submodule(t, 0, len(t.body))
    if not t.traced:
        raise MemberError(
            f"member {member.name!r}: torch.fx cannot trace it ({t.failure}), so it cannot be "
            f"cut at {cut!r}; use the whole body (cut=None)"
        )
    index = [i for i, n in enumerate(t.body) if _inside(n, cut)]
    if not index:
        blocks = sorted({str(n.target).split(".")[0] for n in t.body if n.op == "call_module"})
        raise MemberError(
            f"member {member.name!r}: no submodule {cut!r} in its body; its top-level blocks "
            f"are {blocks}"
        )
    return build_submodule(t, 0, index[-1] + 1)


class _Part(nn.Module):
    """A part of a fused network: optional input selection and preprocessing, then a body."""

    def __init__(self, prep: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.prep = prep
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prep(x))


class _Select(nn.Module):
    columns: torch.Tensor

    def __init__(self, columns: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(list(columns), dtype=torch.long), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.columns)


def _make_part(
    part: Part,
    spec: Mapping[str, Any] | None,
    input_shape: tuple[int, ...],
    select: Sequence[int] | None,
    *,
    cut: str | None = None,
) -> nn.Module:
    member: Member | None = None
    if isinstance(part, Member):  # a copy: training the fusion never touches the member
        member = Member(
            copy.deepcopy(part.module),
            part.labels,
            name=part.name,
            preprocessing=part.preprocessing,
            architecture=part.architecture,
            head=part.head,
        )
    elif spec is not None:
        member = _member_from_spec(spec)
    if member is not None:
        member.module.requires_grad_(True)  # trainable unless frozen explicitly (freeze=)
        body = _body(member, cut)
        # a trained member's preprocessing applies; a fresh architecture has none
        if spec is None or spec.get("preprocessing"):
            prep: nn.Module = Preprocess(input_shape, member.preprocessing, select)
        else:
            prep = _Select(select) if select is not None else nn.Identity()
        return _Part(prep, body)
    if not isinstance(part, nn.Module):
        raise MemberError(f"expected a Member, an nn.Module or an architecture, got {part!r}")
    if cut is not None:
        raise MemberError(
            f"cut={cut!r} needs a member or an architecture; a plain {type(part).__name__} is "
            "used whole (pass the part of it you want instead)"
        )
    module = copy.deepcopy(part).requires_grad_(True)
    return _Part(_Select(select) if select is not None else nn.Identity(), module)


@torch.no_grad()
def _out_shape(module: nn.Module, shape: Sequence[int], what: str) -> tuple[int, ...]:
    was = module.training
    module.eval()
    try:
        out = module(torch.zeros(2, *shape))
    except Exception as exc:
        raise IncompatibleMembersError(
            f"{what}: running it on an input of shape {tuple(shape)} failed: {exc}"
        ) from exc
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor):
        raise IncompatibleMembersError(f"{what}: returns {type(out).__name__}, expected a tensor")
    return tuple(out.shape[1:])


def _flat(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# -- fused networks ---------------------------------------------------------------------------


class FusedNet(nn.Module):
    """Base of the fused networks: a JSON ``spec`` that rebuilds it, and frozen parts."""

    kind = "fused"
    summary = ""  # what it combines, for ``netmeld methods``
    options: tuple[str, ...] = ()  # its builder's options, for ``netmeld methods``

    def __init__(self) -> None:
        super().__init__()
        self.frozen: list[str] = []

    def freeze(self, names: Sequence[str]) -> None:
        """Freeze parts (``"a"``) or blocks (``"a.layer1"``), like Keras' ``trainable``."""
        for name in names:
            prefix = self.qualify(name)
            params = [p for n, p in self.named_parameters() if n.startswith(prefix + ".")]
            if not params:
                raise MemberError(
                    f"freeze: {name!r} names no part or block with parameters; parts: "
                    f"{self.part_names()}"
                )
            for p in params:
                p.requires_grad_(False)
            self.frozen.append(prefix)

    def refreeze(self) -> None:
        """Apply the freezing again (a deep copy of a Keras part makes its weights trainable)."""
        for prefix in self.frozen:
            for name, p in self.named_parameters():
                if name.startswith(prefix + "."):
                    p.requires_grad_(False)

    def part_names(self) -> list[str]:
        return []

    def qualify(self, name: str) -> str:
        """A user's part or block name as a qualified module name."""
        head, _, rest = name.partition(".")
        mapping = self.part_prefixes()
        if head not in mapping:
            raise MemberError(f"freeze: no part {head!r}; parts: {self.part_names()}")
        base = mapping[head]
        if not rest:
            return base
        body = self.get_submodule(base)
        if isinstance(body, _Part):
            return f"{base}.body.{rest}"
        return f"{base}.{rest}"

    def part_prefixes(self) -> dict[str, str]:
        return {}

    def train(self, mode: bool = True) -> FusedNet:
        super().train(mode)
        for prefix in self.frozen:  # frozen BatchNorm keeps its statistics, like Keras
            self.get_submodule(prefix).eval()
        return self


class ParallelNet(FusedNet):
    """Branches side by side; their features fused and classified by one ``head``."""

    kind = "parallel"
    summary = "branches side by side (same input or their own channels/columns), one head"
    options = (f"fuse={'|'.join(FUSIONS)}", "dim", "inputs", "freeze")

    def __init__(
        self,
        branches: Mapping[str, nn.Module],
        dims: Mapping[str, int],
        num_classes: int,
        fuse: str = "concat",
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if fuse not in FUSIONS:
            raise MemberError(f"fuse {fuse!r}: choose one of {list(FUSIONS)}")
        self.fuse = fuse
        self.branches = nn.ModuleDict(dict(branches))
        names = list(self.branches)
        if fuse == "concat":
            width = sum(dims[n] for n in names)
            self.project = nn.ModuleDict()
        else:
            width = int(dim or min(dims[n] for n in names))
            self.project = nn.ModuleDict({n: nn.Linear(dims[n], width) for n in names})
        if fuse == "attention":
            self.score = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
        if fuse == "gating":
            self.gate = nn.Linear(sum(dims[n] for n in names), len(names))
        self.head = nn.Linear(width, num_classes)

    def part_names(self) -> list[str]:
        return list(self.branches)

    def part_prefixes(self) -> dict[str, str]:
        return {n: f"branches.{n}" for n in self.branches}

    def fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused features and the branch weights (attention and gating; else ``None``)."""
        feats = [self.branches[n](x).flatten(1) for n in self.branches]
        if self.fuse == "concat":
            return torch.cat(feats, dim=1), None
        projected = torch.stack(
            [self.project[n](f) for n, f in zip(self.branches, feats, strict=True)], 1
        )
        if self.fuse == "sum":
            return projected.sum(1), None
        if self.fuse == "attention":
            weights = torch.softmax(self.score(projected).squeeze(-1), dim=1)
        else:
            weights = torch.softmax(self.gate(torch.cat(feats, dim=1)), dim=1)
        return (projected * weights.unsqueeze(-1)).sum(1), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fused(x)[0])


class Resize(nn.Module):
    """Bilinear resize of a feature map to ``size``."""

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def adapter(
    got: Sequence[int], want: Sequence[int], adapt: str = "auto"
) -> tuple[nn.Module, list[str]]:
    """A module turning features of shape ``got`` into ``want`` and what it does, in words.

    Feature maps get a 1x1 convolution where channels differ and a bilinear resize where sizes
    differ; vectors (or a map into a vector) a linear projection. ``adapt="none"`` allows no
    change; a vector cannot become a feature map: both raise an error naming the shapes.
    """
    got, want = tuple(got), tuple(want)
    if got == want:
        return nn.Identity(), []
    problem = (
        f"the first network's features have shape {got} (without the batch), the second "
        f"network expects {want}"
    )
    if adapt == "none":
        raise IncompatibleMembersError(f"{problem}; pass adapt='auto' to insert an adapter")
    if adapt != "auto":
        raise MemberError(f"adapt {adapt!r}: choose 'auto' or 'none'")
    layers: list[nn.Module] = []
    notes: list[str] = []
    if len(got) == 3 and len(want) == 3:
        if got[0] != want[0]:
            layers.append(nn.Conv2d(got[0], want[0], 1))
            notes.append(f"1x1 conv {got[0]} -> {want[0]} channels")
        if got[1:] != want[1:]:
            layers.append(Resize(want[1:]))
            notes.append(f"bilinear resize {got[1]}x{got[2]} -> {want[1]}x{want[2]}")
    elif len(want) == 1:
        if len(got) != 1:
            layers.append(nn.Flatten())
        layers.append(nn.Linear(_flat(got), want[0]))
        notes.append(f"linear projection {_flat(got)} -> {want[0]} features")
    else:
        raise IncompatibleMembersError(f"{problem}; netmeld cannot adapt {got} to {want}")
    return nn.Sequential(*layers), notes


class HierarchicalNet(FusedNet):
    """``first``'s features, adapted, are the input of ``second`` (whose head classifies)."""

    kind = "hierarchical"
    summary = "one network's features feed another; adapters where shapes differ"
    options = ("cut", "second_input_shape", "adapt=auto|none", "freeze")

    def __init__(self, first: nn.Module, adapt: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.adapt = adapt
        self.second = second

    def part_names(self) -> list[str]:
        return ["first", "adapt", "second"]

    def part_prefixes(self) -> dict[str, str]:
        return {n: n for n in self.part_names()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.adapt(self.first(x)))


class MultiTaskNet(FusedNet):
    """A shared trunk and one linear head per task; ``heads`` holds them as row blocks of one
    ``nn.Linear`` (rows are independent, so the heads are separate), task by task."""

    kind = "multitask"
    summary = "a shared trunk, one head per task (labels 'task/label')"
    options = (
        f"weighting={'|'.join(WEIGHTINGS)} (Kendall 2018; Chen 2018)",
        "loss_weights",
        "alpha",
        "freeze",
    )

    def __init__(self, trunk: nn.Module, dim: int, tasks: Mapping[str, int]) -> None:
        super().__init__()
        self.trunk = trunk
        self.tasks = dict(tasks)
        self.heads = nn.Linear(dim, sum(self.tasks.values()))

    def part_names(self) -> list[str]:
        return ["trunk", "heads"]

    def part_prefixes(self) -> dict[str, str]:
        return {"trunk": "trunk", "heads": "heads"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x).flatten(1))


# -- rebuilding (the architecture of a saved fused model) ---------------------------------------


# The fusion architectures, by the kind their network records: the one list of them.
FUSION_NETS: dict[str, type[FusedNet]] = {
    c.kind: c for c in (ParallelNet, HierarchicalNet, MultiTaskNet)
}
FUSION_KINDS: tuple[str, ...] = tuple(FUSION_NETS)


def build(
    kind: str,
    input_shape: Sequence[int],
    parts: Sequence[Mapping[str, Any]],
    num_classes: int | None = None,
    **options: Any,
) -> FusedNet:
    """Rebuild a fused network, with fresh weights, from the JSON spec its builder saved."""
    shape = tuple(int(s) for s in input_shape)
    if kind == "parallel":
        select = options.get("inputs") or {}
        modules = {p["name"]: _make_part(p["name"], p, shape, select.get(p["name"])) for p in parts}
        dims = {n: _flat(_out_shape(m, shape, f"branch {n!r}")) for n, m in modules.items()}
        net: FusedNet = ParallelNet(
            modules, dims, int(num_classes or 1), options.get("fuse", "concat"), options.get("dim")
        )
    elif kind == "hierarchical":
        first_spec, second_spec = parts
        first = _make_part("first", first_spec, shape, None, cut=options.get("cut"))
        got = _out_shape(first, shape, "the first network")
        adapt, _ = adapter(got, options["second_input_shape"], "auto")
        second = _member_from_spec(second_spec).module
        net = HierarchicalNet(first, adapt, second)
    elif kind == "multitask":
        trunk = _make_part("trunk", parts[0], shape, None)
        dim = _flat(_out_shape(trunk, shape, "the trunk"))
        net = MultiTaskNet(trunk, dim, options["tasks"])
    else:
        raise MemberError(f"fused network kind {kind!r}: expected one of {FUSION_KINDS}")
    return net


def _fused_model(
    net: FusedNet,
    labels: Sequence[str],
    input_shape: tuple[int, ...],
    specs: Sequence[dict[str, Any] | None],
    options: dict[str, Any],
    name: str,
    head: str,
    params: dict[str, Any],
) -> CombinedModel:
    architecture = None
    if all(s is not None for s in specs):
        architecture = Architecture(
            "netmeld.methods.fusion.parts:build",
            {"kind": net.kind, "input_shape": list(input_shape), "parts": list(specs), **options},
        )
    member = Member(
        net,
        list(labels),
        name=name,
        preprocessing=Preprocessing(input_shape=input_shape),
        architecture=architecture,
        head=head,
    )
    model = CombinedModel([member], input_shape=input_shape)
    model.method = {"name": net.kind, "params": params}
    return model


def _input_shape(parts: Sequence[Part], input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    shapes = {p.preprocessing.input_shape for p in parts if isinstance(p, Member)}
    if len(shapes) == 1:
        return shapes.pop()
    raise IncompatibleMembersError(
        "pass input_shape=(C, H, W) or (F,): "
        + (
            f"the members read different shapes {sorted(shapes)}"
            if shapes
            else "no member gives it"
        )
    )


def _names(parts: Sequence[Part] | Mapping[str, Part]) -> dict[str, Part]:
    if isinstance(parts, Mapping):
        return dict(parts)
    named: dict[str, Part] = {}
    for i, p in enumerate(parts):
        name = p.name if isinstance(p, Member) else f"b{i}"
        if name in named:
            raise IncompatibleMembersError(f"two branches are named {name!r}")
        named[name] = p
    return named


def _default_labels(parts: Sequence[Part]) -> list[str]:
    labels: list[str] = []
    for p in parts:
        if isinstance(p, Member):
            labels.extend(label for label in p.labels if label not in labels)
    return labels
