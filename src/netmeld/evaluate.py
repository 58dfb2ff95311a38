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
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from netmeld._progress import track
from netmeld.data import Data, load_data
from netmeld.model.combined import CombinedModel


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += (
                inside.float().mean() * (confidence[inside].mean() - correct[inside].mean()).abs()
            )
    return float(ece)


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
    return Report(
        name=name,
        examples=len(targets),
        union_accuracy=float((predicted == targets).float().mean()),
        member_accuracy=member_accuracy,
        task_confusion=sum(confused) / max(len(confused), 1),
        ece=expected_calibration_error(logits.softmax(dim=1), targets),
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


def _evaluation_data(data: Any, model: CombinedModel, progress: bool | None) -> Data:
    """Labeled evaluation data in ``model``'s input shape (and table columns)."""
    return load_data(
        data,
        model.input_shape,
        require_labels=True,
        what="evaluation data",
        progress=progress,
        feature_names=model.feature_names,
    )


@torch.no_grad()
def evaluate(
    model: CombinedModel,
    data: Any,
    *,
    name: str | None = None,
    batch_size: int = 256,
    latency: bool = True,
    progress: bool | None = None,
) -> Report:
    """Evaluate ``model`` on labeled ``data`` (``(inputs, label_names)`` or a label folder)."""
    loaded = _evaluation_data(data, model, progress)
    targets = loaded.label_indices(model.labels)
    model.eval()
    starts = range(0, len(loaded), batch_size)
    parts = []
    gates = []
    for s in track(starts, "evaluating", total=len(starts), enabled=progress):
        batch = loaded.inputs[s : s + batch_size]
        parts.append(model(batch))
        gate = model.gate(batch)
        if gate is not None:
            gates.append(gate)
    report = metrics_from_logits(
        name or str(model.method.get("name", "model")),
        torch.cat(parts),
        targets,
        model.labels,
        model.label_members,
    )
    if gates:
        report.gate_accuracy = gate_accuracy(model, torch.cat(gates), targets)
    report.parameters = model.num_parameters
    if latency:
        report.batch_size = min(batch_size, len(loaded))
        report.latency_ms = measure_latency(model, loaded.inputs[: report.batch_size])
    return report


def compare(
    models: Mapping[str, CombinedModel],
    data: Any,
    *,
    batch_size: int = 256,
    progress: bool | None = None,
) -> list[Report]:
    """Evaluate several models on the same data; one report each, in the given order."""
    first = next(iter(models.values()), None)
    if first is None:
        return []
    loaded = _evaluation_data(data, first, progress)
    return [
        evaluate(m, loaded, name=name, batch_size=batch_size, progress=progress)
        for name, m in models.items()
    ]


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
        table.add_row(*row)
    return table
