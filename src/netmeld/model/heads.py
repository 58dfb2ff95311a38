"""Heads that replace the union head: ensembles, stacking, a new head on the members' features,
and the few-shot class extension that can sit on top of any of them.

A combiner reads one forward pass of the members (:class:`MemberOutputs`) and
the raw input, and returns logits over its labels. Each kind is saved as its ``config()`` in
``netmeld.json`` plus its tensors, and rebuilt by :func:`combiner_from_config` (no pickle).

**Labels only some members know (ensembles).** Members' probabilities are aligned by label name.
With ``unknown="renormalize"`` (the default) a label's probability is the weighted mean over the
members that know it, and the vector is then renormalised to sum to one; with
``unknown="zero"`` a member that does not know a label counts as giving it probability 0. For
members with the same label set both rules are the ordinary (weighted) mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.errors import MethodError, ModelFileError


@dataclass
class MemberOutputs:
    """What one forward pass computes before the union head."""

    features: list[torch.Tensor]  # each member's head input, member order
    logits: list[torch.Tensor]  # each member's raw logits, member order
    router_input: torch.Tensor  # each distinct feature vector once, for a router


ENSEMBLE_MODES = ("mean", "vote", "max")
UNKNOWN_RULES = ("renormalize", "zero")


class Combiner(nn.Module):
    """Base of every combiner. ``labels`` is ``None`` when the output is the members' union."""

    kind: ClassVar[str]
    labels: list[str] | None = None

    def forward(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


def _placement(member_labels: Sequence[Sequence[str]], union: Sequence[str]) -> tuple[list, list]:
    column = {label: i for i, label in enumerate(union)}
    place, owner = [], []
    for m, labels in enumerate(member_labels):
        for label in labels:
            place.append(column[label])
            owner.append(m)
    return place, owner


class Ensemble(Combiner):
    """A post-hoc ensemble of prefit members aligned by label name.

    ``mode``: ``"mean"`` (weighted probability mean), ``"vote"`` (weighted majority vote of the
    members' top labels; ties broken by the probability mean), ``"max"`` (each label takes the
    highest probability any member gives it). Outputs are log-probabilities.
    """

    kind = "ensemble"
    owner: torch.Tensor
    placement: torch.Tensor

    def __init__(
        self,
        member_labels: Sequence[Sequence[str]],
        union: Sequence[str],
        mode: str = "mean",
        unknown: str = "renormalize",
    ) -> None:
        super().__init__()
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble mode {mode!r}: expected one of {ENSEMBLE_MODES}")
        if unknown not in UNKNOWN_RULES:
            raise ValueError(f"unknown-label rule {unknown!r}: expected one of {UNKNOWN_RULES}")
        self.mode = mode
        self.unknown = unknown
        self.member_labels = [list(m) for m in member_labels]
        self.union_size = len(union)
        place, owner = _placement(member_labels, union)
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long), persistent=False)
        # column j of the members' outputs -> its union label, as a (sum K_m, K) 0/1 matrix: the
        # sums over members are matrix products (ONNX exports them; index_add it cannot)
        placement = F.one_hot(torch.tensor(place, dtype=torch.long), self.union_size).float()
        self.register_buffer("placement", placement, persistent=False)
        self.weights = nn.Parameter(torch.ones(len(member_labels)), requires_grad=False)

    @torch.no_grad()
    def set_weights(self, weights: torch.Tensor) -> None:
        """Set the fitted member weights (one finite, non-negative value per member)."""
        if weights.shape != self.weights.shape:
            raise MethodError(
                f"ensemble weights: got shape {tuple(weights.shape)}, "
                f"expected {tuple(self.weights.shape)} (one per member)"
            )
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise MethodError("ensemble weights must be finite and non-negative")
        self.weights.copy_(weights)

    def mean_probs(self, probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean of member probabilities ``(N, sum K_m)`` over the union ``(N, K)``."""
        w = weights[self.owner]
        placement = self.placement.to(probs.dtype)
        num = (probs * w) @ placement
        if self.unknown == "renormalize":
            den = w @ placement
            p = num / den.clamp_min(1e-12)
        else:
            p = num / weights.sum().clamp_min(1e-12)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)

    def probabilities(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        probs = torch.cat([z.softmax(dim=1) for z in logits], dim=1)
        weights = self.weights
        if self.mode == "mean":
            return self.mean_probs(probs, weights)
        if self.mode == "max":  # probabilities are >= 0: a zero where a member lacks a label
            p = (probs[:, :, None] * self.placement.to(probs.dtype)).amax(dim=1)
            return p / p.sum(1, keepdim=True).clamp_min(1e-12)
        # vote: each member's top label gets the member's weight
        votes = []
        for z in logits:
            votes.append(F.one_hot(z.argmax(dim=1), z.shape[1]).to(probs.dtype))
        onehot = torch.cat(votes, dim=1) * weights[self.owner]
        counts = onehot @ self.placement.to(probs.dtype)
        counts = counts / weights.sum().clamp_min(1e-12)
        p = counts + 1e-3 * self.mean_probs(probs, weights)
        return p / p.sum(1, keepdim=True)

    def forward(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.probabilities(out.logits).clamp_min(1e-12))

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "unknown": self.unknown}


class Stacker(Combiner):
    """A meta-model ("model C") on the members' log-probabilities, optionally with more inputs.

    ``passthrough``: ``"none"``, ``"features"`` (the members' penultimate features) or
    ``"input"`` (the raw input, flattened). ``hidden=0`` is a logistic regression, otherwise a
    one-hidden-layer MLP. Inputs are standardised with statistics of the data it was fitted on.
    """

    kind = "stack"
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_dim: int, num_labels: int, passthrough: str = "none", hidden: int = 0):
        super().__init__()
        if passthrough not in ("none", "features", "input"):
            raise ValueError(f"passthrough {passthrough!r}: expected none, features or input")
        self.in_dim = int(in_dim)
        self.num_labels = int(num_labels)
        self.passthrough = passthrough
        self.hidden = int(hidden)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.meta: nn.Module
        if hidden:
            self.meta = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_labels)
            )
        else:
            self.meta = nn.Linear(in_dim, num_labels)

    @staticmethod
    def stack_inputs(
        logits: Sequence[torch.Tensor],
        features: Sequence[torch.Tensor],
        x: torch.Tensor | None,
        passthrough: str,
    ) -> torch.Tensor:
        parts = [F.log_softmax(z, dim=1) for z in logits]
        if passthrough == "features":
            parts.extend(features)
        elif passthrough == "input":
            assert x is not None
            parts.append(x.flatten(1))
        return torch.cat(parts, dim=1)

    def from_inputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.meta((z - self.mean) / self.std)

    @property
    def reads_input(self) -> bool:
        return self.passthrough == "input"

    def forward(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        return self.from_inputs(self.stack_inputs(out.logits, out.features, x, self.passthrough))

    def config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "num_labels": self.num_labels,
            "passthrough": self.passthrough,
            "hidden": self.hidden,
        }


FUSIONS = ("concat", "sum", "attention")


class FeatureHead(Combiner):
    """Many-to-one transfer: the members' penultimate features, fused, feed a new head.

    ``fusion``: ``"concat"`` (standardised features side by side), ``"sum"`` (each member's
    features projected to ``dim`` and added) or ``"attention"`` (the projections weighted by a
    learned softmax attention per input). The new head's labels may include labels no member
    knows.
    """

    kind = "transfer"
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, dims: Sequence[int], labels: Sequence[str], fusion: str = "concat", dim: int = 128
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r}: expected one of {FUSIONS}")
        self.dims = [int(d) for d in dims]
        self.labels = list(labels)
        self.fusion = fusion
        self.dim = int(dim)
        total = sum(self.dims)
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("std", torch.ones(total))
        if fusion == "concat":
            self.proj = nn.ModuleList()
            self.head = nn.Linear(total, len(self.labels))
        else:
            self.proj = nn.ModuleList(nn.Linear(d, self.dim) for d in self.dims)
            self.head = nn.Linear(self.dim, len(self.labels))
        self.query = nn.Parameter(torch.zeros(self.dim)) if fusion == "attention" else None

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        z = (torch.cat(list(features), dim=1) - self.mean) / self.std
        if self.fusion == "concat":
            return z
        parts = torch.split(z, self.dims, dim=1)
        projected = torch.stack([p(f) for p, f in zip(self.proj, parts, strict=True)], dim=1)
        if self.fusion == "sum":
            return projected.sum(dim=1)
        assert self.query is not None
        attn = (torch.tanh(projected) @ self.query).softmax(dim=1)  # (N, members)
        return (attn.unsqueeze(-1) * projected).sum(dim=1)

    def forward(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(out.features))

    def config(self) -> dict[str, Any]:
        return {"dims": self.dims, "labels": self.labels, "fusion": self.fusion, "dim": self.dim}


def random_features(dim: int, width: int, seed: int) -> torch.Tensor:
    """RanPAC's fixed random projection ``(dim, width)``: standard normal, drawn from ``seed``
    by its own generator (the same matrix on every machine and for every member)."""
    if width < 1:
        raise MethodError(f"projection width must be at least 1, got {width}")
    return torch.randn(dim, width, generator=torch.Generator().manual_seed(seed))


class StatisticsHead(Combiner):
    """A head over the union computed from member statistics: one linear layer over the
    members' shared head input, after an optional fixed random ReLU projection (RanPAC)."""

    kind = "statistics"
    projection: torch.Tensor

    def __init__(
        self, dim: int, labels: Sequence[str], projection: int | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.dim, self.labels = int(dim), list(labels)
        self.width, self.seed = projection, int(seed)
        if projection is None:
            self.register_buffer("projection", torch.zeros(0, 0))
        else:
            self.register_buffer("projection", random_features(self.dim, projection, seed))
        self.linear = nn.Linear(self.dim if projection is None else projection, len(self.labels))

    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        _set_value(self.linear.weight, weight)
        _set_value(self.linear.bias, bias)

    def forward(self, out: MemberOutputs, x: torch.Tensor) -> torch.Tensor:
        z = out.features[0]  # the members share it: one trunk
        return self.linear(z if self.width is None else torch.relu(z @ self.projection))

    def as_linear(self) -> nn.Linear:
        """The head as one ``nn.Linear`` over the shared trunk's features (no projection)."""
        if self.width is not None:
            raise MethodError("a head over a random projection is not one linear layer")
        return self.linear

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "labels": self.labels, "projection": self.width, "seed": self.seed}


def _set_value(target: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape != target.shape or not torch.isfinite(value).all():
        raise MethodError(
            f"a fitted head value of shape {tuple(value.shape)} is not finite "
            f"or does not fit {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(value)


COMBINERS: dict[str, type[Combiner]] = {
    "ensemble": Ensemble,
    "stack": Stacker,
    "transfer": FeatureHead,
    "statistics": StatisticsHead,
}


def combiner_from_config(
    kind: str, config: dict[str, Any], member_labels: Sequence[Sequence[str]], union: list[str]
) -> Combiner:
    """Rebuild a saved combiner (weights are loaded afterwards)."""
    if kind not in COMBINERS:
        raise ModelFileError(
            f"unknown combiner {kind!r} in the saved model; known: {', '.join(COMBINERS)}"
        )
    try:
        if kind == "ensemble":
            return Ensemble(member_labels, union, **config)
        return COMBINERS[kind](**config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"combiner {kind!r}: bad saved settings {config!r}: {exc}") from exc


class Extension(nn.Module):
    """Classes added after the fact from a few examples (see :func:`netmeld.extend`).

    Each member's penultimate features are L2-normalised, concatenated, centred and normalised
    again; a new class ``c`` scores ``logsumexp(base logits) + s * cos(f, w_c) + b_c``. So the
    base model's logits are untouched, and a new class wins exactly where its cosine similarity
    passes the threshold ``-b_c / s``; weights start as the normalised mean feature of the class
    (weight imprinting).
    """

    center: torch.Tensor

    def __init__(self, dim: int, labels: Sequence[str]) -> None:
        super().__init__()
        self.dim = int(dim)
        self.labels = list(labels)
        self.register_buffer("center", torch.zeros(dim))
        self.weight = nn.Parameter(torch.zeros(len(self.labels), dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(len(self.labels)), requires_grad=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)), requires_grad=False)

    @staticmethod
    def embed(features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each member's features L2-normalised, side by side (before centring)."""
        return torch.cat([F.normalize(f.flatten(1), dim=1) for f in features], dim=1)

    def cosine(self, embedded: torch.Tensor) -> torch.Tensor:
        f = F.normalize(embedded - self.center, dim=1)
        return f @ F.normalize(self.weight, dim=1).T

    def scores(self, embedded: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        level = torch.logsumexp(base, dim=1, keepdim=True)
        return level + self.log_scale.exp() * self.cosine(embedded) + self.bias

    def forward(self, features: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(features), base)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "labels": self.labels}
