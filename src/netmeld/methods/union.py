"""Union-head methods: one classifier over the union of the members' label sets.

They all leave the members' trunks untouched and fit only the :class:`~netmeld.combined.UnionHead`
(per-member scale and offset, per-class bias, an optional router) and, for some, the members'
head copies inside the combined model.

=====================  =========  ==============================================================
method                 data       what it fits
=====================  =========  ==============================================================
``concat``             none       nothing: the naive "concatenate the heads" baseline
``weight-norm``        none       per-member scale equalising the heads' mean row norms (WA)
``max-logit``          none       weight-norm; members weighed by their largest logit, not energy
``bn-standardize``     none       per-member scale from the logits' spread under BatchNorm stats
``infomax``            unlabeled  a router gate fitted to maximise the union's mutual information
``semi``               both       the infomax gate fitted to a few labels too (:mod:`.semi`)
``calibrate``          labeled    per-member scale, offset and per-class bias (cross-entropy)
``finetune``           labeled    all heads fine-tuned jointly, anchored to their start
``router``             labeled    a gate choosing the member, on the members' features
``select``             labeled    the labeled method with the best cross-validated accuracy
=====================  =========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netmeld.engine import small_fit
from netmeld.errors import MethodError
from netmeld.members.moments import bn_feature_moments
from netmeld.methods._fit import cross_validate
from netmeld.methods._registry import MethodParams, get_method, register_method

if TYPE_CHECKING:
    from netmeld.methods._extract import Extracted
    from netmeld.model.combined import CombinedModel


def _heads(model: CombinedModel) -> list[nn.Linear]:
    heads = [model.heads[name] for name in model.member_names]
    assert all(isinstance(h, nn.Linear) for h in heads)
    return heads  # type: ignore[return-value]


@torch.no_grad()
def center_heads(model: CombinedModel) -> None:
    """Subtract each head's mean row and mean bias: a member's own softmax is unchanged."""
    for head in _heads(model):
        head.weight.sub_(head.weight.mean(dim=0, keepdim=True))
        if head.bias is not None:
            head.bias.sub_(head.bias.mean())


@torch.no_grad()
def _norm_scales(model: CombinedModel) -> torch.Tensor:
    norms = torch.stack([h.weight.norm(dim=1).mean() for h in _heads(model)])
    return norms.mean() / norms


@register_method(
    "concat",
    data="none",
    reference="the naive baseline: concatenate the members' logits and take one softmax",
)
def fit_concat(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MethodParams,
) -> None:
    """Concatenate the members' raw logits (the naive baseline, miscalibrated)."""


@register_method(
    "weight-norm",
    data="none",
    reference="Zhao et al., Maintaining Discrimination and Fairness in Class Incremental "
    "Learning (weight aligning), CVPR 2020",
)
def fit_weight_norm(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MethodParams,
) -> None:
    """Scale each member's logits so that its head's mean row norm equals the average."""
    model.union.set_calibration(scale=_norm_scales(model))


@register_method(
    "max-logit",
    data="none",
    reference="the max-logit task score for choosing the member (Hendrycks et al. 2022; as a "
    "task-prediction baseline in TPL, Lin et al., ICLR 2024), on weight-aligned heads",
)
def fit_max_logit(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MethodParams,
) -> None:
    """Weight-aligned heads; each member's share is the softmax of the members' largest logits."""
    center_heads(model)
    model.union.set_calibration(scale=_norm_scales(model))
    model.union.task_score = "max-logit"


def fit_center_norm(model: CombinedModel, extracted: Extracted | None = None) -> None:
    """Centre each head (softmax-invariant), then equalise the members' logit spreads.

    With data the spread is measured (each member's logits get the members' average standard
    deviation on the data); without, it is the heads' mean row norm (weight aligning).
    """
    center_heads(model)
    if extracted is None:
        model.union.set_calibration(scale=_norm_scales(model))
    else:
        model.union.set_calibration(scale=_data_scales(model, extracted))


@torch.no_grad()
def _data_scales(model: CombinedModel, extracted: Extracted) -> torch.Tensor:
    """Scales giving each member's logits the same standard deviation on ``extracted``."""
    spreads = []
    for h, f in zip(_heads(model), extracted.features, strict=True):
        z = h(f)
        spreads.append(z.std() if z.numel() > 1 else torch.tensor(1.0))
    spread = torch.stack(spreads).clamp_min(1e-6)
    return spread.mean() / spread


@register_method(
    "bn-standardize",
    data="none",
    reference="logit standardisation with feature moments from BatchNorm running statistics "
    "(cf. data-free statistics in Yin et al., DeepInversion, CVPR 2020)",
)
def fit_bn_standardize(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MethodParams,
) -> None:
    """Divide each member's logits by their spread predicted from BatchNorm statistics."""
    scales = []
    for member, head in zip(model.members, _heads(model), strict=True):
        mean, var = bn_feature_moments(member)
        if mean.numel() != head.in_features:
            raise MethodError(
                f"bn-standardize: member {member.name!r}: the BatchNorm has {mean.numel()} "
                f"channels but the head reads {head.in_features} features"
            )
        sd = (head.weight.detach().pow(2) @ var).sqrt()
        scales.append(1.0 / sd.mean())
    scale = torch.stack(scales)
    model.union.set_calibration(scale=scale / scale.mean())


# -- fitting helpers ---------------------------------------------------------------------------


class TuneParams(MethodParams):
    """Parameters of the methods that fit a gate or the heads with Adam."""

    steps: int = Field(300, ge=1, description="Adam steps over the data")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    anchor: float = Field(1e-2, ge=0, description="L2 pull towards the starting weights")


class InfomaxParams(TuneParams):
    diversity: float = Field(1.0, ge=0, description="weight of the marginal-entropy term")
    pseudo_labels: float = Field(
        0.0, ge=0, description="weight of the cross-entropy on clustered pseudo-labels (0: off)"
    )
    rounds: int = Field(1, ge=1, description="times the pseudo-labels are recomputed")
    gate: bool = Field(
        True, description="fit a router (joint gate) instead of adapting the heads themselves"
    )


@register_method(
    "infomax",
    data="unlabeled",
    params=InfomaxParams,
    reference="information maximization with optional clustered pseudo-labels (Liang et al., "
    "SHOT, ICML 2020) fitting a router gate (or the heads) over frozen features",
)
def fit_infomax(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: InfomaxParams,
) -> None:
    """Fit a gate (or the heads) so the union is confident and diverse on unlabeled data."""
    assert extracted is not None
    pseudo: torch.Tensor | None = None

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        loss = information_loss(out, params.diversity)
        if pseudo is not None:
            loss = loss + params.pseudo_labels * F.cross_entropy(out, pseudo)
        return loss

    if params.gate:
        if params.rounds > 1:
            raise MethodError("infomax: 'rounds' > 1 needs gate=false (the heads are adapted)")
        fit_center_norm(model, extracted)
        if params.pseudo_labels > 0:
            pseudo = cluster_pseudo_labels(model, extracted)
        tune_gate(model, extracted, loss_fn, steps=params.steps, lr=params.lr, anchor=params.anchor)
        return
    fit_center_norm(model, extracted)
    start = None
    for _ in range(params.rounds):
        if params.pseudo_labels > 0:
            pseudo = cluster_pseudo_labels(model, extracted)
        start = _tune_heads(
            model,
            extracted,
            loss_fn,
            steps=max(1, params.steps // params.rounds),
            lr=params.lr,
            anchor=params.anchor,
            start=start,
        )


def information_loss(out: torch.Tensor, diversity: float) -> torch.Tensor:
    """Mean conditional entropy minus ``diversity`` times the marginal entropy (SHOT's IM)."""
    p = out.softmax(dim=1)
    cond = -(p * torch.log(p + 1e-12)).sum(1).mean()
    marg = p.mean(0)
    return cond + diversity * (marg * torch.log(marg + 1e-12)).sum()


@torch.no_grad()
def cluster_pseudo_labels(model: CombinedModel, extracted: Extracted) -> torch.Tensor:
    """SHOT's pseudo-labels: nearest class centroid (cosine) in feature space, twice refined.

    Centroids start as the prediction-weighted means of the features, then are recomputed from
    the hard assignment.
    """
    probs = model.union(_centered_logits(model, extracted), None).softmax(dim=1)
    feats = F.normalize(extracted.router_input, dim=1)
    feats = torch.cat([feats, torch.ones(len(feats), 1)], dim=1)
    centroids = probs.T @ feats / (probs.sum(0)[:, None] + 1e-8)
    labels = (F.normalize(feats, dim=1) @ F.normalize(centroids, dim=1).T).argmax(1)
    for _ in range(2):
        onehot = F.one_hot(labels, probs.shape[1]).float()
        centroids = onehot.T @ feats / (onehot.sum(0)[:, None] + 1e-8)
        labels = (F.normalize(feats, dim=1) @ F.normalize(centroids, dim=1).T).argmax(1)
    return labels


def _tune_heads(
    model: CombinedModel,
    extracted: Extracted,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    lr: float,
    anchor: float,
    start: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Fit the head copies (with the union's scales folded in) to minimise ``loss_fn``.

    The heads are pulled towards ``start`` (default: where they begin); returns ``start``.
    """
    heads = _heads(model)
    union = model.union
    with torch.no_grad():
        for i, head in enumerate(heads):  # fold the scales into the heads
            head.weight.mul_(union.scale[i])
            if head.bias is not None:
                head.bias.mul_(union.scale[i]).add_(union.offset[i])
    union.set_calibration(scale=torch.ones_like(union.scale), offset=torch.zeros_like(union.offset))
    if start is None:
        start = [p.detach().clone() for h in heads for p in h.parameters()]
    params_ = [p for h in heads for p in h.parameters()]
    feats = extracted.features
    anchors = start

    def objective() -> torch.Tensor:
        out = union([h(f) for h, f in zip(heads, feats, strict=True)])
        return loss_fn(out) + anchor * sum(
            (p - s).pow(2).sum() for p, s in zip(params_, anchors, strict=True)
        )

    small_fit(
        params_, objective, steps, lr=lr, examples=len(feats[0]), penalty=anchor, what="finetune"
    )
    return start


def _centered_logits(model: CombinedModel, extracted: Extracted) -> list[torch.Tensor]:
    """Member logits recomputed from features with the (possibly centred) head copies."""
    with torch.no_grad():
        return [h(f) for h, f in zip(_heads(model), extracted.features, strict=True)]


class CalibrateParams(MethodParams):
    steps: int = Field(200, ge=1, description="L-BFGS iterations")
    l2: float = Field(1e-2, ge=0, description="L2 penalty on the per-class bias")


@register_method(
    "calibrate",
    data="labeled",
    params=CalibrateParams,
    reference="temperature scaling (Guo et al., ICML 2017) per member, with offsets and "
    "per-class bias, fitted by cross-entropy on a few labels",
)
def fit_calibrate(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: CalibrateParams,
) -> None:
    """Per-member temperature and offset and per-class bias, fitted on a few labels."""
    assert extracted is not None and targets is not None
    center_heads(model)
    logits = _centered_logits(model, extracted)
    base = _data_scales(model, extracted)
    m = len(model.members)
    log_scale = torch.zeros(m)
    offset = torch.zeros(m)
    bias = torch.zeros(model.union.class_bias.numel())
    union = model.union

    def loss_fn() -> torch.Tensor:
        scale = base * torch.exp(log_scale)
        parts = [z * scale[i] + offset[i] for i, z in enumerate(logits)]
        out = union.merge(torch.cat(parts, dim=1) + bias)
        return F.cross_entropy(out, targets) + params.l2 * bias.pow(2).sum()

    small_fit([log_scale, offset, bias], loss_fn, params.steps, optimizer="lbfgs")
    union.set_calibration(
        scale=base * torch.exp(log_scale), offset=offset - offset.mean(), class_bias=bias
    )


class FinetuneParams(TuneParams):
    pass


@register_method(
    "finetune",
    data="labeled",
    params=FinetuneParams,
    reference="few-shot fine-tuning of the concatenated heads from their centred, norm-aligned "
    "start, with an L2 anchor (cf. L2-SP, Li et al., ICML 2018)",
)
def fit_finetune(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: FinetuneParams,
) -> None:
    """Fine-tune all heads jointly on a few labels, anchored to their centred start."""
    assert extracted is not None and targets is not None
    fit_center_norm(model, extracted)
    _tune_heads(
        model,
        extracted,
        lambda out: F.cross_entropy(out, targets),
        steps=params.steps,
        lr=params.lr,
        anchor=params.anchor,
    )


class RouterParams(TuneParams):
    anchor: float = Field(1e-3, ge=0, description="L2 pull towards the starting weights")
    gate_on: Literal["features", "input"] = Field(
        "features",
        description="what the gate reads: the members' features (started from their heads) or "
        "the raw input, flattened (started from zero)",
    )


@register_method(
    "router",
    data="labeled",
    params=RouterParams,
    reference="a mixture of prefit experts (Jacobs et al. 1991) whose gate is a joint linear "
    "classifier started from the members' centred heads and fine-tuned on a few labels",
)
def fit_router(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: RouterParams,
) -> None:
    """A gate on the members' features picks the member; each member picks within its labels."""
    assert extracted is not None and targets is not None
    tune_gate(
        model,
        extracted,
        lambda out: F.cross_entropy(out, targets),
        steps=params.steps,
        lr=params.lr,
        anchor=params.anchor,
        source=params.gate_on,
    )


def gate_features(extracted: Extracted, source: str) -> torch.Tensor:
    """What a router with ``source`` reads, for the cached data."""
    if source == "features":
        return extracted.router_input
    if extracted.inputs is None:
        raise MethodError("a router on the raw input needs the raw inputs")
    return extracted.inputs.flatten(1)


def tune_gate(
    model: CombinedModel,
    extracted: Extracted,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    lr: float,
    anchor: float,
    source: str = "features",
) -> None:
    """Add a router started from the centred, norm-aligned heads and fit it to ``loss_fn``.

    The gate starts as the heads' joint classifier (so it starts where ``weight-norm`` after
    centring would answer) and is pulled towards that start with an L2 ``anchor``; the members'
    temperatures are fitted with it. A gate on the raw input (``source="input"``) starts at zero.
    """
    fit_center_norm(model, extracted)
    union = model.union
    x = gate_features(extracted, source)
    union.add_router(x.shape[1], source)
    router = union.router
    assert router is not None
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    columns = model.router_columns()
    w0 = torch.zeros_like(router.weight)
    b0 = torch.zeros_like(router.bias)
    with torch.no_grad():
        row = 0
        for i, (name, head) in enumerate(zip(model.member_names, _heads(model), strict=True)):
            if source == "input":
                break
            start, stop = columns[name]
            rows = slice(row, row + head.out_features)
            w = head.weight * union.scale[i]
            w0[rows, start:stop] = w * std[start:stop]
            b0[rows] = w @ mean[start:stop]
            if head.bias is not None:
                b0[rows] += head.bias * union.scale[i]
            row += head.out_features
    union.set_router(weight=w0, bias=b0, mean=mean, std=std)
    log_scale = torch.zeros(len(model.members))
    base = union.scale.detach().clone()
    union.set_calibration(scale=torch.ones_like(base))
    logits = _centered_logits(model, extracted)

    def objective() -> torch.Tensor:
        scaled = [z * base[i] * torch.exp(log_scale[i]) for i, z in enumerate(logits)]
        return loss_fn(union(scaled, x)) + anchor * (
            (router.weight - w0).pow(2).sum() + (router.bias - b0).pow(2).sum()
        )

    small_fit(
        [router.weight, router.bias, log_scale],
        objective,
        steps,
        lr=lr,
        examples=len(x),
        penalty=anchor,
        what="router",
    )
    union.set_calibration(scale=base * torch.exp(log_scale))


class SelectParams(MethodParams):
    candidates: tuple[str, ...] = Field(
        ("calibrate", "finetune", "router"),
        min_length=1,
        description="labeled methods to choose from",
    )
    folds: int = Field(5, ge=2, description="cross-validation folds (stratified by label)")


@register_method(
    "select",
    data="labeled",
    params=SelectParams,
    reference="model selection by stratified k-fold cross-validation on the few labels "
    "(as scikit-learn's GridSearchCV), then a refit on all of them",
)
def fit_select(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: SelectParams,
) -> None:
    """Pick the labeled method with the best cross-validated accuracy, then fit it on all."""
    assert extracted is not None and targets is not None
    infos = [get_method(name) for name in params.candidates]
    for info in infos:
        if info.data != "labeled" or info.name == "select":
            raise MethodError(f"select: candidate {info.name!r} is not a labeled method")
    by_name = {info.name: info for info in infos}

    def fit_predict(name: str, train: torch.Tensor, held_out: torch.Tensor) -> torch.Tensor:
        info = by_name[name]
        trial = model.trial_copy()
        info.fit(trial, extracted.subset(train), targets[train], info.validate_params({}))
        with torch.no_grad():
            return trial.union(
                [h(f[held_out]) for h, f in zip(_heads(trial), extracted.features, strict=True)],
                gate_features(extracted, trial.union.router_source)[held_out]
                if trial.union.router is not None
                else None,
            )

    # the best cross-validated accuracy; ties go to the lower cross-validated log-loss
    name, scores, losses = cross_validate(list(by_name), targets, params.folds, fit_predict)
    best = by_name[name]
    best.fit(model, extracted, targets, best.validate_params({}))
    model.method["fitted"] = {"selected": best.name, "cv_accuracy": scores, "cv_log_loss": losses}
