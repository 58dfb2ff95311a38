"""Post-hoc ensembles, stacking and many-to-one transfer: label alignment, the unknown-label
rules, prefit members left alone, open label sets, the router's gate accuracy, save/load."""

from __future__ import annotations

import copy
import typing

import pytest
import torch

import netmeld
from netmeld import Architecture, Member, Preprocessing
from netmeld.demo import method_data
from netmeld.demo.scenarios import TableScenario, few_per_class
from netmeld.methods.transfer import TransferParams
from netmeld.model.heads import Ensemble, FeatureHead, Stacker
from netmeld.zoo import MLP

from ._tables import wine_scenario

IN = 6
ANIMALS = ["cat", "dog", "bird", "fish"]


def _mlp_member(name: str, labels: list[str], seed: int) -> Member:
    """An untrained but confident MLP (sharpened head) on 6-vectors."""
    torch.manual_seed(seed)
    net = MLP(IN, len(labels), hidden=16, depth=1).eval()
    with torch.no_grad():
        net.fc.weight.mul_(4.0)
    return Member(
        net,
        labels,
        name=name,
        preprocessing=Preprocessing((IN,)),
        architecture=Architecture("netmeld.zoo:mlp", {"in_features": IN, "hidden": 16, "depth": 1}),
    )


def _shuffled(member: Member, perm: list[int]) -> Member:
    """The same classifier with its head rows and label list in the order ``perm``."""
    module = copy.deepcopy(member.module)
    with torch.no_grad():
        module.fc.weight.copy_(module.fc.weight[perm])
        module.fc.bias.copy_(module.fc.bias[perm])
    return Member(
        module,
        [member.labels[i] for i in perm],
        name=member.name,
        preprocessing=member.preprocessing,
        architecture=member.architecture,
    )


def _probs(member: Member, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A member's own softmax, per label name."""
    with torch.no_grad():
        p = member.module(x).softmax(1)
    return {label: p[:, j] for j, label in enumerate(member.labels)}


def _by_name(model: netmeld.CombinedModel, x: torch.Tensor, order: list[str]) -> torch.Tensor:
    p = model.predict_proba(x)
    return p[:, [model.labels.index(label) for label in order]]


@pytest.fixture(scope="module")
def wine() -> TableScenario:
    return wine_scenario()


def _accuracy(model: netmeld.CombinedModel, data: tuple[torch.Tensor, list[str]]) -> float:
    return netmeld.evaluate(model, data, latency=False).union_accuracy


# -- label alignment ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "vote", "max-confidence"])
def test_members_are_aligned_by_label_name_not_position(method):
    a = _mlp_member("a", ANIMALS, seed=1)
    b = _mlp_member("b", ANIMALS, seed=2)
    c = _mlp_member("c", ANIMALS, seed=3)
    x = torch.randn(64, IN) * 2
    plain = netmeld.meld([a, b, c], method)
    shuffled = netmeld.meld(
        [_shuffled(a, [2, 0, 3, 1]), _shuffled(b, [1, 3, 0, 2]), _shuffled(c, [3, 2, 1, 0])],
        method,
    )
    assert set(shuffled.labels) == set(ANIMALS) and shuffled.labels != plain.labels
    torch.testing.assert_close(_by_name(shuffled, x, ANIMALS), _by_name(plain, x, ANIMALS))
    torch.testing.assert_close(plain.predict_proba(x).sum(1), torch.ones(len(x)))


def test_positional_averaging_would_differ_so_alignment_matters():
    a = _mlp_member("a", ANIMALS, seed=1)
    b = _mlp_member("b", ANIMALS, seed=2)
    b2 = _shuffled(b, [1, 3, 0, 2])
    x = torch.randn(64, IN) * 2
    model = netmeld.meld([a, b2], "mean")
    pa, pb = _probs(a, x), _probs(b, x)
    want = torch.stack([(pa[k] + pb[k]) / 2 for k in ANIMALS], dim=1)
    torch.testing.assert_close(_by_name(model, x, ANIMALS), want)
    with torch.no_grad():
        positional = (a.module(x).softmax(1) + b2.module(x).softmax(1)) / 2
    assert not torch.allclose(positional, want, atol=1e-3)


# -- labels only some members know ----------------------------------------------------------


def _overlap() -> tuple[Member, Member, torch.Tensor]:
    a = _mlp_member("A", ["a", "b", "c"], seed=4)
    b = _mlp_member("B", ["b", "c", "d"], seed=5)
    return a, b, torch.randn(48, IN) * 2


def test_renormalize_rule_averages_over_the_members_that_know_a_label():
    a, b, x = _overlap()
    model = netmeld.meld([a, b], "mean")
    assert model.labels == ["a", "b", "c", "d"]
    pa, pb = _probs(a, x), _probs(b, x)
    raw = torch.stack([pa["a"], (pa["b"] + pb["b"]) / 2, (pa["c"] + pb["c"]) / 2, pb["d"]], 1)
    want = raw / raw.sum(1, keepdim=True)
    torch.testing.assert_close(model.predict_proba(x), want)


def test_zero_rule_counts_an_unknown_label_as_probability_zero():
    a, b, x = _overlap()
    model = netmeld.meld([a, b], "mean", params={"unknown": "zero"})
    pa, pb = _probs(a, x), _probs(b, x)
    want = torch.stack([pa["a"], pa["b"] + pb["b"], pa["c"] + pb["c"], pb["d"]], 1) / 2
    torch.testing.assert_close(model.predict_proba(x), want)
    renormalized = netmeld.meld([a, b], "mean").predict_proba(x)
    assert not torch.allclose(renormalized, want, atol=1e-3)


def test_max_confidence_takes_the_highest_probability_per_label():
    a, b, x = _overlap()
    model = netmeld.meld([a, b], "max-confidence")
    pa, pb = _probs(a, x), _probs(b, x)
    raw = torch.stack(
        [pa["a"], torch.maximum(pa["b"], pb["b"]), torch.maximum(pa["c"], pb["c"]), pb["d"]], 1
    )
    torch.testing.assert_close(model.predict_proba(x), raw / raw.sum(1, keepdim=True))


# -- weights -----------------------------------------------------------------------------------


def test_fixed_weights_pick_a_member():
    a = _mlp_member("A", ANIMALS, seed=1)
    b = _mlp_member("B", ANIMALS, seed=2)
    x = torch.randn(32, IN)
    model = netmeld.meld([a, b], "mean", params={"weights": {"A": 1, "B": 0}})
    pa = _probs(a, x)
    torch.testing.assert_close(
        _by_name(model, x, ANIMALS), torch.stack([pa[k] for k in ANIMALS], 1)
    )
    with pytest.raises(netmeld.MethodError, match="'C', which is not a member"):
        netmeld.meld([a, b], "mean", params={"weights": {"A": 1, "C": 2}})
    with pytest.raises(netmeld.MethodError, match="'Z', which is not a member"):
        netmeld.meld([a, b], "vote", params={"weights": {"Z": 1}})


def test_weighted_fits_weights_that_favour_the_useful_member(wine):
    torch.manual_seed(0)  # the noise member's weights must not depend on earlier tests
    noise = Member(
        MLP(3, 3, hidden=8, depth=1).eval(),
        list(wine.members[0].labels),
        name="noise",
        preprocessing=Preprocessing(
            (3,), mean=(0.0,), std=(100.0,), columns=tuple(wine.feature_names[:3])
        ),
        architecture=Architecture("netmeld.zoo:mlp", {"in_features": 3, "hidden": 8, "depth": 1}),
    )
    members = [*wine.members, noise]
    model = netmeld.meld(members, "weighted", wine.holdout, feature_names=wine.feature_names)
    fitted = model.method["fitted"]
    weights = fitted["weights"]
    assert list(weights) == ["cols1", "cols2", "noise"]
    assert fitted["unknown"] in ("renormalize", "zero")
    assert sum(weights.values()) == pytest.approx(3.0, abs=1e-3)
    # measured: all the weight goes to cols1 (perfect on the holdout), none to the noise
    assert weights["noise"] < 0.1 and max(weights, key=weights.__getitem__) != "noise"
    assert isinstance(model.combiner, Ensemble)
    torch.testing.assert_close(
        model.combiner.weights, torch.tensor(list(weights.values())), atol=1e-4, rtol=0
    )
    plain = netmeld.meld(members, "mean", feature_names=wine.feature_names)
    assert _accuracy(model, wine.test) > _accuracy(plain, wine.test)  # 0.96 vs 0.91


# -- stacking ----------------------------------------------------------------------------------


def test_stacking_never_refits_the_prefit_members(wine):
    before = [{k: v.clone() for k, v in m.module.state_dict().items()} for m in wine.members]
    model = netmeld.meld(
        wine.members,
        "stack",
        wine.holdout,
        params={"l2": 0.01, "steps": 50},
        feature_names=wine.feature_names,
    )
    for m, state in zip(wine.members, before, strict=True):
        after = m.module.state_dict()
        assert after.keys() == state.keys()
        for k, v in after.items():
            assert torch.equal(v, state[k]), (m.name, k)
        for k, v in model.heads[m.name].state_dict().items():
            assert torch.equal(v, state[f"fc.{k}"]), (m.name, k)
    x = wine.test[0]
    with torch.no_grad():
        out = model.run_members(x)
    for i, m in enumerate(wine.members):  # the members inside the model still answer as before
        cols = [wine.feature_names.index(c) for c in m.preprocessing.columns]
        mean, std = torch.tensor(m.preprocessing.mean), torch.tensor(m.preprocessing.std)
        with torch.no_grad():
            torch.testing.assert_close(out.logits[i], m.module((x[:, cols] - mean) / std))


@pytest.mark.parametrize(
    "params",
    [{}, {"meta": "mlp"}, {"passthrough": "input"}, {"passthrough": "features"}],
    ids=["logistic", "mlp", "input", "features"],
)
def test_stacking_beats_the_weaker_member_on_wine(wine, params):
    singles = [
        _accuracy(netmeld.meld([m], "concat", feature_names=wine.feature_names), wine.test)
        for m in wine.members
    ]
    model = netmeld.meld(
        wine.members,
        "stack",
        wine.holdout,
        params={"l2": 0.01, "steps": 50, **params},
        feature_names=wine.feature_names,
    )
    assert isinstance(model.combiner, Stacker)
    want_dim = 3 * len(wine.members)
    if params.get("passthrough") == "input":
        want_dim += len(wine.feature_names)
    elif params.get("passthrough") == "features":
        want_dim += sum(model.heads[n].in_features for n in model.member_names)
    assert model.combiner.in_dim == want_dim
    acc = _accuracy(model, wine.test)
    # measured: members 0.96 / 0.85; stack 0.91-0.96 for every variant here
    assert acc > min(singles) and acc >= 0.88, (acc, singles)


# -- many-to-one transfer ------------------------------------------------------------------


def _nine(label: str) -> str:
    return "nine" if label == "9" else label


@pytest.fixture(scope="module")
def renamed(digits2):
    """10 labeled examples per digit from the pool, with '9' renamed 'nine' (no member knows
    it); the test set renamed the same way."""
    few = few_per_class(digits2.pool_labels, 10, seed=0)
    data = digits2.pool[few], [_nine(digits2.pool_labels[i]) for i in few]
    test = digits2.test[0], [_nine(label) for label in digits2.test[1]]
    return data, test


@pytest.mark.parametrize(
    "fusion", typing.get_args(TransferParams.model_fields["fusion"].annotation)
)
def test_transfer_learns_a_label_no_member_knows(digits2, renamed, fusion):
    data, test = renamed
    model = netmeld.meld(digits2.members, "transfer", data, params={"fusion": fusion, "steps": 100})
    assert isinstance(model.combiner, FeatureHead) and model.combiner.fusion == fusion
    assert "nine" in model.labels and model.label_members["nine"] == []
    preds = model.predict(test[0])
    nines = [p for p, label in zip(preds, test[1], strict=True) if label == "nine"]
    assert nines and sum(p == "nine" for p in nines) / len(nines) > 0.5
    # measured 0.82-0.86 over ten labels (chance 0.1)
    report = netmeld.evaluate(model, test, latency=False)
    assert report.union_accuracy > 0.7, report.union_accuracy


def test_transfer_unfreeze_trains_the_models_trunk(digits2, renamed):
    data, test = renamed
    members = [copy.deepcopy(m) for m in digits2.members]  # keep the session fixture intact
    model = netmeld.meld(members, "transfer", data, params={"unfreeze": 1, "steps": 30})
    assert model.method["fitted"]["unfrozen_parameters"] > 0
    fresh = netmeld.CombinedModel(digits2.members)
    trunk_after = model.trunks.state_dict()
    changed = [
        k for k, v in fresh.trunks.state_dict().items() if not torch.equal(v, trunk_after[k])
    ]
    assert changed
    assert _accuracy(model, test) > 0.5


def test_transfer_unfreeze_never_changes_the_members_own_modules(digits2, renamed):
    data, _ = renamed
    members = [copy.deepcopy(m) for m in digits2.members]
    before = [{k: v.clone() for k, v in m.module.state_dict().items()} for m in members]
    netmeld.meld(members, "transfer", data, params={"unfreeze": 1, "steps": 30})
    for m, state in zip(members, before, strict=True):
        for k, v in m.module.state_dict().items():
            assert torch.equal(v, state[k]), (m.name, k)


# -- the router's gate ---------------------------------------------------------------------


@pytest.mark.parametrize("gate_on", ["features", "input"])
def test_router_reports_gate_accuracy(digits2, gate_on):
    data = method_data(digits2, "router")
    model = netmeld.meld(digits2.members, "router", data, params={"gate_on": gate_on, "steps": 100})
    report = netmeld.evaluate(model, digits2.test, latency=False)
    assert report.gate_accuracy is not None
    # measured 0.87 (features) and 0.78 (input); two members, so 0.5 is chance
    assert 0.6 < report.gate_accuracy <= 1.0
    assert "gate accuracy" in str(report)
    gate = model.gate(digits2.test[0][:16])
    assert gate is not None and gate.shape == (16, 2)
    torch.testing.assert_close(gate.exp().sum(1), torch.ones(16))


def test_gate_accuracy_is_none_without_a_router(digits2):
    x = digits2.test[0][:100], digits2.test[1][:100]
    for model in (netmeld.meld(digits2.members, "concat"), netmeld.meld(digits2.members, "mean")):
        assert model.gate(x[0]) is None
        assert netmeld.evaluate(model, x, latency=False).gate_accuracy is None


# -- save / load ----------------------------------------------------------------------------


ROUND_TRIPS = {
    "mean": ("mean", {"unknown": "zero", "weights": {"m1": 2.0, "m2": 1.0}}),
    "vote": ("vote", {}),
    "weighted": ("weighted", {"steps": 20}),
    "stack-logistic": ("stack", {"l2": 0.01, "steps": 30}),
    "stack-mlp": ("stack", {"meta": "mlp", "l2": 0.01, "steps": 30, "passthrough": "input"}),
    "transfer-concat": ("transfer", {"steps": 30}),
    "transfer-sum": ("transfer", {"fusion": "sum", "steps": 30}),
    "transfer-attention": ("transfer", {"fusion": "attention", "steps": 30, "dim": 16}),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_combiners_save_and_load_with_identical_outputs(digits2, renamed, case, tmp_path):
    method, params = ROUND_TRIPS[case]
    need = netmeld.get_method(method).data
    data = renamed[0] if method == "transfer" else method_data(digits2, method)
    model = netmeld.meld(digits2.members, method, data if need != "none" else None, params=params)
    model.save(tmp_path / "m")
    loaded = netmeld.load(tmp_path / "m")
    x = digits2.test[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.labels == model.labels
    assert type(loaded.combiner) is type(model.combiner)
    assert loaded.combiner.config() == model.combiner.config()
    assert loaded.method == model.method


def test_transfer_head_starts_where_the_members_heads_are(digits2):
    """With init='members' and (almost) no training, the new head gives the members' logits."""
    few = few_per_class(digits2.pool_labels, 3, seed=0)
    data = (digits2.pool[few], [digits2.pool_labels[i] for i in few])
    model = netmeld.meld(digits2.members, "transfer", data, params={"steps": 1, "lr": 1e-12})
    concat = netmeld.meld(digits2.members, "concat")
    x = digits2.test[0][:50]
    assert model.labels == concat.labels
    with torch.no_grad():
        torch.testing.assert_close(model(x), concat(x), atol=1e-4, rtol=1e-4)
