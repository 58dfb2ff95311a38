"""Fusion architectures for training combined CNNs: parallel branches, a hierarchy where one
network feeds another, and multi-task learning with a shared trunk.

Each builder returns a :class:`~netmeld.combined.CombinedModel` with one member: the fused
network. Its parts come from members (their bodies: everything before the head, with their own
preprocessing), from fresh architectures (``"netmeld.zoo:small_cnn"``, ``"torchvision:resnet18"``:
built with new weights, their head dropped) or from plain ``nn.Module`` feature extractors (used
whole; such a model trains and predicts but cannot be saved without an architecture).

Freezing works like Keras' ``trainable = False``: ``freeze=["a"]`` freezes branch ``a``,
``freeze=["a.layer1"]`` one block of it. Frozen parameters get no gradient and frozen
BatchNorm layers keep their statistics (they run in eval mode while the rest trains), so a
frozen part is bit-identical after :func:`fit`.

Training (:func:`fit`) runs on the shared engine (:mod:`netmeld.engine`): progress, atomic
checkpoints, resume and DDP under ``torchrun``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.data import load_data
from netmeld.engine import TrainConfig, resolve_config, tensor_batches, train
from netmeld.errors import IncompatibleMembersError, LabelError, MemberError
from netmeld.members.graph import CapturedBody, build_submodule, find_head, trace_member
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


def _body(member: Member, cut: str | None = None) -> nn.Module:
    """The member's computation up to its head's input, or up to submodule ``cut``'s output."""
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
    index = [i for i, n in enumerate(t.body) if n.op == "call_module" and n.target == cut]
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
        raise MemberError(f"fused network kind {kind!r}: expected parallel|hierarchical|multitask")
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
            "netmeld.methods.fusion:build",
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
    """
    shape = _input_shape([first], input_shape)
    if labels is None:
        if not isinstance(second, Member):
            raise LabelError("hierarchical: pass labels= (the second network is not a member)")
        labels = list(second.labels)
    labels = list(labels)
    first_spec = _part_spec(first, "first")
    first_part = _make_part(first, first_spec, shape, None, cut=cut)
    got = _out_shape(first_part, shape, "the first network")
    if isinstance(second, Member):
        if len(second.labels) != len(labels):
            raise LabelError(
                f"hierarchical: the second member {second.name!r} has {len(second.labels)} "
                f"labels, {len(labels)} given"
            )
        second_member = second
        second_module = copy.deepcopy(second.module).requires_grad_(True)
        want = tuple(second_input_shape or second.preprocessing.input_shape)
    elif isinstance(second, (str, Architecture)):
        arch = Architecture.parse(second)
        second_module = arch.build(num_classes=len(labels))
        second_member = Member(
            second_module,
            labels,
            name="second",
            preprocessing={"input_shape": (1,)},
            architecture=arch,
        )
        if second_input_shape is None:
            raise IncompatibleMembersError(
                "hierarchical: pass second_input_shape= (what the fresh second network reads)"
            )
        want = tuple(second_input_shape)
    else:
        second_module = copy.deepcopy(second).requires_grad_(True)
        second_member = Member(
            second_module, labels, name="second", preprocessing={"input_shape": (1,)}
        )
        want = tuple(second_input_shape) if second_input_shape is not None else got
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
    part = _make_part(trunk, spec, shape, None)
    dim = _flat(_out_shape(part, shape, "the trunk"))
    sizes = {t: len(v) for t, v in tasks.items()}
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


# -- training ---------------------------------------------------------------------------------


def task_slices(model: CombinedModel) -> dict[str, slice]:
    """Where each task's logits sit in a multi-task model's output."""
    tasks = model.method.get("params", {}).get("tasks")
    if model.method.get("name") != "multitask" or not tasks:
        raise MemberError(f"not a multi-task model (method {model.method.get('name')!r})")
    slices, start = {}, 0
    for task, labels in tasks.items():
        slices[task] = slice(start, start + len(labels))
        start += len(labels)
    return slices


def task_targets(model: CombinedModel, labels: Sequence[str]) -> torch.Tensor:
    """``(N, tasks)`` class indices for ``"task/label"`` labels; -1 where a task is unlabeled."""
    tasks = model.method["params"]["tasks"]
    names = list(tasks)
    index = {t: {label: i for i, label in enumerate(v)} for t, v in tasks.items()}
    out = torch.full((len(labels), len(names)), -1, dtype=torch.long)
    for row, label in enumerate(labels):
        task, sep, name = str(label).partition(TASK_SEPARATOR)
        if not sep or task not in index or name not in index[task]:
            raise LabelError(
                f"label {label!r}: expected 'task/label' with a task in {names} and one of its "
                "labels"
            )
        out[row, names.index(task)] = index[task][name]
    return out


def task_accuracy(model: CombinedModel, data: Any) -> dict[str, float]:
    """Accuracy per task of a multi-task model, each over the examples labeled for it."""
    loaded = load_data(data, model.input_shape, require_labels=True, what="evaluation data")
    assert loaded.labels is not None
    targets = task_targets(model, loaded.labels)
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(loaded.inputs[i : i + 512]) for i in range(0, len(loaded.inputs), 512)]
        )
    result = {}
    for k, (task, sl) in enumerate(task_slices(model).items()):
        mask = targets[:, k] >= 0
        if mask.any():
            pred = logits[mask][:, sl].argmax(1)
            result[task] = float((pred == targets[mask, k]).float().mean())
    return result


class _TaskLoss(nn.Module):
    """The network and the learned loss weights, trained together (checkpointed together)."""

    fixed: torch.Tensor
    initial: torch.Tensor
    net: MultiTaskNet

    def __init__(self, net: MultiTaskNet, slices: Sequence[slice], params: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.slices = list(slices)
        self.weighting = params["weighting"]
        n = len(self.slices)
        fixed = [float(w) for w in params["loss_weights"].values()]
        self.register_buffer("fixed", torch.tensor(fixed))
        self.alpha = float(params.get("alpha", 1.5))
        if self.weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(n))
        if self.weighting == "gradnorm":
            self.task_weights = nn.Parameter(torch.ones(n))
            self.register_buffer("initial", torch.full((n,), float("nan")))
            shared = [p for p in net.trunk.parameters() if p.requires_grad and p.dim() >= 2]
            if not shared:
                raise MemberError("gradnorm needs a trainable trunk layer with weights")
            self._shared = [shared[-1]]  # a list: not registered twice as a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def effective_weights(self) -> list[float]:
        if self.weighting == "uncertainty":
            return torch.exp(-self.log_vars.detach()).tolist()
        if self.weighting == "gradnorm":
            return self.task_weights.detach().tolist()
        return self.fixed.tolist()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses, present = [], []
        for k, sl in enumerate(self.slices):
            mask = targets[:, k] >= 0
            if mask.any():
                losses.append(F.cross_entropy(logits[mask][:, sl], targets[mask, k]))
                present.append(k)
            else:
                losses.append(logits.sum() * 0.0)
        task = torch.stack(losses)
        on = torch.zeros(len(self.slices), dtype=torch.bool, device=logits.device)
        on[present] = True
        if self.weighting == "fixed":
            return (self.fixed * task * on).sum()
        if self.weighting == "uncertainty":
            return ((torch.exp(-self.log_vars) * task + 0.5 * self.log_vars) * on).sum()
        return self._gradnorm(task, on)

    def _gradnorm(self, task: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        n = len(self.slices)
        with torch.no_grad():  # keep the weights positive and summing to the number of tasks
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(n / self.task_weights.sum())
            if torch.isnan(self.initial).any() and bool(on.all()):
                self.initial.copy_(task.detach())
        w = self.task_weights
        total = (w.detach() * task * on).sum()
        if torch.isnan(self.initial).any() or not bool(on.all()):
            return total + 0.0 * w.sum()
        norms = torch.stack(
            [
                torch.autograd.grad(task[k], self._shared[0], retain_graph=True)[0].norm()
                for k in range(n)
            ]
        )
        g = w * norms
        ratio = task.detach() / self.initial
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        return total + (g - target).abs().sum()


def fit(
    model: CombinedModel,
    data: Any,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    config: TrainConfig | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> CombinedModel:
    """Train a fused model (from :func:`parallel`, :func:`hierarchical` or :func:`multitask`)
    on labeled ``data`` through the shared engine; returns the trained model, the one passed in
    is left as it was. Multi-task labels are ``"task/label"``: an example labeled for one task
    counts for that task's loss only (under DDP each process averages a task's loss over its
    own share of the batch, so a run matches one process only where the tasks are spread
    evenly)."""
    kind = model.method.get("name")
    if kind not in ("parallel", "hierarchical", "multitask") or len(model.members) != 1:
        raise MemberError(
            f"fit trains the models of parallel(), hierarchical() and multitask(); this one's "
            f"method is {kind!r}"
        )
    member = model.members[0]
    net = copy.deepcopy(member.module)
    assert isinstance(net, FusedNet)
    net.refreeze()
    loaded = load_data(data, model.input_shape, require_labels=True, what="training data")
    assert loaded.labels is not None
    cfg = resolve_config(config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    params = dict(model.method.get("params", {}))
    trained: nn.Module
    if kind == "multitask":
        targets = task_targets(model, loaded.labels)
        assert isinstance(net, MultiTaskNet)
        wrapper = _TaskLoss(net, list(task_slices(model).values()), params)
        trained = wrapper

        def step(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            inner = m.module if hasattr(m, "module") else m
            assert isinstance(inner, _TaskLoss)
            return inner.loss(m(batch[0]), batch[1])

    else:
        index = {label: i for i, label in enumerate(model.labels)}
        missing = sorted({label for label in loaded.labels if label not in index})
        if missing:
            raise LabelError(
                f"training data has labels the model does not know: {missing[:5]}; its labels "
                f"are {list(model.labels)[:10]}"
            )
        targets = torch.tensor([index[label] for label in loaded.labels])
        trained = net

        def step(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return F.cross_entropy(m(batch[0]), batch[1])

    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    result = train(
        trained,
        step,
        len(loaded.inputs),
        tensor_batches(loaded.inputs, targets),
        cfg,
        device=device,
        progress=progress,
        description=f"training {kind}",
    )
    net.cpu().eval()
    for n, p in net.named_parameters():
        if n in frozen and not torch.equal(frozen[n], p.detach()):
            raise RuntimeError(f"frozen parameter {n!r} changed during training")  # a netmeld bug
    out = CombinedModel(
        [
            Member(
                net,
                member.labels,
                name=member.name,
                preprocessing=member.preprocessing,
                architecture=member.architecture,
                head=model.head_names[member.name],
            )
        ],
        input_shape=model.input_shape,
    )
    params["epochs"] = cfg.epochs
    params["final_loss"] = result.losses[-1] if result.losses else None
    if kind == "multitask":
        params["learned_weights"] = dict(
            zip(params["tasks"], wrapper.effective_weights(), strict=True)
        )
    out.method = {"name": kind, "params": params}
    return out


__all__ = [
    "FUSIONS",
    "WEIGHTINGS",
    "FusedNet",
    "HierarchicalNet",
    "MultiTaskNet",
    "ParallelNet",
    "adapter",
    "build",
    "fit",
    "hierarchical",
    "multitask",
    "parallel",
    "task_accuracy",
    "task_slices",
    "task_targets",
]
