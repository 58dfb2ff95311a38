"""Post-hoc ensembles and stacking of prefit members, aligned by label name.

=====================  =========  ==============================================================
method                 data       what it does
=====================  =========  ==============================================================
``mean``               none       probability mean (optionally with fixed member weights)
``vote``               none       majority vote of the members' top labels
``max-confidence``     none       each label takes the highest probability any member gives it
``weighted``           labeled    probability mean with member weights fitted by log-loss
``stack``              labeled    a meta-model ("model C") on the members' log-probabilities
=====================  =========  ==============================================================

The members are never changed: only the combiner on top of them is fitted. Members' labels are
matched by name; a label that only some members know follows the ``unknown`` rule documented
in :mod:`netmeld.combiners`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from netmeld.engine import small_fit
from netmeld.errors import MethodError
from netmeld.methods._fit import cross_validate
from netmeld.methods._registry import MethodParams, register_method
from netmeld.model.heads import Ensemble, Stacker

if TYPE_CHECKING:
    from netmeld.methods._extract import Extracted
    from netmeld.model.combined import CombinedModel


def member_logits(model: CombinedModel, extracted: Extracted) -> list[torch.Tensor]:
    """Each member's raw logits, recomputed from its cached features."""
    with torch.no_grad():
        return [
            model.heads[name](f)
            for name, f in zip(model.member_names, extracted.features, strict=True)
        ]


def _ensemble(model: CombinedModel, mode: str, unknown: str) -> Ensemble:
    return Ensemble([m.labels for m in model.members], model.union_labels, mode, unknown)


def _fixed_weights(model: CombinedModel, weights: dict[str, float] | None) -> torch.Tensor:
    w = torch.ones(len(model.members))
    if weights:
        unknown = sorted(set(weights) - set(model.member_names))
        if unknown:
            raise MethodError(
                f"weights name member {unknown[0]!r}, which is not a member "
                f"(members: {', '.join(model.member_names)})"
            )
        for name, value in weights.items():
            if value < 0:
                raise MethodError(f"weight of member {name!r} is {value}; weights must be >= 0")
            w[model.member_names.index(name)] = float(value)
        if w.sum() <= 0:
            raise MethodError("member weights sum to 0")
    return w


class MeanParams(MethodParams):
    weights: dict[str, float] | None = Field(
        None, description="fixed weight per member name (default: equal)"
    )
    unknown: Literal["renormalize", "zero"] = Field(
        "renormalize",
        description="a label some members do not know: average over the members that know it "
        "('renormalize'), or count it as probability 0 for the others ('zero')",
    )


@register_method(
    "mean",
    data="none",
    params=MeanParams,
    reference="probability averaging of prefit members (e.g. Lakshminarayanan et al., deep "
    "ensembles, NeurIPS 2017), aligned by label name",
)
def fit_mean(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MeanParams,
) -> None:
    """Average the members' probabilities, aligned by label name."""
    ensemble = _ensemble(model, "mean", params.unknown)
    ensemble.set_weights(_fixed_weights(model, params.weights))
    model.set_combiner(ensemble)


class VoteParams(MethodParams):
    weights: dict[str, float] | None = Field(
        None, description="fixed vote weight per member name (default: one vote each)"
    )


@register_method(
    "vote",
    data="none",
    params=VoteParams,
    reference="(weighted) majority voting of prefit classifiers; ties broken by the mean "
    "probability",
)
def fit_vote(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: VoteParams,
) -> None:
    """Majority vote of the members' top labels (ties: the probability mean decides)."""
    ensemble = _ensemble(model, "vote", "renormalize")
    ensemble.set_weights(_fixed_weights(model, params.weights))
    model.set_combiner(ensemble)


@register_method(
    "max-confidence",
    data="none",
    reference="max-confidence ensemble: the most confident member's probability per label",
)
def fit_max_confidence(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: MethodParams,
) -> None:
    """Each label takes the highest probability any member gives it."""
    model.set_combiner(_ensemble(model, "max", "renormalize"))


class WeightedParams(MethodParams):
    unknown: Literal["auto", "renormalize", "zero"] = Field(
        "auto",
        description="rule for labels only some members know (see 'mean'); 'auto' fits both and "
        "keeps the one with the lower log-loss (with 'zero' the weights also act as the "
        "members' priors, which matters when label sets are disjoint)",
    )
    steps: int = Field(100, ge=1, description="L-BFGS iterations")


@register_method(
    "weighted",
    data="labeled",
    params=WeightedParams,
    reference="weighted probability averaging with weights fitted by log-loss on held-out "
    "labels (cf. Caruana et al., ensemble selection, ICML 2004)",
)
def fit_weighted(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: WeightedParams,
) -> None:
    """Probability mean with member weights fitted by log-loss on labeled data."""
    assert extracted is not None and targets is not None
    probs = torch.cat([z.softmax(dim=1) for z in member_logits(model, extracted)], dim=1)
    rules = ["renormalize", "zero"] if params.unknown == "auto" else [params.unknown]
    best: tuple[float, Ensemble] | None = None
    for rule in rules:
        ensemble = _ensemble(model, "mean", rule)
        raw = torch.zeros(len(model.members))

        def loss_fn(ensemble: Ensemble = ensemble, raw: torch.Tensor = raw) -> torch.Tensor:
            p = ensemble.mean_probs(probs, raw.softmax(0) * len(model.members))
            return F.nll_loss(torch.log(p.clamp_min(1e-12)), targets)

        small_fit([raw], loss_fn, params.steps, optimizer="lbfgs")
        ensemble.set_weights(raw.detach().softmax(0) * len(model.members))
        with torch.no_grad():
            loss = float(loss_fn())
        if best is None or loss < best[0]:
            best = (loss, ensemble)
    assert best is not None
    ensemble = best[1]
    model.set_combiner(ensemble)
    model.method["fitted"] = {
        "unknown": ensemble.unknown,
        "weights": {
            n: round(float(w), 4) for n, w in zip(model.member_names, ensemble.weights, strict=True)
        },
    }


class StackParams(MethodParams):
    meta: Literal["logistic", "mlp"] = Field(
        "logistic", description="the meta-model: logistic regression or a one-hidden-layer MLP"
    )
    hidden: int = Field(32, ge=1, description="hidden units of the MLP meta-model")
    passthrough: Literal["none", "features", "input"] = Field(
        "none",
        description="also feed the meta-model the members' penultimate features or the raw "
        "input (scikit-learn's passthrough)",
    )
    l2: float | None = Field(
        None, ge=0, description="L2 penalty; None picks it by stratified cross-validation"
    )
    folds: int = Field(5, ge=2, description="cross-validation folds used to pick l2")
    steps: int = Field(200, ge=1, description="optimiser iterations")


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _train_meta(
    stacker: Stacker, z: torch.Tensor, y: torch.Tensor, l2: float, params: StackParams
) -> None:
    with torch.no_grad():
        stacker.mean.copy_(z.mean(0))
        stacker.std.copy_(z.std(0).clamp_min(1e-6) if len(z) > 1 else torch.ones(z.shape[1]))
    weights = [p for name, p in stacker.meta.named_parameters() if name.endswith("weight")]
    parameters: list[torch.Tensor] = list(stacker.meta.parameters())

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(stacker.from_inputs(z), y) + l2 * sum(
            w.pow(2).sum() for w in weights
        )

    if params.meta == "logistic":
        with torch.no_grad():
            for p in parameters:
                p.zero_()
        small_fit(
            parameters,
            loss_fn,
            params.steps,
            optimizer="lbfgs",
            examples=len(y),
            penalty=l2,
            what="stack",
        )
    else:
        small_fit(
            parameters, loss_fn, params.steps, lr=1e-2, examples=len(y), penalty=l2, what="stack"
        )


@register_method(
    "stack",
    data="labeled",
    params=StackParams,
    reference="stacked generalization (Wolpert 1992), as scikit-learn's StackingClassifier "
    "with prefit estimators: a meta-model on the members' outputs",
)
def fit_stack(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: StackParams,
) -> None:
    """A meta-model on the members' log-probabilities (and optionally features or input)."""
    assert extracted is not None and targets is not None
    if params.passthrough == "input" and extracted.inputs is None:
        raise MethodError("stack: passthrough='input' needs the raw inputs")
    z = Stacker.stack_inputs(
        member_logits(model, extracted), extracted.features, extracted.inputs, params.passthrough
    )
    hidden = params.hidden if params.meta == "mlp" else 0
    k = len(model.union_labels)

    def make() -> Stacker:
        return Stacker(z.shape[1], k, params.passthrough, hidden)

    fitted: dict[str, object] = {}
    l2 = params.l2
    if l2 is None:

        def fit_predict(l2: float, train: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
            trial = make()
            _train_meta(trial, z[train], targets[train], l2, params)
            with torch.no_grad():
                return trial.from_inputs(z[held])

        l2, accuracy, _ = cross_validate(L2_GRID, targets, params.folds, fit_predict)
        fitted["cv_accuracy"] = {str(c): round(v, 4) for c, v in accuracy.items()}
    stacker = make()
    _train_meta(stacker, z, targets, l2, params)
    fitted["l2"] = l2
    model.set_combiner(stacker)
    model.method["fitted"] = fitted
