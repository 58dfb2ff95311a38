"""Few-shot class extension of any combined model: ``netmeld.extend(model, examples, labels)``.

New classes are added from a few examples each, in two steps:

1. **Weight imprinting** (Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018):
   the members' penultimate features are L2-normalised per member, concatenated, centred and
   normalised again; a new class's weight is the normalised mean of its examples' features.
   Its score is ``logsumexp(old logits) + s * cos(f, w) + b`` (:class:`~netmeld.combiners.
   Extension`): the old logits are untouched, and the new class wins where its cosine passes
   the threshold ``-b / s``. The threshold bounds the false positives: it is the
   ``1 - max_false_positives`` quantile of the similarity of the other inputs given (unlabeled
   inputs, old-class examples, examples of the other new classes) to the class; with none of
   them it is 3/4 of its examples' similarity, with a warning.
2. **Optional fine-tuning** of the new weights: cross-entropy on the examples plus
   distillation of the old model's outputs on the ``unlabeled`` inputs (and on any examples of
   old classes), whose targets give the new classes probability 0 (as in Learning without
   Forgetting, Li & Hoiem 2016); the thresholds are then set again by the same rule, so old
   classes keep their accuracy.

The result is a new :class:`~netmeld.combined.CombinedModel`; the model given is not changed.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from netmeld.data import Stream, open_data
from netmeld.engine import small_fit
from netmeld.errors import DataError, LabelError, MethodError
from netmeld.model.combined import CombinedModel
from netmeld.model.heads import Extension
from netmeld.runtime import on_device, resolve_device, seeded


@torch.no_grad()
@torch.no_grad()
def _embed(
    model: CombinedModel, stream: Stream, run: dict[str, Any], progress: bool | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embedded features (before centring), the model's full logits and the labels (if any)
    of the ``stream``'s inputs, a batch at a time on ``run["device"]``."""
    model.eval()
    dev = resolve_device(run["device"])
    feats, logits, labels = [], [], []
    with on_device(model, dev):
        for batch in stream.batches(
            run["batch_size"],
            workers=run["workers"],
            progress=progress,
            description="running the model",
        ):
            x = batch.inputs.to(dev)
            out = model.run_members(x)
            feats.append(Extension.embed(out.features).cpu())
            logits.append(model.logits_from(out, x).cpu())
            labels.extend(batch.labels or [])
    return torch.cat(feats), torch.cat(logits), labels


def _imprinted(
    previous: Extension | None,
    emb: torch.Tensor,
    d_emb: torch.Tensor,
    given: Sequence[str],
    new_labels: Sequence[str],
    scale: float,
) -> Extension:
    """The extension with the new labels imprinted (each new class's weight: its normalised
    mean example); earlier added classes are kept exactly."""
    labels = list(new_labels)
    ext = Extension(emb.shape[1], ([] if previous is None else previous.labels) + labels)
    with torch.no_grad():
        if previous is not None:
            ext.center.copy_(previous.center)
            ext.log_scale.copy_(previous.log_scale)
            k = len(previous.labels)
            ext.weight[:k] = previous.weight
            ext.bias[:k] = previous.bias
        else:
            ext.center.copy_(torch.cat([emb, d_emb]).mean(0))
            ext.log_scale.fill_(math.log(scale))
    first_new = 0 if previous is None else len(previous.labels)
    with torch.no_grad():
        for j, label in enumerate(labels):
            rows = F.normalize(emb[[lb == label for lb in given]] - ext.center, dim=1)
            ext.weight[first_new + j] = F.normalize(rows.mean(0), dim=0)
    return ext


@dataclass(frozen=True)
class _Negatives:
    """What the new classes' thresholds are set against: held-out distillation inputs and
    the examples (with their labels ``given``), and the share they may claim."""

    calib_emb: torch.Tensor
    emb: torch.Tensor
    given: Sequence[str]
    max_false_positives: float


def _set_thresholds(
    ext: Extension, new_labels: Sequence[str], first_new: int, neg: _Negatives
) -> list[float]:
    """Set each new class's cosine threshold (its bias): the (1 - max_false_positives / new
    classes) quantile of its similarity to inputs that are not of it (old-class inputs, other
    new classes), so that together the new classes claim at most that share of them."""
    s = float(ext.log_scale.exp())
    taus = []
    with torch.no_grad():
        for j, label in enumerate(new_labels):
            w = F.normalize(ext.weight[first_new + j], dim=0)
            negatives = torch.cat(
                [neg.calib_emb, neg.emb[[lb != label and lb in new_labels for lb in neg.given]]]
            )
            if len(negatives):
                others = F.normalize(negatives - ext.center, dim=1) @ w
                share = neg.max_false_positives / len(new_labels)
                tau = float(torch.quantile(others, 1 - share))
            else:  # nothing to compare with: 3/4 of the examples' own similarity
                rows = F.normalize(neg.emb[[lb == label for lb in neg.given]] - ext.center, dim=1)
                tau = 0.75 * float((rows @ w).median())
            taus.append(tau)
            ext.bias[first_new + j] = -s * tau
    return taus


@dataclass(frozen=True)
class _Fit:
    """What the fine-tuning fits: the examples (embeddings, the model's logits, targets over
    old + new labels), the distillation inputs with the model's logits, and how many of those
    logits are the members' own (the rest are earlier added classes)."""

    emb: torch.Tensor
    old_logits: torch.Tensor
    targets: torch.Tensor
    train_emb: torch.Tensor
    train_logits: torch.Tensor
    base_cols: int


def _fine_tune(
    ext: Extension, fit: _Fit, n_prev: int, *, steps: int, lr: float, distill: float, seed: int
) -> None:
    """Fine-tune the new classes' weights (earlier added ones stay): cross-entropy on the
    examples, plus the distillation of the old outputs, anchored to the imprinted start."""
    n_new = len(ext.labels) - n_prev

    def logits_with(e: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        new_cols = ext.scores(e, old[:, : fit.base_cols])[:, n_prev:]
        return torch.cat([old, new_cols], dim=1)

    start = ext.weight.detach().clone()
    d_targets = F.pad(fit.train_logits.softmax(dim=1), (0, n_new))

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(logits_with(fit.emb, fit.old_logits), fit.targets)
        if len(fit.train_emb) and distill > 0:
            loss = loss + distill * F.cross_entropy(
                logits_with(fit.train_emb, fit.train_logits), d_targets
            )
        return loss + 1e-3 * (ext.weight - start).pow(2).sum()

    def keep_earlier() -> None:  # earlier added classes stay as they were
        if n_prev:
            ext.weight.grad[:n_prev] = 0  # type: ignore[index]

    with seeded(seed):
        small_fit([ext.weight], objective, steps, lr=lr, before_step=keep_earlier)


def _new_labels(model: CombinedModel, given: list[str], source: str) -> list[str]:
    """The labels among the examples' that the model does not know yet (at least one)."""
    new_labels = [label for label in dict.fromkeys(given) if label not in model.labels]
    if not new_labels:
        raise LabelError(
            f"examples ({source}): every label is known to the model already "
            f"({', '.join(sorted(set(given)))}); extend adds new labels"
        )
    return new_labels


def _unlabeled(
    model: CombinedModel, unlabeled: Any, run: dict[str, Any], progress: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and the model's logits of the unlabeled inputs."""
    stream = open_data(
        unlabeled, model.input_shape, what="unlabeled inputs", feature_names=model.feature_names
    )
    emb, logits, _ = _embed(model, stream, run, progress)
    return emb, logits


def _record(
    model: CombinedModel,
    new_labels: list[str],
    given: list[str],
    old_examples: int,
    unlabeled: int,
    steps: int,
    thresholds: list[float],
) -> None:
    """Add this extension to the model's method record (one entry per ``extend``)."""
    history = list(model.method.get("extended", []))
    history.append(
        {
            "labels": new_labels,
            "examples": {label: given.count(label) for label in new_labels},
            "old_class_examples": old_examples,
            "unlabeled": unlabeled,
            "steps": steps,
            "thresholds": [round(t, 4) for t in thresholds],
        }
    )
    model.method = {**model.method, "extended": history}


def extend(
    model: CombinedModel,
    examples: Any,
    labels: Any = None,
    *,
    unlabeled: Any = None,
    steps: int = 300,
    lr: float = 1e-2,
    distill: float = 1.0,
    scale: float = 10.0,
    max_false_positives: float = 0.005,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    workers: int | None = None,
    progress: bool | None = None,
) -> CombinedModel:
    """A copy of ``model`` that also predicts the new labels in ``examples``.

    Args:
        model: any combined model (it is not modified).
        examples: labeled examples: inputs with ``labels``, ``(inputs, labels)`` or a folder
            with one subfolder of images per label. Labels the model knows are used as
            examples of old classes (for calibration and distillation); the others are added.
        labels: the label names of ``examples`` when it holds only inputs.
        unlabeled: optional unlabeled inputs (e.g. a folder of images) on which the old
            model's outputs are distilled so old classes keep their accuracy.
        steps: fine-tuning steps after imprinting (0: imprinting only).
        lr: Adam learning rate of the fine-tuning.
        distill: weight of the distillation term.
        scale: the cosine scale ``s`` of the new classes' scores.
        max_false_positives: the share of the other inputs (unlabeled inputs, old-class and
            other new-class examples) the new classes may claim together; each new class's
            threshold is the matching quantile of their similarity to it. It bounds how much
            old classes can lose.
        seed: seeds the fine-tuning.
        device, workers, batch_size: where the model runs over the examples and unlabeled
            inputs (read batch by batch; ``auto``: the GPU when there is one), how many
            ``DataLoader`` workers decode images, and the batch size; the fit itself runs on
            their embeddings, on the CPU.
    """
    if steps < 0 or lr <= 0 or distill < 0 or scale <= 0 or not 0 < max_false_positives < 1:
        raise MethodError(
            "extend: steps and distill must be >= 0, lr and scale > 0, max_false_positives "
            "in (0, 1)"
        )
    run = {"device": device, "workers": workers, "batch_size": batch_size}
    stream = open_data(
        examples if labels is None else (examples, labels),
        model.input_shape,
        require_labels=True,
        what="examples",
        feature_names=model.feature_names,
    )
    old_labels = list(model.labels)
    extended = copy.deepcopy(model)
    emb, old_logits, given = _embed(extended, stream, run, progress)
    new_labels = _new_labels(model, given, stream.source)
    all_labels = old_labels + new_labels
    targets = torch.tensor([all_labels.index(label) for label in given])
    is_new = targets >= len(old_labels)
    d_emb, d_logits = emb[~is_new], old_logits[~is_new]
    if unlabeled is not None:
        u_emb, u_logits = _unlabeled(extended, unlabeled, run, progress)
        d_emb, d_logits = torch.cat([d_emb, u_emb]), torch.cat([d_logits, u_logits])
    if not len(d_emb):
        warnings.warn(
            "extend: no unlabeled inputs and no examples of old classes were given, so nothing "
            "shows what old classes look like: the new classes' thresholds are guesses and old "
            "classes may lose accuracy; pass unlabeled= (a few hundred typical inputs)",
            stacklevel=2,
        )
    previous = extended.extension
    ext = _imprinted(previous, emb, d_emb, given, new_labels, scale)
    n_prev = 0 if previous is None else len(previous.labels)
    # fine-tuning fits the distillation inputs, so thresholds are then set on inputs it did
    # not see: half of them (seeded), when there are enough
    calib_emb, train_emb, train_logits = d_emb, d_emb, d_logits
    if steps > 0 and len(d_emb) >= 200:
        order = torch.randperm(len(d_emb), generator=torch.Generator().manual_seed(seed))
        half = len(d_emb) // 2
        calib_emb = d_emb[order[:half]]
        train_emb, train_logits = d_emb[order[half:]], d_logits[order[half:]]
    negatives = _Negatives(calib_emb, emb, given, max_false_positives)
    thresholds = _set_thresholds(ext, new_labels, n_prev, negatives)
    if steps > 0:
        fit = _Fit(emb, old_logits, targets, train_emb, train_logits, len(old_labels) - n_prev)
        _fine_tune(ext, fit, n_prev, steps=steps, lr=lr, distill=distill, seed=seed)
        thresholds = _set_thresholds(ext, new_labels, n_prev, negatives)
    if not torch.isfinite(ext.weight).all():
        raise DataError("extend: the fit diverged (non-finite weights); lower lr")
    extended.set_extension(ext)
    old_examples = int((~is_new).sum())
    _record(extended, new_labels, given, old_examples, len(d_emb) - old_examples, steps, thresholds)
    return extended.eval()
