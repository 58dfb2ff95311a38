"""Member statistics: what a member's author computes once from their own training data, so
that heads over the union of labels can be computed exactly, without the data.

Softmax cross-entropy leaves each head's common offset undetermined (adding one vector to every
row of a head does not change its own loss), so no method that reads weights alone can put two
heads on one scale. A few numbers about each member's training features do: per-class counts and
feature sums, and the Gram matrix of the features. They add up across members, and the ridge
head computed from the sums equals the ridge head fitted on all the members' data together
(ACIL, Zhuang et al. 2022; Fed3R, Fanì et al. 2024). A fixed random projection with a ReLU
before the statistics (RanPAC, McDonnell et al. 2023) makes the closed-form head stronger.

A statistics file reveals each class's mean feature and the features' second moments (their
covariance), never an individual input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from netmeld._atomic import check_replaceable, replacing
from netmeld._version import __version__
from netmeld.data import open_data
from netmeld.engine import small_fit
from netmeld.errors import DataError, MethodError, ModelFileError
from netmeld.members.graph import find_head
from netmeld.members.member import Member
from netmeld.methods._extract import Extracted
from netmeld.methods._registry import MethodParams, register_method
from netmeld.model.combined import CombinedModel
from netmeld.model.heads import StatisticsHead, random_features
from netmeld.runtime import autocast, on_device, resolve_device

FORMAT = "netmeld-statistics"
FORMAT_VERSION = 1


def _is_statistics_file(path: Path) -> bool:
    try:
        FeatureStatistics.load(path)
    except ModelFileError:
        return False
    return True


def body_key(member: Member) -> str:
    """A hash of what a member's head input depends on: its preprocessing and every tensor of
    its module but the head's. Members transfer-learned from one frozen base share it."""
    head = find_head(member)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(member.preprocessing.to_dict(), sort_keys=True).encode())
    for key, t in sorted(member.module.state_dict().items()):
        if key.startswith(head + "."):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FeatureStatistics:
    """Sufficient statistics of one member's head inputs on its labeled training data, in
    ``folds`` parts (the held-out parts choose the regularisation): ``counts[f, c]`` examples of
    label ``c`` in fold ``f``, ``sums[f, c]`` the sum of their features, ``gram[f]`` the sum of
    ``[z, 1] [z, 1]^T`` over the fold's examples (``z``: the features, randomly projected when
    ``projection`` is set)."""

    member: str
    labels: list[str]
    dim: int  # the member's head-input width
    body: str  # body_key of the member
    projection: int | None
    seed: int
    counts: torch.Tensor  # (folds, K) float64
    sums: torch.Tensor  # (folds, K, P) float64
    gram: torch.Tensor  # (folds, P + 1, P + 1) float64

    @property
    def width(self) -> int:
        """The width of the features the statistics are of (projected or not)."""
        return self.dim if self.projection is None else self.projection

    @property
    def examples(self) -> int:
        return int(self.counts.sum())

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path`` (safetensors; the settings as JSON in its header), atomically. An
        existing file is replaced only with ``overwrite`` and only if it is a statistics file."""
        from safetensors.torch import save_file

        path = Path(path)
        check_replaceable(path, overwrite, _is_statistics_file, "a statistics file", ModelFileError)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "netmeld": __version__,
            "member": self.member,
            "labels": self.labels,
            "dim": self.dim,
            "body": self.body,
            "projection": self.projection,
            "seed": self.seed,
        }
        with replacing(path) as tmp:
            save_file(
                {"counts": self.counts, "sums": self.sums, "gram": self.gram},
                str(tmp),
                metadata={"netmeld_statistics": json.dumps(meta)},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStatistics:
        """Read a statistics file (no pickle), checked whole: format, shapes, finite values."""
        from safetensors import safe_open

        path = Path(path)
        where = f"statistics file {str(path)!r}"
        if not path.is_file():
            raise ModelFileError(f"{where} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            meta = json.loads(header["netmeld_statistics"])
        except Exception as exc:
            raise ModelFileError(f"{where} cannot be read as netmeld statistics: {exc}") from exc
        try:
            stats = cls(
                member=str(meta["member"]),
                labels=[str(label) for label in meta["labels"]],
                dim=int(meta["dim"]),
                body=str(meta["body"]),
                projection=None if meta["projection"] is None else int(meta["projection"]),
                seed=int(meta["seed"]),
                counts=tensors["counts"].double(),
                sums=tensors["sums"].double(),
                gram=tensors["gram"].double(),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where}: missing or ill-typed field ({exc})") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{where}: not a version-{FORMAT_VERSION} statistics file")
        folds, k, p = stats.sums.shape if stats.sums.dim() == 3 else (0, 0, 0)
        if (
            stats.counts.shape != (folds, len(stats.labels))
            or k != len(stats.labels)
            or p != stats.width
            or stats.gram.shape != (folds, p + 1, p + 1)
            or folds < 1
        ):
            raise ModelFileError(
                f"{where}: tensor shapes counts {tuple(stats.counts.shape)}, sums "
                f"{tuple(stats.sums.shape)}, gram {tuple(stats.gram.shape)} do not fit "
                f"{len(stats.labels)} labels of width {stats.width}"
            )
        for name in ("counts", "sums", "gram"):
            if not torch.isfinite(getattr(stats, name)).all():
                raise ModelFileError(f"{where}: tensor {name!r} holds NaN or infinite values")
        return stats

    def check_fits(self, member: Member) -> None:
        """A clear error when these statistics were not made from ``member``."""
        where = f"statistics of member {self.member!r}"
        if list(member.labels) != self.labels:
            raise MethodError(
                f"{where}: their labels {self.labels[:5]} differ from member {member.name!r}'s "
                f"{list(member.labels)[:5]}"
            )
        if body_key(member) != self.body:
            raise MethodError(
                f"{where} were made with another trunk or preprocessing than member "
                f"{member.name!r} has; compute them again with netmeld.feature_statistics"
            )


@torch.no_grad()
def feature_statistics(
    member: Member,
    data: Any,
    *,
    projection: int | None = None,
    seed: int = 0,
    folds: int = 5,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    workers: int | None = None,
    progress: bool | None = None,
) -> FeatureStatistics:
    """The statistics of ``member``'s head inputs on its labeled training ``data`` (read batch
    by batch; example ``i`` goes to fold ``i % folds``). ``projection``: the width of a random
    ReLU projection drawn from ``seed`` (RanPAC); members whose statistics are combined must
    use the same ``projection`` and ``seed``."""
    model = CombinedModel([member])
    stream = open_data(
        data,
        model.input_shape,
        require_labels=True,
        what="statistics data",
        feature_names=model.feature_names,
    )
    stream.check_labels(list(member.labels))
    acc = _Accumulator(member, _head_width(model, member), projection, seed, folds)
    dev = resolve_device(device)
    model.eval()
    with on_device(model, dev):
        for batch in stream.batches(
            batch_size, workers=workers, progress=progress, description="member statistics"
        ):
            with autocast(dev):
                f = model.run_members(batch.inputs.to(dev)).features[0].float().cpu()
            acc.add(f, batch.labels or [], batch.index)
    return acc.result()


def statistics_from_features(
    member: Member,
    features: torch.Tensor,
    labels: Sequence[str],
    *,
    projection: int | None = None,
    seed: int = 0,
    folds: int = 5,
) -> FeatureStatistics:
    """:func:`feature_statistics` from ``member``'s head inputs computed already (``(N, D)``,
    e.g. cached while its head was trained) and their label names."""
    if len(features) != len(labels):
        raise DataError(f"{len(features)} feature rows but {len(labels)} labels")
    model = CombinedModel([member])
    acc = _Accumulator(member, _head_width(model, member), projection, seed, folds)
    if features.dim() != 2 or features.shape[1] != acc.dim:
        raise DataError(
            f"features of shape {tuple(features.shape)}; member {member.name!r}'s head reads "
            f"{acc.dim} numbers per input"
        )
    acc.add(features.float(), list(labels), torch.arange(len(features)))
    return acc.result()


def _head_width(model: CombinedModel, member: Member) -> int:
    head = model.heads[member.name]
    if not isinstance(head, torch.nn.Linear):
        raise MethodError(f"member {member.name!r}: its head is not a linear layer")
    return head.in_features


class _Accumulator:
    """Running sums of one member's statistics, fold by fold (example ``i`` in ``i % folds``)."""

    def __init__(
        self, member: Member, dim: int, projection: int | None, seed: int, folds: int
    ) -> None:
        if folds < 2:
            raise DataError(f"folds must be at least 2 (the held-out parts), got {folds}")
        self.member, self.dim, self.projection, self.seed = member, dim, projection, seed
        self.proj = None if projection is None else random_features(dim, projection, seed)
        width = dim if projection is None else projection
        k = len(member.labels)
        self.column = {label: i for i, label in enumerate(member.labels)}
        self.counts = torch.zeros(folds, k, dtype=torch.float64)
        self.sums = torch.zeros(folds, k, width, dtype=torch.float64)
        self.gram = torch.zeros(folds, width + 1, width + 1, dtype=torch.float64)

    def add(self, f: torch.Tensor, labels: Sequence[str], index: torch.Tensor) -> None:
        unknown = [label for label in labels if label not in self.column]
        if unknown:
            raise DataError(
                f"label {unknown[0]!r} is not one of member {self.member.name!r}'s labels"
            )
        z = f if self.proj is None else torch.relu(f @ self.proj)
        z1 = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()
        y = torch.tensor([self.column[label] for label in labels], dtype=torch.long)
        fold = index % self.gram.shape[0]
        for g in range(self.gram.shape[0]):
            rows = fold == g
            if rows.any():
                self.gram[g] += z1[rows].T @ z1[rows]
                ones = torch.ones(int(rows.sum()), dtype=torch.float64)
                self.counts[g].index_add_(0, y[rows], ones)
                self.sums[g].index_add_(0, y[rows], z1[rows, :-1])

    def result(self) -> FeatureStatistics:
        if not self.counts.sum():
            raise DataError(f"member {self.member.name!r}: no examples to compute statistics of")
        return FeatureStatistics(
            member=self.member.name,
            labels=list(self.member.labels),
            dim=self.dim,
            body=body_key(self.member),
            projection=self.projection,
            seed=self.seed,
            counts=self.counts,
            sums=self.sums,
            gram=self.gram,
        )


def _pooled(
    model: CombinedModel, statistics: Sequence[FeatureStatistics]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per fold: the Gram matrix summed over members, ``X^T Y`` over the union labels, and the
    class counts over the union labels."""
    union = model.union_labels
    column = {label: i for i, label in enumerate(union)}
    folds = statistics[0].gram.shape[0]
    width = statistics[0].width
    gram = torch.zeros(folds, width + 1, width + 1, dtype=torch.float64)
    xty = torch.zeros(folds, width + 1, len(union), dtype=torch.float64)
    counts = torch.zeros(folds, len(union), dtype=torch.float64)
    for stats in statistics:
        gram += stats.gram
        for c, label in enumerate(stats.labels):
            xty[:, :-1, column[label]] += stats.sums[:, c]
            xty[:, -1, column[label]] += stats.counts[:, c]
            counts[:, column[label]] += stats.counts[:, c]
    return gram, xty, counts


def check_statistics(model: CombinedModel, statistics: Sequence[FeatureStatistics]) -> None:
    """One statistics per member, made from that member, all of one shared feature space."""
    if len(statistics) != len(model.members):
        raise MethodError(
            f"statistics: {len(statistics)} given for {len(model.members)} members; give one "
            "per member, in member order"
        )
    for stats, member in zip(statistics, model.members, strict=True):
        stats.check_fits(member)
    first = statistics[0]
    for stats in statistics[1:]:
        if stats.body != first.body:
            raise MethodError(
                f"statistics of members {first.member!r} and {stats.member!r} are of different "
                "trunks: a head from statistics needs members that share their trunk (the "
                "same head inputs)"
            )
        if (stats.projection, stats.seed) != (first.projection, first.seed):
            raise MethodError(
                f"statistics of {first.member!r} (projection {first.projection}, seed "
                f"{first.seed}) and {stats.member!r} (projection {stats.projection}, seed "
                f"{stats.seed}) were projected differently; compute them with one projection"
            )
        if stats.gram.shape[0] != first.gram.shape[0]:
            raise MethodError("statistics made with different numbers of folds cannot be pooled")


Pooled = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Gram, X^T Y, class counts


def _splits(folds: Pooled) -> Iterator[tuple[Pooled, Pooled]]:
    """Per fold: (the other folds pooled, the fold)."""
    for f in range(folds[0].shape[0]):
        rest = [g for g in range(folds[0].shape[0]) if g != f]
        train = tuple(t[rest].sum(0) for t in folds)
        yield train, tuple(t[f] for t in folds)  # type: ignore[misc]


def _over_folds(folds: Pooled, score: Callable[[Pooled, Pooled], float]) -> float:
    """The sum over folds of ``score(the other folds pooled, the fold)``."""
    return sum(score(train, held) for train, held in _splits(folds))


LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _ridge(gram: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G + λ·s·I)^{-1} X^T Y`` (the bias row unpenalised), ``s`` the mean feature power."""
    p = gram.shape[0] - 1
    scale = float(torch.diagonal(gram)[:-1].mean().clamp_min(1e-12))
    penalty = torch.zeros_like(gram)
    penalty.diagonal()[:-1] = lam * scale
    return torch.linalg.solve(gram + penalty + 1e-12 * torch.eye(p + 1, dtype=gram.dtype), xty)


def _held_out_error(w: torch.Tensor, gram: torch.Tensor, xty: torch.Tensor, n: float) -> float:
    """``||X W - Y||²`` of a held-out fold from its statistics alone (``Y`` one-hot)."""
    return float(torch.trace(w.T @ gram @ w) - 2 * torch.trace(w.T @ xty) + n)


class RidgeParams(MethodParams):
    ridge: float | None = Field(
        None,
        gt=0,
        description="the ridge penalty, relative to the mean feature power; None picks it by "
        "the held-out folds' squared error, computed from their statistics",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="multiplies the ridge scores, which are regression outputs, not "
        "log-probabilities; None fits it so their softmax is calibrated on features drawn from "
        "the Gaussian the statistics describe (class means, shared covariance); 1 keeps the "
        "raw ridge head (the same predictions either way)",
    )


def _calibrating_temperature(
    w: torch.Tensor, gram: torch.Tensor, xty: torch.Tensor, counts: torch.Tensor, samples: int
) -> float:
    """The factor ``t`` minimising the cross-entropy of ``softmax(t · [x, 1] W)`` on ``samples``
    features drawn (seeded) from the statistics' classes: their means and the shared
    within-class covariance, each class as often as in the statistics."""
    present = (counts > 0).nonzero().flatten()
    means, cov = _moments(gram, xty, counts)
    means = means[present]
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    root = vectors * values.clamp_min(0).sqrt()  # cov = root @ root.T
    generator = torch.Generator().manual_seed(0)
    per_class = (counts[present] / counts.sum() * samples).round().clamp_min(1).long()
    label = torch.repeat_interleave(present, per_class)
    noise = torch.randn(len(label), root.shape[1], generator=generator, dtype=root.dtype)
    drawn = torch.repeat_interleave(means, per_class, dim=0) + noise @ root.T
    scores = (drawn @ w[:-1] + w[-1]).float()
    raw = torch.zeros((), requires_grad=True)

    def factor() -> torch.Tensor:
        # within [e^-7, e^7]: draws that never overlap would push the factor without bound,
        # and past about 1e3 the softmax of scores about 0 or 1 is one-hot anyway
        return (7 * torch.tanh(raw / 7)).exp()

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(scores * factor(), label)

    small_fit([raw], loss, 50, optimizer="lbfgs")
    return float(factor().detach())


class LdaParams(MethodParams):
    shrinkage: float | None = Field(
        None,
        ge=0,
        le=1,
        description="shrinkage of the shared covariance towards a scaled identity; None picks "
        "it by the held-out folds' Gaussian log-likelihood, computed from their statistics",
    )


def _statistics_of(extracted: Extracted | None) -> list[FeatureStatistics]:
    stats = None if extracted is None else extracted.statistics
    if not stats:
        raise MethodError("this method needs statistics=[...] (one per member)")
    return list(stats)


def _install(
    model: CombinedModel, weight: torch.Tensor, bias: torch.Tensor, first: FeatureStatistics
) -> None:
    head = StatisticsHead(first.dim, model.union_labels, first.projection, first.seed)
    head.set_linear(weight.float(), bias.float())
    model.set_combiner(head)


@register_method(
    "ridge",
    data="statistics",
    params=RidgeParams,
    reference="closed-form ridge head from pooled member statistics (ACIL, Zhuang et al. "
    "2022; Fed3R, Fanì et al. 2024; with a random projection: RanPAC, McDonnell et al. 2023)",
)
def fit_ridge(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: RidgeParams,
) -> None:
    """Ridge head over the union from the members' statistics: equal to joint training."""
    statistics = _statistics_of(extracted)
    check_statistics(model, statistics)
    gram, xty, counts = _pooled(model, statistics)
    lam = params.ridge
    errors: dict[float, float] = {}
    if lam is None:
        for candidate in LAMBDAS:

            def error(train: Pooled, held: Pooled, lam: float = candidate) -> float:
                w = _ridge(train[0], train[1], lam)
                return _held_out_error(w, held[0], held[1], float(held[2].sum()))

            errors[candidate] = _over_folds((gram, xty, counts), error)
        lam = min(errors, key=errors.__getitem__)
    w = _ridge(gram.sum(0), xty.sum(0), lam)
    temperature = params.temperature
    if temperature is None:
        temperature = _calibrating_temperature(w, gram.sum(0), xty.sum(0), counts.sum(0), 4096)
    w = w * temperature
    _install(model, w[:-1].T, w[-1], statistics[0])
    model.method["fitted"] = {
        "ridge": lam,
        "temperature": round(temperature, 4),
        "examples": int(counts.sum()),
        "held_out_error": {str(k): round(v, 4) for k, v in errors.items()},
    }


def _moments(
    gram: torch.Tensor, xty: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class means ``(K, P)`` and the pooled within-class covariance."""
    means = (xty[:-1] / counts.clamp_min(1e-12)).T
    scatter = gram[:-1, :-1] - (means.T * counts) @ means
    return means, scatter / max(float(counts.sum()) - int((counts > 0).sum()), 1.0)


def _lda(
    gram: torch.Tensor, xty: torch.Tensor, counts: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class means, the shrunk shared covariance, and the LDA weights and biases."""
    means, cov = _moments(gram, xty, counts)
    n = float(counts.sum())
    target = torch.eye(cov.shape[0], dtype=cov.dtype) * torch.diagonal(cov).mean()
    cov = (1 - alpha) * cov + alpha * target + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype)
    inv_means = torch.linalg.solve(cov, means.T)  # (P, K)
    prior = torch.log((counts / n).clamp_min(1e-12))
    bias = -0.5 * (means * inv_means.T).sum(1) + prior
    return means, cov, inv_means.T, bias


def _held_out_logliks(train: Pooled, held: Pooled, alphas: Sequence[float]) -> list[float]:
    """The held-out fold's Gaussian log-likelihood (up to a constant) under the LDA model fitted
    on ``train`` with each shrinkage in ``alphas``, from the statistics alone. One
    eigendecomposition serves every shrinkage: the shrunk covariances share their eigenvectors,
    ``(1 - α) λ + α m`` being their eigenvalues."""
    means, cov = _moments(*train)
    gram, xty, counts = held
    sums = xty[:-1].T  # (K, P)
    scatter = gram[:-1, :-1] - sums.T @ means - means.T @ sums + (means.T * counts) @ means
    values, vectors = torch.linalg.eigh(cov)
    spread = ((vectors.T @ scatter) * vectors.T).sum(1)  # v_i^T scatter v_i
    n, level = float(counts.sum()), torch.diagonal(cov).mean()
    out = []
    for alpha in alphas:
        eig = (1 - alpha) * values.clamp_min(0) + alpha * level + 1e-9
        out.append(float(-0.5 * (spread / eig).sum() - 0.5 * n * eig.log().sum()))
    return out


SHRINKAGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7)


def shrinkage_scores(folds: Pooled) -> dict[float, float]:
    """Each of :data:`SHRINKAGES` scored by the held-out folds' summed log-likelihood."""
    scores = dict.fromkeys(SHRINKAGES, 0.0)
    for train, held in _splits(folds):
        for alpha, value in zip(
            SHRINKAGES, _held_out_logliks(train, held, SHRINKAGES), strict=True
        ):
            scores[alpha] += value
    return scores


@register_method(
    "lda",
    data="statistics",
    params=LdaParams,
    reference="linear discriminant analysis with a shared, shrunk covariance from pooled member "
    "statistics (cf. SLDA, Hayes & Kanan 2020; RanPAC, McDonnell et al. 2023)",
)
def fit_lda(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: LdaParams,
) -> None:
    """LDA head over the union from the members' statistics: shared covariance, class means."""
    statistics = _statistics_of(extracted)
    check_statistics(model, statistics)
    gram, xty, counts = _pooled(model, statistics)
    if (counts.sum(0) == 0).any():
        missing = [model.union_labels[i] for i in (counts.sum(0) == 0).nonzero().flatten()]
        raise MethodError(f"lda: the statistics hold no example of label {missing[0]!r}")
    alpha = params.shrinkage
    scores: dict[float, float] = {}
    if alpha is None:
        scores = shrinkage_scores((gram, xty, counts))
        alpha = max(scores, key=scores.__getitem__)
    _, _, weight, bias = _lda(gram.sum(0), xty.sum(0), counts.sum(0), alpha)
    _install(model, weight, bias, statistics[0])
    model.method["fitted"] = {
        "shrinkage": alpha,
        "examples": int(counts.sum()),
        "held_out_loglik": {str(k): round(v, 2) for k, v in scores.items()},
    }
