"""A semi-supervised union head: a few labels and unlabeled inputs, used together.

``semi`` fits the same gate as ``infomax`` (a router started from the centred, norm-aligned
heads, with the members' temperatures) to two terms at once: the information-maximisation loss
on the unlabeled inputs (confident and diverse answers) and the cross-entropy on the labeled
ones. The labels fix what information maximisation alone cannot: which member answers where two
members' confident answers compete. Give the labeled set as ``data`` and the unlabeled inputs as
``unlabeled``::

    netmeld.meld(members, "semi", (x_few, labels_few), unlabeled=x_pool)

Without unlabeled inputs it is the labeled ``router`` fitted with an entropy term on its own
labeled rows; the method warns.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from netmeld.methods._extract import Extracted
from netmeld.methods._registry import register_method
from netmeld.methods.union import TuneParams, information_loss, tune_gate

if TYPE_CHECKING:
    from netmeld.model.combined import CombinedModel


class SemiParams(TuneParams):
    labeled_weight: float = Field(
        0.3, gt=0, description="weight of the labeled cross-entropy beside the unlabeled loss"
    )
    diversity: float = Field(1.0, ge=0, description="weight of the marginal-entropy term")


def _joined(labeled: Extracted, unlabeled: Extracted) -> Extracted:
    """Unlabeled rows first, then the labeled ones (head inputs and router input)."""
    pairs = zip(unlabeled.features, labeled.features, strict=True)
    features = [torch.cat([u, f]) for u, f in pairs]
    return Extracted(features, torch.cat([unlabeled.router_input, labeled.router_input]))


@register_method(
    "semi",
    data="labeled",
    unlabeled=True,
    params=SemiParams,
    reference="information maximization on unlabeled inputs (SHOT, Liang et al., ICML 2020) "
    "plus cross-entropy on a few labels (entropy minimization, Grandvalet & Bengio 2005), "
    "fitting a router gate over frozen features",
)
def fit_semi(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: SemiParams,
) -> None:
    """A gate fitted to a few labels and to confident, diverse answers on unlabeled inputs."""
    assert extracted is not None and targets is not None
    unlabeled = extracted.unlabeled
    if unlabeled is None:
        warnings.warn(
            "method 'semi' got no unlabeled inputs (unlabeled=...); it fits on the labeled "
            "data alone",
            stacklevel=4,
        )
        unlabeled = extracted.subset(torch.arange(0))
    n = len(unlabeled)
    joined = _joined(extracted, unlabeled)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        pool = out[:n] if n else out
        labeled = F.cross_entropy(out[n:], targets)
        return information_loss(pool, params.diversity) + params.labeled_weight * labeled

    tune_gate(model, joined, loss_fn, steps=params.steps, lr=params.lr, anchor=params.anchor)
    model.method["fitted"] = {"labeled": len(targets), "unlabeled": n}
