"""``semi`` (a few labels plus unlabeled inputs) and the ``max-logit`` task score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import netmeld
from netmeld.demo import method_data, method_inputs
from netmeld.methods import register_method


def test_semi_reads_both_sets_and_records_them(digits3):
    inputs = method_inputs(digits3, "semi")
    model = netmeld.meld(digits3.members, "semi", **inputs)
    labeled, unlabeled = len(inputs["data"][1]), len(inputs["unlabeled"])
    assert model.method["fitted"] == {"labeled": labeled, "unlabeled": unlabeled}
    assert model.method["examples"] == labeled + unlabeled
    assert model.union.router is not None  # the gate chooses the member


def test_semi_uses_the_unlabeled_inputs(digits3):
    """The unlabeled pool changes the fit, and beats the same labels alone (router)."""
    few = method_data(digits3, "semi")
    with_pool = netmeld.meld(digits3.members, "semi", few, unlabeled=digits3.pool[:300])
    with pytest.warns(UserWarning, match="got no unlabeled inputs"):
        alone = netmeld.meld(digits3.members, "semi", few)
    router = netmeld.meld(digits3.members, "router", few)
    acc = {
        name: netmeld.evaluate(m, digits3.test, latency=False).union_accuracy
        for name, m in (("pool", with_pool), ("alone", alone), ("router", router))
    }
    assert acc["pool"] > acc["alone"] + 0.01 and acc["pool"] > acc["router"] + 0.01, acc


def test_unlabeled_data_for_a_method_that_reads_none_is_refused(digits2):
    with pytest.raises(netmeld.MethodError, match=r"reads no separate unlabeled data.*semi"):
        netmeld.meld(
            digits2.members, "calibrate", method_data(digits2, "calibrate"), unlabeled=digits2.pool
        )


def test_semi_refuses_unlabeled_inputs_of_the_wrong_shape(digits2):
    with pytest.raises(netmeld.DataError, match="unlabeled data for method 'semi'"):
        netmeld.meld(
            digits2.members,
            "semi",
            method_data(digits2, "semi"),
            unlabeled=torch.zeros(10, 3, 8, 8),
        )


def test_only_a_labeled_method_may_read_unlabeled_data_too():
    with pytest.raises(netmeld.MethodError, match="only a labeled method"):
        register_method("odd-one", data="unlabeled", unlabeled=True)


def test_max_logit_weighs_each_member_by_its_largest_logit(digits3):
    """p(member | x) is the softmax over the members' largest calibrated logits, and within a
    member the union keeps that member's own softmax."""
    model = netmeld.meld(digits3.members, "max-logit")
    x = digits3.test[0][:64]
    with torch.no_grad():
        out = model.run_members(x)
        logits = [z * s for z, s in zip(out.logits, model.union.scale, strict=True)]
        probs = model.logits_from(out).softmax(1)
    expected = torch.stack([z.max(1).values for z in logits], 1).softmax(1)
    for i, member in enumerate(model.members):
        cols = [model.labels.index(label) for label in member.labels]
        mine = probs[:, cols]
        torch.testing.assert_close(mine.sum(1), expected[:, i])
        torch.testing.assert_close(mine / mine.sum(1, keepdim=True), F.softmax(logits[i], 1))


def test_max_logit_survives_save_and_load(digits2, tmp_path):
    model = netmeld.meld(digits2.members, "max-logit")
    loaded = netmeld.load(model.save(tmp_path / "m"))
    assert loaded.union.task_score == "max-logit"
    x = digits2.test[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        assert not torch.allclose(netmeld.meld(digits2.members, "weight-norm")(x), model(x))
