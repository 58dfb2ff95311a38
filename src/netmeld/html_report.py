"""One self-contained HTML evaluation report: tables, plots, and what made each model.

:func:`write_html` turns :class:`~netmeld.evaluate.Report` objects into a single ``.html``
file that references nothing outside itself (no network, no external script, style sheet or
font): matplotlib draws every figure as inline SVG with its text as paths, and a few lines of
inline JavaScript sort the tables. It holds:

- the summary table (union accuracy, accuracy with the member known, task confusion, ECE,
  gate accuracy, parameters, latency, examples left out), the best value per column marked;
- a bar chart of union accuracy per model, with the naive baseline and the oracle as lines;
- per model: the confusion matrix over the union labels, grouped into blocks by member (errors
  off the diagonal blocks are wrong-member answers), the member-by-member task confusion, the
  reliability diagram with the confidence histogram, per-label precision and recall (sortable),
  and the method, its parameters, what it fitted and the netmeld version;
- when the models know different labels (before and after ``extend``): accuracy on the labels
  every model knows and on each model's own.

Every number in a table is also in a ``data-value`` attribute, so a report can be checked
against the reports it came from. Needs matplotlib (``pip install "netmeld[report]"``).
"""

from __future__ import annotations

import html
import io
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netmeld._atomic import check_replaceable, replacing
from netmeld._version import __version__
from netmeld.errors import DataError

# a report is a netmeld.evaluate.Report (not imported: the evaluation imports this module)
Report = Any
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #e4f4e4; }
figure { margin: 0.5em 0 1.5em; } figcaption { font-size: 0.85em; color: #555; }
figure svg { max-width: 100%; height: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; font-size: 0.9em; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var asc = th.dataset.order !== "asc"; th.dataset.order = asc ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

# summary columns: (title, value of a report, format, best is "max" / "min" / None)
GENERATOR = '<meta name="generator" content="netmeld">'  # marks a file netmeld wrote

COLUMNS: list[tuple[str, Any, str, str | None]] = [
    ("union accuracy", lambda r: r.union_accuracy, "pct", "max"),
    ("task confusion", lambda r: r.task_confusion, "pct", "min"),
    ("ECE", lambda r: r.ece, "f3", "min"),
    ("gate accuracy", lambda r: r.gate_accuracy, "pct", "max"),
    ("parameters", lambda r: r.parameters, "int", "min"),
    ("ms / batch", lambda r: r.latency_ms, "f1", "min"),
    ("examples", lambda r: r.examples, "int", None),
    ("left out", lambda r: sum(r.unknown.values()), "int", None),
]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise DataError("an HTML report needs matplotlib: pip install 'netmeld[report]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"svg.fonttype": "path", "svg.hashsalt": "netmeld", "font.size": 9, "figure.dpi": 100}
    )
    return plt


def _svg(fig: Any) -> str:
    """The figure as inline SVG (no XML header, no external reference)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF names, a date
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def _cell(value: Any, kind: str, best: bool = False) -> str:
    if value is None:
        return '<td data-value="">-</td>'
    shown = {
        "pct": lambda v: f"{100 * v:.1f}%",
        "f3": lambda v: f"{v:.3f}",
        "f1": lambda v: f"{v:.1f}",
        "int": lambda v: f"{int(v):,}",
        "text": lambda v: html.escape(str(v)),
    }[kind](value)
    klass = ' class="best"' if best else ""
    return f'<td{klass} data-value="{html.escape(str(value))}">{shown}</td>'


def _summary(reports: Sequence[Report]) -> str:
    present = [c for c in COLUMNS if any(c[1](r) is not None for r in reports)]
    head = "<th>model</th><th>with the member known</th>" + "".join(
        f"<th>{html.escape(c[0])}</th>" for c in present
    )
    best: dict[str, Any] = {}
    # measured on different examples (different label sets), the per-example columns are not
    # comparable: no best is marked there, the labels-all-know table compares them
    same_examples = len({r.examples for r in reports}) == 1
    for title, get, _, rule in present:
        values = [get(r) for r in reports if get(r) is not None]
        if not same_examples and title not in ("parameters", "ms / batch"):
            continue
        if rule and len(values) > 1:
            best[title] = max(values) if rule == "max" else min(values)
    rows = []
    for r in reports:
        known = " / ".join(f"{k} {100 * v:.1f}%" for k, v in r.member_accuracy.items()) or "-"
        cells = [f'<td data-value="{html.escape(r.name)}">{html.escape(r.name)}</td>']
        cells.append(f'<td data-value="{html.escape(known)}">{html.escape(known)}</td>')
        for title, get, kind, _ in present:
            value = get(r)
            cells.append(_cell(value, kind, value is not None and best.get(title) == value))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="summary" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _accuracy_chart(reports: Sequence[Report], baseline: str | None, oracle: str | None) -> str:
    plt = _plt()
    names = [r.name for r in reports]
    values = [100 * r.union_accuracy for r in reports]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    colors = ["#4a7ab5" if n not in (baseline, oracle) else "#999" for n in names]
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), [_short(n, 40) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("union accuracy (%)")
    ax.set_xlim(0, 100)
    for i, v in enumerate(values):
        ax.text(min(v + 1, 92), i, f"{v:.1f}", va="center", fontsize=8)
    for ref, style, what in ((baseline, "--", "baseline"), (oracle, ":", "oracle")):
        match = next((r for r in reports if r.name == ref), None)
        if match is not None:
            x = 100 * match.union_accuracy
            color = "#c33" if what == "oracle" else "#333"
            ax.axvline(
                x, color=color, linestyle=style, label=f"{what}: {_short(match.name, 30)} {x:.1f}%"
            )
    if ax.get_legend_handles_labels()[0]:  # above the plot, where no bar can hide it
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False, fontsize=8)
    return _svg(fig)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _owner(report: Report, label: str) -> str:
    owners = report.label_members.get(label) or []
    return owners[0] if owners else "(new)"


def _confusion_figure(report: Report) -> str:
    """Row-normalised confusion over the union labels, member blocks outlined."""
    import numpy as np

    plt = _plt()
    counts = np.array(report.confusion, dtype=float)
    k = len(report.labels)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(12.0, 2.5 + 0.11 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    owners = [_owner(report, label) for label in report.labels]
    if k <= 40:
        fontsize = max(5.0, min(8.0, 260 / max(k, 1)))
        names = [_short(x, 18) for x in report.labels]
        ax.set_xticks(range(k), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(k), names, fontsize=fontsize)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
    else:  # too many to name: the members' blocks are named (each label is in the table)
        blocks: dict[str, list[int]] = {}
        for i, owner in enumerate(owners):
            blocks.setdefault(owner, []).append(i)
        centers = [sum(v) / len(v) for v in blocks.values()]
        ax.set_xticks(centers, [_short(b, 18) for b in blocks], rotation=90, fontsize=8)
        ax.set_yticks(centers, [_short(b, 18) for b in blocks], fontsize=8)
        ax.set_xlabel(f"predicted label ({k} labels, by member)")
        ax.set_ylabel("true label, by member")
    start = 0
    for i in range(1, k + 1):
        if i == k or owners[i] != owners[start]:
            ax.add_patch(
                plt.Rectangle(
                    (start - 0.5, start - 0.5),
                    i - start,
                    i - start,
                    fill=False,
                    color="#e07b00",
                    lw=1.5,
                )
            )
            start = i
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if counts[t, p]:
                    ax.text(
                        p,
                        t,
                        int(counts[t, p]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[t, p] > 0.5 else "#222",
                    )
    fig.colorbar(image, ax=ax, fraction=0.035, label="share of the true label's examples")
    return _svg(fig)


def task_matrix(report: Report) -> tuple[list[str], list[list[int]]]:
    """Member-by-member counts: the member of the true label (its first owner) against the
    member of the predicted one."""
    owners = [_owner(report, label) for label in report.labels]
    members = list(dict.fromkeys(owners))
    at = {m: i for i, m in enumerate(members)}
    matrix = [[0] * len(members) for _ in members]
    for t, row in enumerate(report.confusion):
        for p, n in enumerate(row):
            matrix[at[owners[t]]][at[owners[p]]] += n
    return members, matrix


def _task_figure(report: Report) -> str:
    import numpy as np

    plt = _plt()
    members, matrix = task_matrix(report)
    counts = np.array(matrix, dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    m = len(members)
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * m, 1.8 + 0.6 * m))
    ax.imshow(share, cmap="Oranges", vmin=0, vmax=1)
    ax.set_xticks(range(m), [_short(x, 16) for x in members], rotation=45, ha="right")
    ax.set_yticks(range(m), [_short(x, 16) for x in members])
    ax.set_xlabel("member of the predicted label")
    ax.set_ylabel("member of the true label")
    for t in range(m):
        for p in range(m):
            ax.text(
                p,
                t,
                f"{100 * share[t, p]:.0f}%",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[t, p] > 0.5 else "#222",
            )
    return _svg(fig)


def _reliability_figure(report: Report) -> str:
    plt = _plt()
    cal = report.calibration
    edges = cal.get("edges", [])
    if len(edges) < 2:
        return "<p class='note'>no calibration numbers in this report</p>"
    centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    width = edges[1] - edges[0]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]}
    )
    used = [c > 0 for c in cal["count"]]
    top.bar(
        [c for c, u in zip(centers, used, strict=True) if u],
        [a for a, u in zip(cal["accuracy"], used, strict=True) if u],
        width=width * 0.9,
        color="#4a7ab5",
        label="accuracy",
    )
    top.plot([0, 1], [0, 1], "--", color="#888", label="perfect calibration")
    top.set_ylabel("accuracy in the bin")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=7)
    top.set_title(f"ECE {report.ece:.3f}", fontsize=9)
    bottom.bar(centers, cal["count"], width=width * 0.9, color="#999")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    return _svg(fig)


def _per_label_table(report: Report, index: int) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("label", "member", "support", "precision", "recall"))
    rows = []
    for row in report.per_label():
        owner = ", ".join(row["members"]) or "(new)"
        rows.append(
            "<tr>"
            + _cell(row["label"], "text")
            + _cell(owner, "text")
            + _cell(row["support"], "int")
            + _cell(row["precision"], "pct")
            + _cell(row["recall"], "pct")
            + "</tr>"
        )
    return (
        f'<table id="per-label-{index}" class="sortable per-label"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def shared_labels(reports: Sequence[Report]) -> list[str] | None:
    """The labels every model knows, in the first model's order; ``None`` when all the models
    know the same labels (or there is one)."""
    sets = [set(r.labels) for r in reports]
    if len(reports) < 2 or all(s == sets[0] for s in sets):
        return None
    return [label for label in reports[0].labels if all(label in s for s in sets)]


def _label_sets(reports: Sequence[Report]) -> str:
    """Accuracy on the labels every model knows and on each model's own, when they differ."""
    common = shared_labels(reports)
    if common is None:
        return ""
    rows = []
    for r in reports:
        extra = [label for label in r.labels if label not in set(common)]
        left = ", ".join(f"{k} ({v})" for k, v in r.unknown.items()) or "-"
        rows.append(
            "<tr>"
            + _cell(r.name, "text")
            + _cell(r.accuracy_on(common), "pct")
            + _cell(r.accuracy_on(extra) if extra else None, "pct")
            + _cell(", ".join(extra) or "-", "text")
            + _cell(left, "text")
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            f"accuracy on the {len(common)} labels all know",
            "accuracy on its other labels",
            "its other labels",
            "left out (labels it does not know)",
        )
    )
    return (
        "<h2>Labels the models share</h2><p class='note'>The models know different labels; each "
        "is measured on the examples of the labels it knows. Did adding labels cost the old "
        "ones? Compare the first column.</p>"
        f'<table id="label-sets" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _model_section(report: Report, index: int) -> str:
    parts = [f'<section class="model" id="model-{index}"><h2>{html.escape(report.name)}</h2>']
    summary = (
        f"{report.examples} examples, union accuracy {100 * report.union_accuracy:.1f}%, "
        f"task confusion {100 * report.task_confusion:.1f}%"
    )
    if report.gate_accuracy is not None:
        gate = 100 * report.gate_accuracy
        summary += f", the router chose a member knowing the label {gate:.1f}% of the time"
    parts.append(f"<p>{html.escape(summary)}</p>")
    if report.confusion:
        parts.append('<div class="grid">')
        parts.append(
            f'<figure id="fig-confusion-{index}">{_confusion_figure(report)}<figcaption>Confusion '
            "over the union labels (rows: true label, shares of its examples); the outlined "
            "blocks are the members: errors outside them are wrong-member answers."
            "</figcaption></figure>"
        )
        parts.append(
            f'<figure id="fig-tasks-{index}">{_task_figure(report)}<figcaption>Task confusion: '
            "the member of the true label against the member of the answer.</figcaption></figure>"
        )
        parts.append(
            f'<figure id="fig-reliability-{index}">{_reliability_figure(report)}<figcaption>'
            "Reliability diagram and confidence histogram (15 bins).</figcaption></figure>"
        )
        parts.append("</div>")
        parts.append("<h3>Per label</h3>" + _per_label_table(report, index))
    provenance = {k: v for k, v in report.model.items()} or {"note": "not recorded"}
    parts.append(
        "<h3>What made it</h3><pre class='provenance'>"
        + html.escape(json.dumps(provenance, indent=2, default=str))
        + "</pre></section>"
    )
    return "".join(parts)


def render_html(
    reports: Sequence[Report],
    *,
    title: str = "netmeld evaluation report",
    source: str | None = None,
    baseline: str | None = None,
    oracle: str | None = None,
) -> str:
    """The report as one HTML document (see the module docs). ``baseline`` and ``oracle``
    name reports drawn as reference lines (default baseline: a model of method ``concat``)."""
    if not reports:
        raise DataError("an HTML report needs at least one evaluated model")
    if baseline is None:
        baseline = next(
            (r.name for r in reports if (r.model.get("method") or {}).get("name") == "concat"),
            None,
        )
    body = [f"<h1>{html.escape(title)}</h1>"]
    where = f" from {html.escape(source)}" if source else ""
    body.append(
        f"<p class='note'>{reports[0].examples + sum(reports[0].unknown.values())} examples"
        f"{where}; netmeld {html.escape(__version__)}. Union accuracy is the argmax over every "
        "label of every member; with the member known, the argmax within the right member's "
        "labels; task confusion, the share of examples answered with a label of a member that "
        "does not know the true one.</p>"
    )
    body.append("<h2>Summary</h2>" + _summary(reports))
    if len({r.examples for r in reports}) > 1:
        body.append(
            "<p class='note'>The models were measured on different examples (each on the labels "
            "it knows), so their accuracies are not marked as best: compare them on the labels "
            "all of them know, under <a href='#label-sets'>Labels the models share</a>.</p>"
        )
    body.append(
        f'<figure id="fig-accuracy">{_accuracy_chart(reports, baseline, oracle)}<figcaption>Union '
        "accuracy per model"
        + (f"; dashed: the baseline ({html.escape(baseline)})" if baseline else "")
        + (f"; dotted: the oracle ({html.escape(oracle)})" if oracle else "")
        + "</figcaption></figure>"
    )
    body.append(_label_sets(reports))
    body.extend(_model_section(r, i) for i, r in enumerate(reports))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        + GENERATOR
        + f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "".join(body)
        + f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )


def _is_report(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as fh:
            return GENERATOR in fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def write_html(
    reports: Sequence[Report], path: str | Path, *, overwrite: bool = False, **options: Any
) -> Path:
    """Write :func:`render_html` to ``path``, atomically; an existing file is replaced only with
    ``overwrite`` and only if it is a report netmeld wrote."""
    path = Path(path)
    check_replaceable(path, overwrite, _is_report, "an HTML report")
    text = render_html(reports, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
