"""One entry point for every method: ``meld(members, method=NAME, data=None)``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from netmeld.data import Stream, open_data
from netmeld.errors import DataError, IncompatibleMembersError, MethodError
from netmeld.members.member import Member
from netmeld.methods._extract import Extracted, FeatureCache, extract
from netmeld.methods._registry import MethodInfo, get_method, list_methods
from netmeld.methods.statistics import FeatureStatistics
from netmeld.model.combined import CombinedModel
from netmeld.runtime import seeded


def meld(
    members: Sequence[Member],
    method: str = "concat",
    data: Any = None,
    *,
    params: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    feature_names: Sequence[str] | None = None,
    seed: int = 0,
    statistics: Sequence[Any] | None = None,
    unlabeled: Any = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    cache: bool | str | Path | FeatureCache | None = True,
    batch_size: int = 256,
    workers: int | None = None,
    skip_unreadable: bool = False,
    progress: bool | None = None,
) -> CombinedModel:
    """Combine ``members`` into one model over the union of their labels.

    Args:
        members: the members, in the order their labels appear in the union.
        method: a registered method name (see :func:`netmeld.list_methods`).
        data: what the method fits on: ``None`` for zero-data methods, unlabeled ``inputs``,
            or labeled ``(inputs, label_names)``; inputs are a tensor/ndarray, a torch Dataset
            or a folder of images. A labeled set may be given to an unlabeled method.
        params: the method's parameters; unknown names are an error.
        input_shape: the combined model's input shape when members' shapes differ (images are
            resized per member).
        feature_names: the combined input's column names when members read named columns
            (default: their columns in order of first appearance).
        seed: seeds every random choice of the fit.
        statistics: for the methods from statistics (``ridge``, ``lda``): one
            :class:`~netmeld.FeatureStatistics` (or its file) per member, in member order.
        unlabeled: for the semi-supervised methods (labeled ``data`` plus unlabeled inputs,
            e.g. ``semi``): the unlabeled inputs, in any form ``data`` takes.
        device: where the members run over the data (``auto``: the GPU when there is one);
            the fits themselves run on the members' head inputs, on the CPU.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast for running the members.
        cache: the feature cache: ``True`` the process's, a folder one kept there across
            processes, ``False`` none.
        batch_size: inputs per batch when running the members.
        workers: ``DataLoader`` workers decoding images (default: one core left free).
        skip_unreadable: leave out (and name in a warning) images that cannot be read.
        progress: show progress bars (default: when stderr is a terminal).
    """
    info = get_method(method)
    checked = info.validate_params(params)
    if unlabeled is not None and not info.unlabeled:
        raise MethodError(
            f"method {method!r} reads no separate unlabeled data; the methods that do: "
            f"{', '.join(n for n in list_methods() if get_method(n).unlabeled)}"
        )
    members = list(members)
    if not members:
        raise IncompatibleMembersError("meld needs at least one member")
    model = CombinedModel(members, input_shape=input_shape, feature_names=feature_names)
    _warn_untraced(model)
    extracted: Extracted | None = None
    targets = None
    if info.data == "statistics":
        extracted = _from_statistics(method, statistics, data)
    elif statistics is not None:
        raise MethodError(
            f"method {method!r} does not read statistics; the methods that do: "
            f"{', '.join(list_methods('statistics'))}"
        )
    elif info.data == "none":
        if data is not None:
            warnings.warn(
                f"method {method!r} uses no data; the data given is ignored", stacklevel=2
            )
    else:
        stream = open_data(
            data,
            model.input_shape,
            require_labels=info.data == "labeled",
            what=f"data for method {method!r}",
            feature_names=model.feature_names,
            skip_unreadable=skip_unreadable,
        )
        run: dict[str, Any] = {"batch_size": batch_size, "device": device, "cache": cache}
        run.update(precision=precision, workers=workers, progress=progress)
        extracted, targets = _from_data(model, info, stream, run)
        if unlabeled is not None:
            extracted.unlabeled = _unlabeled(model, info, unlabeled, run, skip_unreadable)
    with seeded(seed):  # the caller's generators (CPU and GPU) are left as they were
        info.fit(model, extracted, targets, checked)
    _check_finite(model, method)
    model.method = {
        "name": method,
        "data": info.data,
        "params": checked.model_dump(),
        "examples": _examples(extracted),
        "seed": seed,
        "fitted": model.method.get("fitted", {}),  # what the method chose, if anything
    }
    return model.eval()


def _examples(extracted: Extracted | None) -> int:
    """How many examples (or, from statistics, the statistics' examples) a fit read."""
    if extracted is None:
        return 0
    stats = extracted.statistics
    n = sum(s.examples for s in stats) if stats else len(extracted)
    return n + (0 if extracted.unlabeled is None else len(extracted.unlabeled))


def _check_finite(model: CombinedModel, method: str) -> None:
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise MethodError(
                f"method {method!r} fitted non-finite values into {name!r} (the fit diverged); "
                "lower its learning rate or give more data"
            )


def _unlabeled(
    model: CombinedModel, info: MethodInfo, data: Any, run: dict[str, Any], skip: bool
) -> Extracted:
    """The members' head inputs over a semi-supervised method's unlabeled inputs."""
    stream = open_data(
        data,
        model.input_shape,
        require_labels=False,
        what=f"unlabeled data for method {info.name!r}",
        feature_names=model.feature_names,
        skip_unreadable=skip,
    )
    return extract(model, stream, **run)


def _warn_untraced(model: CombinedModel) -> None:
    """Say which members share no trunk because torch.fx cannot trace them."""
    if len(model.members) > 1:
        for name, why in model.untraced.items():
            warnings.warn(
                f"member {name!r}: torch.fx cannot trace it ({why}); it runs whole, so its "
                "trunk is not shared with the other members",
                stacklevel=3,
            )


def _from_statistics(method: str, statistics: Sequence[Any] | None, data: Any) -> Extracted:
    """What a method from statistics fits on: the members' statistics (files are read)."""
    if statistics is None:
        raise MethodError(
            f"method {method!r} computes a head from member statistics: pass "
            "statistics=[...] (one netmeld.feature_statistics per member)"
        )
    if data is not None:
        warnings.warn(f"method {method!r} uses statistics; the data given is ignored", stacklevel=3)
    stats = [s if not isinstance(s, (str, Path)) else FeatureStatistics.load(s) for s in statistics]
    return Extracted([], torch.zeros(0, 0), statistics=stats)


def _from_data(
    model: CombinedModel, info: MethodInfo, stream: Stream, run: dict[str, Any]
) -> tuple[Extracted, torch.Tensor | None]:
    """The members' head inputs over ``stream`` (``run``: how :func:`extract` runs them) and,
    for a labeled method, the targets in its label space."""
    label_space = list(model.labels)
    if info.data == "labeled" and not info.open_labels:
        stream.check_labels(label_space)  # before any member runs
    extracted = extract(model, stream, **run)
    targets = None
    if info.data == "labeled":
        labels = extracted.labels
        assert labels is not None
        if info.open_labels:  # the data's labels: known ones in union order, then new
            present = set(labels)
            label_space = [label for label in label_space if label in present] + [
                label for label in dict.fromkeys(labels) if label not in label_space
            ]
        targets = stream.label_indices(labels, label_space)
        _check_labeled_data(model, info.name, labels, stream.source)
    extracted.label_space = label_space
    return extracted, targets


def _check_labeled_data(model: CombinedModel, method: str, labels: list[str], source: str) -> None:
    """Degenerate labeled data: one label only is an error (nothing shows how the members
    compare); a member none of whose labels occur is a warning naming it."""
    present = set(labels)
    if len(present) < 2:
        raise DataError(
            f"{source}: method {method!r} needs examples of at least two labels; the data holds "
            f"only {sorted(present)} ({len(labels)} examples), so the fit could only learn to "
            "answer that label"
        )
    for member in model.members:
        if not present & set(member.labels):
            warnings.warn(
                f"method {method!r}: no example in {source} has a label of member "
                f"{member.name!r} ({', '.join(member.labels[:5])}); what it fits for that member "
                "is a guess",
                stacklevel=3,
            )
