"""The one model type every method returns: logits over the union of the members' labels.

``CombinedModel`` runs each group's shared trunk once, each member's neck and head, and a
:class:`UnionHead` that turns the members' logits into logits over the union label space.

**The union rule.** Each member ``m`` contributes calibrated scores ``a[m, j]`` for its labels
(``a = scale_m * z_m + offset_m + class_bias``, or, with a router,
``log_softmax(scale_m * z_m + class_bias) + log p(m | x)``, where the router is a joint linear
classifier over every (member, label) on the members' features and ``p(m | x)`` the share of its
probability on member ``m``'s labels). The union logit of a label is the
``logsumexp`` of the scores of every member that knows it. Read as probabilities: the softmax
over all ``(member, label)`` pairs is a joint distribution, and a label's probability is the sum
over the members that know it. Two identical members that both know "dog" therefore give the
same prediction as one of them.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netmeld._atomic import make_temp, swap_in
from netmeld._outputs import check_replaceable, write_marker
from netmeld._version import __version__
from netmeld.errors import (
    DataError,
    IncompatibleMembersError,
    LabelError,
    MethodError,
    ModelFileError,
)
from netmeld.members.graph import (
    CapturedBody,
    Group,
    TracedMember,
    build_submodule,
    plan_groups,
    trace_member,
)
from netmeld.members.member import Member
from netmeld.members.rebuild import check_rebuilds
from netmeld.model.heads import Combiner, Extension, MemberOutputs
from netmeld.model.inputs import Preprocess, check_input_shapes, resolve_columns

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "netmeld.json"


class UnionHead(nn.Module):
    """Turns per-member logits into logits over the union label space (see module docs)."""

    index: torch.Tensor
    mask: torch.Tensor
    router_mean: torch.Tensor
    router_std: torch.Tensor

    def __init__(
        self,
        member_sizes: Sequence[int],
        index: torch.Tensor,
        mask: torch.Tensor,
        router_dim: int | None = None,
    ) -> None:
        super().__init__()
        m = len(member_sizes)
        self.member_sizes = tuple(int(s) for s in member_sizes)
        self.scale = nn.Parameter(torch.ones(m), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(m), requires_grad=False)
        self.class_bias = nn.Parameter(torch.zeros(sum(self.member_sizes)), requires_grad=False)
        self.register_buffer("index", index.clone())
        self.register_buffer("mask", mask.clone())
        self.router: nn.Linear | None = None
        self.router_source = "features"
        # without a router, how much each member answers: by "energy", the logsumexp of its
        # calibrated logits (the plain union softmax), or by "max-logit", the largest one;
        # within a member, its own softmax
        self.task_score = "energy"
        if router_dim is not None:
            self.add_router(router_dim)

    def add_router(self, dim: int, source: str = "features") -> None:
        """A gate with one score per (member, label); a member's gate is the logsumexp of its
        labels' scores, so the gate is a joint classifier used only to choose the member.

        ``source``: the gate reads the members' features (``"features"``) or the raw input
        flattened (``"input"``)."""
        if source not in ("features", "input"):
            raise ValueError(f"router source {source!r}: expected 'features' or 'input'")
        self.router_source = source
        self.router = nn.Linear(dim, sum(self.member_sizes)).requires_grad_(False)
        self.register_buffer("router_mean", torch.zeros(dim))
        self.register_buffer("router_std", torch.ones(dim))

    @torch.no_grad()
    def set_calibration(
        self,
        *,
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        class_bias: torch.Tensor | None = None,
    ) -> None:
        """Set what a method fitted: per-member ``scale`` and ``offset``, per-(member, label)
        ``class_bias``. Each must have its parameter's shape and finite values."""
        for name, value in (("scale", scale), ("offset", offset), ("class_bias", class_bias)):
            if value is not None:
                _set_fitted(self, name, getattr(self, name), value)

    @torch.no_grad()
    def set_router(
        self,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        """Set the gate's fitted weights and its input standardisation (after
        :meth:`add_router`)."""
        if self.router is None:
            raise MethodError("this union head has no router: add_router first")
        for name, target, value in (
            ("router.weight", self.router.weight, weight),
            ("router.bias", self.router.bias, bias),
            ("router_mean", self.router_mean, mean),
            ("router_std", self.router_std, std),
        ):
            if value is not None:
                _set_fitted(self, name, target, value)

    @property
    def router_dim(self) -> int | None:
        return None if self.router is None else self.router.in_features

    def member_scores(
        self, logits: Sequence[torch.Tensor], router_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Calibrated scores of every (member, label) pair, concatenated in member order."""
        parts = [z * self.scale[i] for i, z in enumerate(logits)]
        scores = torch.cat(parts, dim=1) + self.class_bias
        chunks = torch.split(scores, list(self.member_sizes), dim=1)
        if self.router is None and self.task_score == "max-logit":
            return torch.cat(
                [
                    F.log_softmax(c, dim=1) + c.max(dim=1, keepdim=True).values + self.offset[i]
                    for i, c in enumerate(chunks)
                ],
                dim=1,
            )
        if self.router is None:
            return torch.cat([c + self.offset[i] for i, c in enumerate(chunks)], dim=1)
        if router_input is None:
            raise ValueError("this union head has a router: pass router_input")
        gate = F.log_softmax(self.gate_logits(router_input), dim=1)
        return torch.cat(
            [F.log_softmax(c, dim=1) + gate[:, i : i + 1] for i, c in enumerate(chunks)], dim=1
        )

    def gate_logits(self, router_input: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities of each member answering, shape ``(N, members)``."""
        assert self.router is not None
        scores = self.router((router_input - self.router_mean) / self.router_std)
        parts = torch.split(scores, list(self.member_sizes), dim=1)
        return torch.stack([torch.logsumexp(p, dim=1) for p in parts], dim=1)

    def merge(self, scores: torch.Tensor) -> torch.Tensor:
        """Union logits: logsumexp over the members that know each label."""
        gathered = scores[:, self.index]  # (N, K_union, S)
        gathered = gathered.masked_fill(~self.mask, float("-inf"))
        return torch.logsumexp(gathered, dim=-1)

    def forward(
        self, logits: Sequence[torch.Tensor], router_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.merge(self.member_scores(logits, router_input))


def _set_fitted(owner: nn.Module, name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape != target.shape:
        raise MethodError(
            f"{type(owner).__name__}.{name}: a fitted value of shape {tuple(value.shape)}, "
            f"expected {tuple(target.shape)}"
        )
    if not torch.isfinite(value).all():
        raise MethodError(f"{type(owner).__name__}.{name}: the fitted value is not finite")
    target.copy_(value)


def union_labels(members: Sequence[Member]) -> tuple[list[str], dict[str, list[str]]]:
    """Union label order (first appearance, member order) and label -> members that know it."""
    labels: list[str] = []
    owners: dict[str, list[str]] = {}
    for m in members:
        for label in m.labels:
            if label not in owners:
                labels.append(label)
                owners[label] = []
            owners[label].append(m.name)
    return labels, owners


class CombinedModel(nn.Module):
    """One model over the union of its members' labels.

    Its input is raw (images in ``[0, 1]``, ``(N, C, H, W)``; vectors ``(N, F)``) of shape
    ``input_shape``; each group applies its members' preprocessing. ``forward`` returns logits
    over :attr:`labels`; :attr:`label_members` records which member(s) each label came from.
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        input_shape: Sequence[int] | None = None,
        plan: Sequence[Group] | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise IncompatibleMembersError("meld needs at least one member")
        names = [m.name for m in members]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise IncompatibleMembersError(
                    f"two members are named {name!r}; member names must be unique"
                )
        shape, self.feature_names, self._columns = resolve_columns(
            members, input_shape, feature_names
        )
        self.input_shape = shape if shape is not None else check_input_shapes(members, input_shape)
        self.members = list(members)
        traced = [trace_member(m) for m in members]
        self.plan = list(plan) if plan is not None else plan_groups(traced)
        self._build(traced)
        labels, owners = union_labels(members)
        self._union = (tuple(labels), {label: tuple(o) for label, o in owners.items()})
        self.combiner: Combiner | None = None
        self.extension: Extension | None = None
        self.method: dict[str, Any] = {"name": "concat", "params": {}}
        positions: dict[str, list[int]] = {label: [] for label in labels}
        offset = 0
        for m in members:
            for j, label in enumerate(m.labels):
                positions[label].append(offset + j)
            offset += len(m.labels)
        width = max(len(p) for p in positions.values())
        index = torch.zeros(len(labels), width, dtype=torch.long)
        mask = torch.zeros(len(labels), width, dtype=torch.bool)
        for i, label in enumerate(labels):
            index[i, : len(positions[label])] = torch.tensor(positions[label])
            mask[i, : len(positions[label])] = True
        self.union = UnionHead([len(m.labels) for m in members], index, mask)

    # -- construction -------------------------------------------------------------------
    def _build(self, traced: Sequence[TracedMember]) -> None:
        by_name = {t.member.name: t for t in traced}
        self.preprocess = nn.ModuleDict()
        self.trunks = nn.ModuleDict()
        self.necks = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.group_of: dict[str, int] = {}
        self.head_names: dict[str, str] = {}
        # members that torch.fx cannot trace -> why; they run whole and share no trunk
        self.untraced = {t.member.name: t.failure for t in traced if t.failure is not None}
        listed = [name for g in self.plan for name in g.members]
        if sorted(listed) != sorted(by_name):
            raise ModelFileError(
                f"the sharing plan lists members {listed}, expected {sorted(by_name)}"
            )
        for gi, group in enumerate(self.plan):
            key = str(gi)
            first = by_name[group.members[0]]
            self.preprocess[key] = Preprocess(
                self.input_shape, first.member.preprocessing, self._columns.get(first.member.name)
            )
            if group.cut is None or not first.traced:
                self.trunks[key] = CapturedBody(first.member.module, first.head_name)
            else:
                self.trunks[key] = build_submodule(first, 0, group.cut)
            for name in group.members:
                t = by_name[name]
                self.group_of[name] = gi
                self.head_names[name] = t.head_name
                if group.cut is None or not t.traced or group.cut >= len(t.body):
                    self.necks[name] = nn.Identity()
                else:
                    self.necks[name] = build_submodule(t, group.cut, len(t.body))
                head = t.member.module.get_submodule(t.head_name)
                self.heads[name] = copy.deepcopy(head)
        self._dedup_groups = [
            all(isinstance(self.necks[n], nn.Identity) for n in g.members) for g in self.plan
        ]

    # -- forward ------------------------------------------------------------------------
    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def run_members(self, x: torch.Tensor) -> MemberOutputs:
        """Run trunks, necks and heads; return per-member features and raw logits. Images of
        another height and width are resized per member (unless the model reads its raw input)."""
        shape = self.input_shape
        fits = x.dim() == len(shape) + 1 and tuple(x.shape[1:]) == shape
        if not fits and len(shape) == 3 and x.dim() == 4 and x.shape[1] == shape[0]:
            fits = not self.reads_input
        if not fits:
            raise DataError(
                f"expected input of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        trunk_out = [
            self.trunks[str(gi)](self.preprocess[str(gi)](x)) for gi in range(len(self.plan))
        ]
        features: list[torch.Tensor] = []
        for name in self.member_names:
            f = self.necks[name](trunk_out[self.group_of[name]])
            features.append(f.flatten(1) if f.dim() > 2 else f)
        return self.outputs_from_features(features)

    def outputs_from_features(self, features: Sequence[torch.Tensor]) -> MemberOutputs:
        """What :meth:`run_members` returns, from the members' head inputs (e.g. cached)."""
        features = list(features)
        logits = [self.heads[name](f) for name, f in zip(self.member_names, features, strict=True)]
        return MemberOutputs(features, logits, self.router_input_from(features))

    def router_input_from(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each distinct head input once (a deduplicated group's once), for a router."""
        router_parts = []
        for gi, group in enumerate(self.plan):  # keep router_columns() in step with this
            if self._dedup_groups[gi]:
                router_parts.append(features[self.member_names.index(group.members[0])])
            else:
                router_parts.extend(features[self.member_names.index(n)] for n in group.members)
        return torch.cat(router_parts, dim=1)

    @property
    def reads_input(self) -> bool:
        """Whether what follows the members reads the raw input too (a router on the input, a
        stacker fed the input): then the members' head inputs alone do not give the output."""
        if self.combiner is not None:
            return bool(getattr(self.combiner, "reads_input", False))
        return self.union.router is not None and self.union.router_source == "input"

    def router_columns(self) -> dict[str, tuple[int, int]]:
        """Where each member's head input sits in ``MemberOutputs.router_input``."""
        columns: dict[str, tuple[int, int]] = {}
        start = 0
        for gi, group in enumerate(self.plan):
            for k, name in enumerate(group.members):
                if self._dedup_groups[gi] and k > 0:
                    columns[name] = columns[group.members[0]]
                    continue
                head = self.heads[name]
                assert isinstance(head, nn.Linear)
                width = head.in_features
                columns[name] = (start, start + width)
                start += width
        return columns

    def base_logits(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        """Logits before any extension: the combiner's, or the union head's."""
        if self.combiner is not None:
            return self.combiner(out, x)
        if self.union.router is None:
            return self.union(out.logits)
        return self.union(out.logits, self.gate_input(out, x))

    def gate_input(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        """What the router reads: the members' features, or the raw input flattened."""
        return x.flatten(1) if self.union.router_source == "input" else out.router_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, (list, tuple)):  # texts, for a model of text members
            x = self._as_inputs(list(x))
        return self.logits_from(self.run_members(x), x)

    def logits_from(self, out: MemberOutputs, x: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits from the members' outputs (``x`` only when :attr:`reads_input`)."""
        if x is None:
            if self.reads_input:
                raise DataError("this model reads its raw input too; pass x")
            x = out.router_input
        logits = self.base_logits(out, x)
        if self.extension is not None:
            logits = torch.cat([logits, self.extension(out.features, logits)], dim=1)
        return logits

    @torch.no_grad()
    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The router's log-probability of each member answering, ``(N, members)``; ``None``
        when the model has no router."""
        if self.union.router is None or self.combiner is not None:
            return None
        return self.gate_from(self.run_members(x), x)

    def gate_from(self, out: MemberOutputs, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """:meth:`gate` from the members' outputs (``x`` only when :attr:`reads_input`)."""
        if self.union.router is None or self.combiner is not None:
            return None
        source = out.router_input if x is None else x
        return F.log_softmax(self.union.gate_logits(self.gate_input(out, source)), dim=1)

    # -- labels: the members' labels are the one source; the rest is derived -------------

    @property
    def union_labels(self) -> list[str]:
        """Every member's labels, each once, in first-appearance order (member order)."""
        return list(self._union[0])

    @property
    def labels(self) -> list[str]:
        """What ``forward`` scores, in column order: the union labels (or the combiner's
        labels), then the labels an extension added."""
        labels = self._base_labels()
        if self.extension is not None:
            labels += self.extension.labels
        return labels

    @property
    def label_members(self) -> dict[str, list[str]]:
        """Each label of :attr:`labels` -> the members that know it (none for added ones)."""
        owners = self._union[1]
        return {label: list(owners.get(label, ())) for label in self.labels}

    def trial_copy(self) -> CombinedModel:
        """A copy that shares this model's trunks and necks (read-only for a fit) but has its
        own heads, union head, combiner and method record: what cross-validation fits."""
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        clone._parameters = dict(self._parameters)
        clone._buffers = dict(self._buffers)
        clone.heads = copy.deepcopy(self.heads)
        clone.union = copy.deepcopy(self.union)
        clone.combiner = copy.deepcopy(self.combiner)
        clone.method = dict(self.method)
        return clone

    def set_combiner(self, combiner: Combiner | None) -> None:
        """Replace the union head by ``combiner`` (``None``: back to the union head)."""
        self.combiner = combiner

    def set_extension(self, extension: Extension | None) -> None:
        """Add (or with ``None`` remove) classes learnt after the fact (:func:`netmeld.extend`)."""
        if extension is not None:
            base = self._base_labels()
            clash = [label for label in extension.labels if label in base]
            if clash:
                raise LabelError(
                    f"label {clash[0]!r} is known to the model already; extension labels must "
                    "be new"
                )
        self.extension = extension

    def _base_labels(self) -> list[str]:
        if self.combiner is not None and self.combiner.labels is not None:
            return list(self.combiner.labels)
        return list(self._union[0])

    def _as_inputs(self, x: Any) -> torch.Tensor:
        from netmeld.data import check_finite, load_data

        if isinstance(x, torch.Tensor):
            check_finite(x, "inputs")
            return x

        return load_data(
            x, self.input_shape, what="inputs", feature_names=self.feature_names
        ).inputs

    @torch.no_grad()
    def predict(self, x: Any, batch_size: int = 256) -> list[str]:
        """Predicted label names for raw inputs ``x`` (a tensor, ndarray or pandas DataFrame)."""
        self.eval()
        x = self._as_inputs(x)
        preds = [self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        idx = torch.cat(preds).tolist() if preds else []
        labels = self.labels
        return [labels[i] for i in idx]

    @torch.no_grad()
    def predict_proba(self, x: Any, batch_size: int = 256) -> torch.Tensor:
        """Probabilities over :attr:`labels` for raw inputs ``x``."""
        self.eval()
        x = self._as_inputs(x)
        parts = [self(x[i : i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, len(self.labels))

    # -- information ----------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Parameters the combined model runs (a shared trunk counted once)."""
        return sum(t.numel() for t in _unique_state(self, parameters=True).values())

    def extra_repr(self) -> str:
        groups = ", ".join("+".join(g.members) for g in self.plan)
        return f"labels={len(self.labels)}, groups=[{groups}], method={self.method['name']!r}"

    # -- persistence -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON-ready description saved as ``netmeld.json``."""
        members = []
        for m in self.members:
            if m.architecture is None:
                raise ModelFileError(
                    f"member {m.name!r} was made from an in-memory {type(m.module).__name__} "
                    "with no architecture; to save without pickle netmeld must rebuild it: pass "
                    "architecture='package.module:callable' (or 'torchvision:NAME', "
                    "'timm:NAME') to Member"
                )
            members.append(
                {
                    "name": m.name,
                    "labels": list(m.labels),
                    "architecture": m.architecture.to_dict(),
                    "preprocessing": m.preprocessing.to_dict(),
                    "head": self.head_names[m.name],
                }
            )
        return {
            "format": "netmeld",
            "format_version": FORMAT_VERSION,
            "netmeld_version": __version__,
            "input_shape": list(self.input_shape),
            "labels": list(self.labels),
            "label_members": self.label_members,
            "members": members,
            "plan": [g.to_dict() for g in self.plan],
            "feature_names": self.feature_names,
            "union": {
                "router_dim": self.union.router_dim,
                "router_source": self.union.router_source,
                "task_score": self.union.task_score,
                "scale": self.union.scale.tolist(),
                "offset": self.union.offset.tolist(),
            },
            "combiner": None
            if self.combiner is None
            else {"kind": self.combiner.kind, "config": self.combiner.config()},
            "extension": None if self.extension is None else self.extension.config(),
            "method": self.method,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as a folder with ``model.safetensors`` and ``netmeld.json``, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        check_replaceable(path, overwrite=overwrite)
        config = self.config()
        for member in self.members:
            check_rebuilds(member)
        tensors = {k: v.detach().cpu().contiguous() for k, v in _unique_state(self).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp(path)
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "netmeld"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            write_marker(tmp, "model")
            swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _unique_state(model: nn.Module, parameters: bool = False) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (CapturedBody keeps the original head too); with
    ``parameters``, of the parameters only."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    items = model.named_parameters() if parameters else model.state_dict(keep_vars=True).items()
    for key, value in items:
        if id(value) in seen:
            continue
        seen.add(id(value))
        state[key] = value
    return state
