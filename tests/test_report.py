"""The HTML evaluation report, comparing models with different label sets, and the CLI's
--json / --report / --per-class and ``netmeld report``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import netmeld
from netmeld.cli import main
from netmeld.demo import method_inputs
from netmeld.evaluate import Reports

pytest.importorskip("matplotlib")


class Page(HTMLParser):
    """Tables (cells' data-value by table id), figure ids with whether they hold an SVG, and
    every attribute and tag, for the checks below."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.figures: dict[str, bool] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._table: str | None = None
        self._figure: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table or ""] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self.tables[self._table][-1].append(a.get("data-value") or "")
        elif tag == "figure":
            self._figure = a.get("id")
            self.figures[self._figure or ""] = False
        elif tag == "svg" and self._figure is not None:
            self.figures[self._figure] = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "figure":
            self._figure = None


@pytest.fixture(scope="module")
def reports(digits3):
    models = {
        m: netmeld.meld(digits3.members, m, **method_inputs(digits3, m))
        for m in ("concat", "calibrate", "router")
    }
    models["oracle"] = netmeld.meld([digits3.oracle], "concat")
    return netmeld.compare(models, digits3.test, latency=False)


@pytest.fixture(scope="module")
def rendered(reports, tmp_path_factory):
    """The reports' HTML file, rendered once for the tests that read it."""
    return reports.to_html(tmp_path_factory.mktemp("report") / "r.html", oracle="oracle")


def test_the_reports_numbers_are_the_reports(reports, rendered):
    page = Page(rendered.read_text())
    rows = [r for r in page.tables["summary"] if r]
    assert [r[0] for r in rows] == [r.name for r in reports]
    for row, report in zip(rows, reports, strict=True):
        assert float(row[2]) == pytest.approx(report.union_accuracy)
        assert float(row[3]) == pytest.approx(report.task_confusion)
        assert float(row[4]) == pytest.approx(report.ece)
    router = rows[2]
    assert float(router[5]) == pytest.approx(reports[2].gate_accuracy)
    for i, report in enumerate(reports):
        table = [r for r in page.tables[f"per-label-{i}"] if r]
        assert [r[0] for r in table] == report.labels
        for r, expected in zip(table, report.per_label(), strict=True):
            assert int(r[2]) == expected["support"]
            if expected["recall"] is not None:
                assert float(r[4]) == pytest.approx(expected["recall"])
        # the confusion matrix's diagonal gives the union accuracy
        confusion = np.array(report.confusion)
        assert confusion.trace() / confusion.sum() == pytest.approx(report.union_accuracy)


def test_every_figure_is_there_for_every_model(reports, rendered):
    page = Page(rendered.read_text())
    wanted = {"fig-accuracy"} | {
        f"fig-{kind}-{i}"
        for i in range(len(reports))
        for kind in ("confusion", "tasks", "reliability")
    }
    assert wanted <= set(page.figures) and all(page.figures[f] for f in wanted)


def test_the_file_references_nothing_outside_itself(rendered):
    text = rendered.read_text()
    page = Page(text)
    for tag, attrs in page.tags:
        assert tag not in ("link", "img", "iframe", "object", "embed"), tag
        for name in ("src", "href", "xlink:href"):
            value = attrs.get(name)
            inline = value is None or value.startswith(("#", "data:"))  # data: URIs are inline
            assert inline, (tag, name, value)
    assert not re.search(r"url\((?!#)", text) and "@import" not in text
    # no address at all, but the SVG namespace names (xmlns="http://www.w3.org/...")
    addresses = re.findall(r"(?<!xmlns=\")(?<!xmlns:xlink=\")https?://[^\s\"'<>]+", text)
    assert not addresses, addresses[:3]


def test_a_model_before_and_after_extend_is_compared_on_the_labels_each_knows(
    digits2, tmp_path, capsys
):
    base = netmeld.meld(digits2.members, "calibrate", **method_inputs(digits2, "calibrate"))
    x, labels = digits2.test
    # a new class 'frog' taught from a few examples; the test set holds frogs too
    frogs = torch.rand(12, *x.shape[1:])
    extended = netmeld.extend(base, (frogs[:6], ["frog"] * 6), steps=0)
    test = (torch.cat([x, frogs[6:]]), [*labels, *["frog"] * 6])
    with pytest.raises(netmeld.LabelError, match="frog"):
        netmeld.evaluate(base, test, latency=False)
    before, after = netmeld.compare({"before": base, "after": extended}, test, latency=False)
    assert before.unknown == {"frog": 6} and after.unknown == {}
    assert before.examples == len(labels) and after.examples == len(labels) + 6
    shared = list(base.labels)
    assert before.accuracy_on(shared) == pytest.approx(before.union_accuracy)
    assert after.accuracy_on(["frog"]) is not None
    text = Reports([before, after]).to_html(tmp_path / "r.html").read_text()
    page = Page(text)
    # measured on different examples: no accuracy is marked best, only the parameters
    start = text.index('id="summary"')
    summary = text[start : text.index("</table>", start)]
    marked = re.findall(r'class="best" data-value="([^"]*)"', summary)
    assert marked == [str(before.parameters)] and "not marked as best" in text
    rows = [r for r in page.tables["label-sets"] if r]
    assert float(rows[0][1]) == pytest.approx(before.accuracy_on(shared))
    assert float(rows[1][1]) == pytest.approx(after.accuracy_on(shared))
    assert rows[0][4] == "frog (6)"
    # the terminal's table says the same
    from netmeld.cli.commands import _print_label_sets

    _print_label_sets([before, after])
    out = " ".join(capsys.readouterr().out.split())  # the title may wrap
    assert f"accuracy on the {len(shared)} they all know" in out and "frog (6)" in out
    assert f"{100 * before.accuracy_on(shared):.1f}%" in out


def test_the_cli_writes_json_and_a_report_and_rebuilds_it(digits2, tmp_path, capsys):
    from PIL import Image

    x, labels = digits2.test
    for i, (img, label) in enumerate(zip(x[:60], labels[:60], strict=True)):
        folder = tmp_path / "test" / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    netmeld.meld(digits2.members, "concat").save(tmp_path / "a")
    netmeld.meld(digits2.members, "weight-norm").save(tmp_path / "b")
    argv = ["eval", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(tmp_path / "test")]
    argv += ["--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.html")]
    assert main([*argv, "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "recall per label" in out and "union acc" in out
    raw = json.loads((tmp_path / "r.json").read_text())
    assert [r["examples"] for r in raw] == [60, 60]
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "again.html")]) == 0
    first = Page((tmp_path / "r.html").read_text()).tables["summary"]
    again = Page((tmp_path / "again.html").read_text()).tables["summary"]
    assert first == again
    # a second run replaces its own files only with --overwrite; never a file netmeld did not write
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    again = ["report", str(tmp_path / "r.json"), "-o", str(notes), "--overwrite"]
    assert main(again) == 2 and "not an HTML report netmeld wrote" in capsys.readouterr().err
    assert notes.read_text() == "<html>my notes</html>"
    assert not [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    # hostile results files: each a clear error naming the file and what is wrong
    good = raw[0]
    for bad, says in (
        ([{"name": "x", "surprise": 1}], "unknown key 'surprise'"),
        ([{**good, "examples": "many"}], "examples"),
        ([{**good, "confusion": [[1, 2]]}], "confusion is not"),
        ({"name": "x"}, "expected a JSON list of reports"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert main(["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert says in err and "bad.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.html").exists()


def _hundred_label_report():
    """A report over 100 labels of 10 members (numbers from a seeded random confusion)."""
    from netmeld.evaluate import metrics_from_logits

    g = torch.Generator().manual_seed(0)
    labels = [f"class-{i:03d}" for i in range(100)]
    owners = {label: [f"member-{i // 10}"] for i, label in enumerate(labels)}
    targets = torch.randint(100, (2000,), generator=g)
    logits = torch.randn(2000, 100, generator=g)
    logits[torch.arange(2000), targets] += 3.0
    report = metrics_from_logits("a hundred labels", logits, targets, labels, owners)
    return report


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt install chromium)"
)
@pytest.mark.parametrize("size", ["few labels", "100 labels"])
def test_the_report_renders_in_a_headless_browser(size, rendered, tmp_path):
    from PIL import Image

    if size == "few labels":
        page = rendered
    else:
        page = Reports([_hundred_label_report()]).to_html(tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "rror" in line or "Uncaught" in line], console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not blank: text and plots
    dark = (pixels < 128).mean()
    assert 0.01 < dark < 0.6
