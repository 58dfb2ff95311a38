"""Honest evaluation over the union of labels.

For a combined model and labeled data, :func:`evaluate` reports:

- **union accuracy**: argmax over every label of every member;
- **member accuracy**: for each member, on the samples of its labels, argmax over its labels
  only (the accuracy if the right member were known);
- **task confusion**: the share of samples predicted as a label that no member knowing the
  true label knows (member A's image answered with one of B's labels);
- **ECE**: expected calibration error of the union probabilities (15 equal-width bins);
- **parameters** run per input (a shared trunk counted once) and **latency** per batch.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from netmeld._atomic import check_replaceable, replacing
from netmeld.data import Stream, open_data
from netmeld.errors import DataError
from netmeld.methods._extract import FeatureCache, extract, gather, shard_positions
from netmeld.model.combined import CombinedModel
from netmeld.runtime import autocast, on_device, resolve_device


@dataclass
class Report:
    """The metrics of one model on one labeled data set."""

    name: str
    examples: int
    union_accuracy: float
    member_accuracy: dict[str, float]
    task_confusion: float
    ece: float
    parameters: int | None = None
    latency_ms: float | None = None
    batch_size: int | None = None
    gate_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # the model's union labels, in order
    label_members: dict[str, list[str]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)  # [true][predicted] counts
    calibration: dict[str, list[float]] = field(default_factory=dict)  # per confidence bin
    unknown: dict[str, int] = field(default_factory=dict)  # left-out examples per label
    model: dict[str, Any] = field(default_factory=dict)  # method, members, netmeld version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """A report from :meth:`to_dict`'s output (e.g. ``netmeld eval --json``); an unknown
        or missing key is a :class:`DataError`."""
        from pydantic import TypeAdapter, ValidationError

        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DataError(f"report: unknown key {unknown[0]!r}; expected {sorted(names)}")
        try:
            report = TypeAdapter(cls).validate_python(dict(data), strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise DataError(f"report {data.get('name')!r}: {where}: {first['msg']}") from None
        k = len(report.labels)
        if report.confusion and (
            len(report.confusion) != k or any(len(row) != k for row in report.confusion)
        ):
            raise DataError(f"report {report.name!r}: confusion is not {k} x {k} (its {k} labels)")
        return report

    def per_label(self) -> list[dict[str, Any]]:
        """Precision, recall and support of every label, from :attr:`confusion`."""
        rows = []
        for i, label in enumerate(self.labels):
            support = sum(self.confusion[i]) if self.confusion else 0
            predicted = sum(r[i] for r in self.confusion) if self.confusion else 0
            hits = self.confusion[i][i] if self.confusion else 0
            rows.append(
                {
                    "label": label,
                    "members": list(self.label_members.get(label, [])),
                    "support": support,
                    "precision": hits / predicted if predicted else None,
                    "recall": hits / support if support else None,
                }
            )
        return rows

    def to_html(self, path: str | Path, **options: Any) -> Path:
        """This report as one self-contained HTML file (see :mod:`netmeld.html_report`)."""
        from netmeld.html_report import write_html

        return write_html([self], path, **options)

    def accuracy_on(self, labels: Sequence[str]) -> float | None:
        """Accuracy on the examples whose true label is one of ``labels`` (from the confusion
        matrix); ``None`` without such examples."""
        at = [self.labels.index(label) for label in labels if label in self.labels]
        total = sum(sum(self.confusion[i]) for i in at)
        return sum(self.confusion[i][i] for i in at) / total if total else None

    def __str__(self) -> str:
        members = " / ".join(f"{k} {100 * v:.1f}%" for k, v in self.member_accuracy.items())
        text = (
            f"{self.name}: union accuracy {100 * self.union_accuracy:.1f}% on {self.examples} "
            f"examples; with the member known {members}; task confusion "
            f"{100 * self.task_confusion:.1f}%; ECE {self.ece:.3f}"
        )
        if self.gate_accuracy is not None:
            text += f"; gate accuracy {100 * self.gate_accuracy:.1f}%"
        if self.parameters is not None:
            text += f"; {self.parameters:,} parameters"
        if self.latency_ms is not None:
            text += f"; {self.latency_ms:.1f} ms per batch of {self.batch_size}"
        return text


def calibration_bins(
    probs: torch.Tensor, targets: torch.Tensor, bins: int = 15
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: its edges, example count, mean confidence and accuracy
    (the reliability diagram's numbers)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    out: dict[str, list[float]] = {"edges": edges.tolist(), "count": [], "confidence": []}
    out["accuracy"] = []
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        n = int(inside.sum())
        out["count"].append(n)
        out["confidence"].append(float(confidence[inside].mean()) if n else 0.0)
        out["accuracy"].append(float(correct[inside].mean()) if n else 0.0)
    return out


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    table = calibration_bins(probs, targets, bins)
    n = max(sum(table["count"]), 1)
    return float(
        sum(
            c / n * abs(conf - acc)
            for c, conf, acc in zip(
                table["count"], table["confidence"], table["accuracy"], strict=True
            )
        )
    )


def metrics_from_logits(
    name: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str],
    label_members: Mapping[str, Sequence[str]],
) -> Report:
    """A :class:`Report` (without cost figures) from union logits and target indices."""
    predicted = logits.argmax(dim=1)
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        for m in label_members[label]:
            members.setdefault(m, []).append(i)
    member_accuracy = {}
    for m, cols in members.items():
        col_t = torch.tensor(cols)
        rows = torch.isin(targets, col_t)
        if rows.any():
            within = col_t[logits[rows][:, col_t].argmax(dim=1)]
            member_accuracy[m] = float((within == targets[rows]).float().mean())
    knows = {label: set(label_members[label]) for label in labels}
    # labels no member knows (a new head's or an extension's) never count as task confusion
    confused = [
        bool(knows[labels[int(t)]])
        and bool(knows[labels[int(p)]])
        and not (knows[labels[int(t)]] & knows[labels[int(p)]])
        for t, p in zip(targets.tolist(), predicted.tolist(), strict=True)
    ]
    probs = logits.softmax(dim=1)
    k = len(labels)
    confusion = torch.bincount(targets * k + predicted, minlength=k * k).reshape(k, k)
    return Report(
        name=name,
        examples=len(targets),
        union_accuracy=float((predicted == targets).float().mean()),
        member_accuracy=member_accuracy,
        task_confusion=sum(confused) / max(len(confused), 1),
        ece=expected_calibration_error(probs, targets),
        labels=list(labels),
        label_members={label: list(label_members[label]) for label in labels},
        confusion=confusion.tolist(),
        calibration=calibration_bins(probs, targets),
    )


def gate_accuracy(model: CombinedModel, gate: torch.Tensor, targets: torch.Tensor) -> float:
    """How often the router's chosen member knows the true label (rows whose label some member
    knows)."""
    chosen = gate.argmax(dim=1).tolist()
    hits, rows = 0, 0
    labels, label_members = model.labels, model.label_members
    for t, m in zip(targets.tolist(), chosen, strict=True):
        owners = label_members[labels[t]]
        if owners:
            rows += 1
            hits += model.member_names[m] in owners
    return hits / max(rows, 1)


@torch.no_grad()
def measure_latency(model: torch.nn.Module, batch: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass over ``batch`` (after one warm-up)."""
    model.eval()
    model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _evaluation_stream(data: Any, model: CombinedModel, skip_unreadable: bool = False) -> Stream:
    """Labeled evaluation data in ``model``'s input shape (and table columns), unread."""
    return open_data(
        data,
        model.input_shape,
        require_labels=True,
        what="evaluation data",
        feature_names=model.feature_names,
        skip_unreadable=skip_unreadable,
    )


@torch.no_grad()
def evaluate(
    model: CombinedModel,
    data: Any,
    *,
    name: str | None = None,
    batch_size: int = 256,
    latency: bool = True,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    cache: bool | str | Path | FeatureCache | None = True,
    workers: int | None = None,
    skip_unreadable: bool = False,
    unknown: str = "error",
    progress: bool | None = None,
) -> Report:
    """Evaluate ``model`` on labeled ``data`` (``(inputs, label_names)``, a label folder, a
    labeled CSV or Dataset), read batch by batch.

    ``unknown``: what to do with examples of labels the model does not know: ``"error"``, or
    ``"skip"`` them, counted per label in :attr:`Report.unknown` (to compare models with
    different label sets, e.g. before and after :func:`~netmeld.extend`).

    The members run on ``device`` (``auto``: the GPU when there is one; ``precision`` ``bf16``
    or ``fp16`` autocasts them). Their head inputs go through the feature cache (``cache``:
    the process's, a folder's, or ``False``), so evaluating several models of the same members
    runs each trunk once. Under ``torchrun`` each process reads its share of the data and
    every process gets the whole report."""
    if unknown not in ("error", "skip"):
        raise DataError(f"unknown={unknown!r}: expected 'error' or 'skip'")
    stream = _evaluation_stream(data, model, skip_unreadable)
    if unknown == "error":
        stream.check_labels(model.labels)
    dev = resolve_device(device)
    model.eval()
    if model.reads_input:
        logits, gates, labels = _forward_pass(
            model, stream, dev, precision, batch_size, workers, progress
        )
    else:
        extracted = extract(
            model,
            stream,
            batch_size=batch_size,
            device=dev,
            precision=precision,
            cache=cache,
            workers=workers,
            progress=progress,
            description="evaluating",
        )
        logits, gates = _from_features(model, extracted.features, batch_size)
        labels = extracted.labels or []
    known = set(model.labels)
    left_out = Counter(label for label in labels if label not in known)
    if left_out:
        keep = torch.tensor([label in known for label in labels])
        if not keep.any():
            raise DataError(
                f"{stream.source}: none of its labels ({', '.join(sorted(left_out)[:5])}) is "
                "known to the model"
            )
        logits = logits[keep]
        gates = None if gates is None else gates[keep]
        labels = [label for label in labels if label in known]
    targets = stream.label_indices(labels, model.labels)
    report = metrics_from_logits(
        name or str(model.method.get("name", "model")),
        logits,
        targets,
        model.labels,
        model.label_members,
    )
    if gates is not None:
        report.gate_accuracy = gate_accuracy(model, gates, targets)
    report.unknown = dict(sorted(left_out.items()))
    report.model = model_summary(model)
    report.parameters = model.num_parameters
    if latency:
        first = next(stream.batches(batch_size, workers=0, progress=False))
        report.batch_size = len(first)
        with on_device(model, dev):
            report.latency_ms = measure_latency(model, first.inputs.to(dev))
    return report


def model_summary(model: CombinedModel) -> dict[str, Any]:
    """What made ``model``: its method (parameters, what it fitted), members, extension and
    the netmeld version; what a report needs to be reproducible."""
    from netmeld._version import __version__

    return {
        "method": dict(model.method),
        "members": [
            {
                "name": m.name,
                "labels": len(m.labels),
                "architecture": None if m.architecture is None else m.architecture.spec,
            }
            for m in model.members
        ],
        "extension": None if model.extension is None else list(model.extension.labels),
        "router": model.union.router is not None and model.combiner is None,
        "netmeld_version": __version__,
    }


def _from_features(
    model: CombinedModel, features: list[torch.Tensor], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and router log-probabilities) from the members' head inputs."""
    place = next(model.parameters()).device
    logits, gates = [], []
    for s in range(0, len(features[0]), batch_size):
        out = model.outputs_from_features([f[s : s + batch_size].to(place) for f in features])
        logits.append(model.logits_from(out).float().cpu())
        gate = model.gate_from(out)
        if gate is not None:
            gates.append(gate.float().cpu())
    return torch.cat(logits), torch.cat(gates) if gates else None


def _forward_pass(
    model: CombinedModel,
    stream: Stream,
    dev: torch.device,
    precision: str,
    batch_size: int,
    workers: int | None,
    progress: bool | None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """The whole model over the stream (this process's share under ``torchrun``)."""
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]] = []
    with on_device(model, dev):
        for batch in stream.batches(
            batch_size,
            workers=workers,
            progress=progress,
            description="evaluating",
            positions=shard_positions(len(stream)),
        ):
            x = batch.inputs.to(dev, non_blocking=True)
            with autocast(dev, precision):
                out = model.run_members(x)
                logits = model.logits_from(out, x).float().cpu()
                gate = model.gate_from(out, x)
            parts.append(
                (
                    logits,
                    None if gate is None else gate.float().cpu(),
                    batch.index,
                    batch.labels or [],
                )
            )
    gathered = [p for rank in gather(parts) for p in rank]
    if not gathered:
        raise DataError(f"{stream.source}: no input could be read")
    gates = [g for _, g, _, _ in gathered if g is not None]
    return (
        torch.cat([logit for logit, _, _, _ in gathered]),
        torch.cat(gates) if gates else None,
        [label for _, _, _, labels in gathered for label in labels],
    )


def compare(
    models: Mapping[str, CombinedModel],
    data: Any,
    *,
    batch_size: int = 256,
    latency: bool = True,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    cache: bool | str | Path | FeatureCache | None = True,
    workers: int | None = None,
    skip_unreadable: bool = False,
    unknown: str = "skip",
    progress: bool | None = None,
) -> Reports:
    """Evaluate several models on the same data; one report each, in the given order. Models
    of the same members share their head inputs through the feature cache. Models with
    different label sets are each measured on the labels they know; the examples of the others
    are counted in :attr:`Report.unknown` (``unknown="error"`` refuses them instead)."""
    first = next(iter(models.values()), None)
    if first is None:
        return Reports()
    stream = _evaluation_stream(data, first, skip_unreadable)
    return Reports(
        evaluate(
            m,
            stream,
            name=name,
            batch_size=batch_size,
            latency=latency,
            device=device,
            precision=precision,
            cache=cache,
            workers=workers,
            unknown=unknown,
            progress=progress,
        )
        for name, m in models.items()
    )


def _holds_reports(path: Path) -> bool:
    try:
        Reports.from_json(path)
    except DataError:
        return False
    return True


class Reports(list[Report]):
    """Several models' reports on one data set (what :func:`compare` returns)."""

    def to_json(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the raw numbers (``netmeld report FILE`` rebuilds the HTML from them),
        atomically; an existing file is replaced only with ``overwrite`` and only if it holds
        reports netmeld wrote."""
        path = Path(path)
        check_replaceable(path, overwrite, _holds_reports, "a reports file")
        with replacing(path) as tmp:
            text = json.dumps([r.to_dict() for r in self], indent=2) + "\n"
            tmp.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Reports:
        """The reports :meth:`to_json` wrote; anything else is a :class:`DataError`."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{str(path)!r}: cannot read the results ({exc})") from exc
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise DataError(f"{str(path)!r}: expected a JSON list of reports (netmeld eval --json)")
        try:
            return cls(Report.from_dict(r) for r in raw)
        except DataError as exc:
            raise DataError(f"{str(path)!r}: {exc}") from None

    def to_html(self, path: str | Path, **options: Any) -> Path:
        """One self-contained HTML report of these models (see :mod:`netmeld.html_report`)."""
        from netmeld.html_report import write_html

        return write_html(list(self), path, **options)


def render_table(
    reports: Sequence[Report], *, title: str = "", reference: str | None = None
) -> Any:
    """A rich Table of reports; ``reference`` names the report the gap column is measured to."""
    from rich.table import Table

    ref = next((r for r in reports if r.name == reference), None)
    table = Table(title=title or None, title_justify="left")
    table.add_column("method")
    table.add_column("union acc", justify="right")
    if ref is not None:
        table.add_column(f"Δ {ref.name.split(' ')[0]}", justify="right")
    table.add_column("member acc (known)", justify="right")
    table.add_column("task confusion", justify="right")
    gated = any(r.gate_accuracy is not None for r in reports)
    if gated:
        table.add_column("gate acc", justify="right")
    table.add_column("ECE", justify="right")
    table.add_column("params", justify="right")
    table.add_column("ms/batch", justify="right")
    left_out = any(r.unknown for r in reports)
    if left_out:
        table.add_column("left out", justify="right")
    for r in reports:
        row = [r.name, f"{100 * r.union_accuracy:.1f}%"]
        if ref is not None:
            row.append(f"{100 * (r.union_accuracy - ref.union_accuracy):+.1f}")
        member = (
            " / ".join(f"{k} {100 * v:.1f}" for k, v in r.member_accuracy.items())
            if r.member_accuracy
            else "-"
        )
        row += [member, f"{100 * r.task_confusion:.1f}%"]
        if gated:
            row.append("-" if r.gate_accuracy is None else f"{100 * r.gate_accuracy:.1f}%")
        row += [
            f"{r.ece:.3f}",
            f"{r.parameters:,}" if r.parameters is not None else "-",
            f"{r.latency_ms:.1f}" if r.latency_ms is not None else "-",
        ]
        if left_out:
            row.append(str(sum(r.unknown.values())))
        table.add_row(*row)
    return table
