"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import torch

import netmeld
from netmeld.evaluate import expected_calibration_error, metrics_from_logits

LABELS = ["cat", "dog", "man"]
OWNERS = {"cat": ["pets"], "dog": ["pets"], "man": ["people"]}


def test_union_member_and_confusion_metrics_by_hand():
    # rows: true cat -> cat; true dog -> man (confused); true dog -> cat (wrong, same member);
    #       true man -> man
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [4.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 2])
    r = metrics_from_logits("m", logits, targets, LABELS, OWNERS)
    assert r.union_accuracy == 0.5
    # with the member known: pets' rows are 0, 1, 2 -> argmax over cat/dog: cat, dog, cat
    assert math.isclose(r.member_accuracy["pets"], 2 / 3, rel_tol=1e-6)
    assert r.member_accuracy["people"] == 1.0
    assert r.task_confusion == 0.25  # only row 1 answered with another member's label


def test_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    targets = torch.tensor([0, 1, 0, 0])
    # bin around 0.9: conf 0.9, acc 0.5 -> 0.4 * 0.5; bin around 0.6: conf 0.6, acc 1 -> 0.4 * 0.5
    want = 0.5 * 0.4 + 0.5 * 0.4
    assert math.isclose(expected_calibration_error(probs, targets), want, rel_tol=1e-5)


def test_a_perfect_model_scores_perfectly(digits2):
    model = netmeld.meld([digits2.oracle])
    x = digits2.test[0]
    predicted = model.predict(x)
    report = netmeld.evaluate(model, (x, predicted))
    assert report.union_accuracy == 1.0 and report.task_confusion == 0.0
    union_params = sum(p.numel() for p in model.union.parameters())  # scale, offset, biases
    assert report.parameters == digits2.oracle.num_parameters + union_params
    assert report.latency_ms is not None and report.latency_ms > 0


def test_report_reads_as_one_line(digits2):
    report = netmeld.evaluate(netmeld.meld(digits2.members), digits2.test)
    text = str(report)
    assert text.startswith(f"concat: union accuracy {100 * report.union_accuracy:.1f}%")
    assert "m1 " in text and "task confusion" in text and "\n" not in text


def test_evaluation_builds_no_autograd_graph(digits2, monkeypatch):
    import sys

    ev = sys.modules["netmeld.evaluate"]  # the module (netmeld.evaluate is the function)
    model = netmeld.meld(digits2.members, "concat")
    for p in model.parameters():
        p.requires_grad_(True)  # as a user fine-tuning it would leave it
    seen = []
    real = ev.metrics_from_logits

    def spy(name, logits, *args, **kwargs):
        seen.append(logits.requires_grad)
        return real(name, logits, *args, **kwargs)

    monkeypatch.setattr(ev, "metrics_from_logits", spy)
    netmeld.evaluate(model, (digits2.test[0][:64], digits2.test[1][:64]), latency=False)
    assert seen == [False]
