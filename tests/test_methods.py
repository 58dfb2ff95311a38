"""Contract tests over the method registry, and accuracy against the naive baseline."""

from __future__ import annotations

import pytest
import torch

import netmeld
from netmeld.demo import method_data, method_inputs
from netmeld.methods import MethodParams, get_method, register_method

# Zero-data ensembles average probabilities; over disjoint label sets that is the naive
# baseline in probability space, so they are tested on overlapping labels (test_ensembles.py).
ENSEMBLES = {"mean", "vote", "max-confidence"}
# max-logit is the task-prediction baseline of the literature; on digits it chooses the member
# as concat does (test_semi.py checks what it computes)
BASELINES = {"concat", "max-logit"}
NON_NAIVE = [m for m in netmeld.list_methods() if m not in BASELINES and m not in ENSEMBLES]


@pytest.mark.parametrize("scenario", ["digits2", "digits3"])
@pytest.mark.parametrize("method", NON_NAIVE)
def test_each_method_beats_concat_on_digits(method, scenario, request):
    sc = request.getfixturevalue(scenario)
    concat = netmeld.evaluate(netmeld.meld(sc.members, "concat"), sc.test, latency=False)
    model = netmeld.meld(sc.members, method, **method_inputs(sc, method))
    report = netmeld.evaluate(model, sc.test, latency=False)
    assert report.union_accuracy > concat.union_accuracy + 0.01, (
        method,
        report.union_accuracy,
        concat.union_accuracy,
    )


@pytest.mark.parametrize("method", netmeld.list_methods())
def test_methods_never_change_the_members(method, digits2):
    before = [{k: v.clone() for k, v in m.module.state_dict().items()} for m in digits2.members]
    netmeld.meld(digits2.members, method, **method_inputs(digits2, method))
    for m, state in zip(digits2.members, before, strict=True):
        for k, v in m.module.state_dict().items():
            assert torch.equal(v, state[k]), (method, m.name, k)


@pytest.mark.parametrize("method", netmeld.list_methods())
def test_methods_are_deterministic_for_a_seed(method, digits2):
    x = digits2.test[0][:32]
    a = netmeld.meld(digits2.members, method, **method_inputs(digits2, method), seed=1)
    b = netmeld.meld(digits2.members, method, **method_inputs(digits2, method), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_unknown_method_lists_the_valid_ones(digits2):
    with pytest.raises(netmeld.MethodError, match="valid methods: concat, weight-norm"):
        netmeld.meld(digits2.members, "average")


def test_unknown_parameter_is_refused_with_the_valid_ones(digits2):
    with pytest.raises(netmeld.MethodError, match=r"stepz.*parameters are: steps"):
        netmeld.meld(digits2.members, "infomax", digits2.pool[:50], params={"stepz": 3})


def test_labeled_method_refuses_unlabeled_data(digits2):
    with pytest.raises(netmeld.DataError, match="needs labeled data"):
        netmeld.meld(digits2.members, "calibrate", digits2.pool[:50])


def test_unlabeled_method_without_data_is_an_error(digits2):
    with pytest.raises(netmeld.DataError, match="no data"):
        netmeld.meld(digits2.members, "infomax")


def test_registry_refuses_clashes_and_malformed_names():
    with pytest.raises(netmeld.MethodError, match="registered already"):
        register_method("concat", data="none")(lambda *a: None)
    with pytest.raises(netmeld.MethodError, match="lowercase"):
        register_method("Bad_Name", data="none")
    info = get_method("infomax")
    assert info.data == "unlabeled" and issubclass(info.params, MethodParams)
    assert set(netmeld.list_methods("labeled")) >= {"calibrate", "finetune", "router"}


def test_bn_standardize_needs_a_batchnorm_before_the_head():
    from torch import nn

    m = netmeld.Member(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ["a", "b"],
        name="plain",
        preprocessing=netmeld.Preprocessing((4,)),
    )
    with pytest.raises(netmeld.MethodError, match="BatchNorm"):
        netmeld.meld([m], "bn-standardize")


def test_bn_moments_match_monte_carlo_where_the_model_holds():
    """BN -> ReLU -> head on Gaussian inputs: the predicted moments equal the sampled ones."""
    from torch import nn

    from netmeld.members.moments import bn_feature_moments

    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(200_000, 6) * torch.linspace(0.5, 3, 6) + torch.linspace(-2, 2, 6)
    bn = net[0]
    with torch.no_grad():
        bn.running_mean.copy_(x.mean(0))
        bn.running_var.copy_(x.var(0))
        bn.weight.copy_(torch.linspace(0.5, 2, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    net.eval()
    member = netmeld.Member(net, ["a", "b"], name="bn", preprocessing=netmeld.Preprocessing((6,)))
    mean, var = bn_feature_moments(member)
    with torch.no_grad():
        feats = net[1](net[0](x))
    torch.testing.assert_close(mean, feats.mean(0), atol=0.02, rtol=0.02)
    torch.testing.assert_close(var, feats.var(0), atol=0.03, rtol=0.03)


def test_select_refits_the_method_with_the_best_cross_validated_accuracy(digits2):
    data = method_data(digits2, "select")
    model = netmeld.meld(digits2.members, "select", data)
    fitted = model.method["fitted"]
    scores = fitted["cv_accuracy"]
    assert set(scores) == {"calibrate", "finetune", "router"}
    assert scores[fitted["selected"]] == max(scores.values())
    direct = netmeld.meld(digits2.members, fitted["selected"], data)
    x = digits2.test[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x))


def test_select_refuses_a_candidate_that_needs_no_labels(digits2):
    with pytest.raises(netmeld.MethodError, match="'weight-norm' is not a labeled method"):
        netmeld.meld(
            digits2.members,
            "select",
            method_data(digits2, "select"),
            params={"candidates": ["calibrate", "weight-norm"]},
        )
