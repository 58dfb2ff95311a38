"""The combined model: shared trunk equals running members by hand; save/load; union rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import netmeld
from netmeld import CombinedModel, Member, Preprocessing
from netmeld.engine import state_equal
from netmeld.zoo import SmallCNN


def _by_hand(member: Member, x: torch.Tensor) -> torch.Tensor:
    p = member.preprocessing
    mean = torch.tensor(p.mean).view(1, -1, 1, 1)
    std = torch.tensor(p.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return member.module((x - mean) / std)


def test_shared_trunk_runs_once_and_equals_members_by_hand(digits2):
    model = CombinedModel(digits2.members)
    assert len(model.plan) == 1 and set(model.plan[0].members) == {"m1", "m2"}
    assert all(isinstance(model.necks[n], nn.Identity) for n in model.member_names)
    x = digits2.test[0][:32]
    with torch.no_grad():
        out = model.run_members(x)
        union = model(x)
    expected = [_by_hand(m, x) for m in digits2.members]
    for got, want in zip(out.logits, expected, strict=True):
        torch.testing.assert_close(got, want)
    # concat of disjoint members is the concatenation of their logits, in label order
    torch.testing.assert_close(union, torch.cat(expected, dim=1))
    assert model.labels == [str(d) for d in range(10)]
    assert model.label_members["7"] == ["m2"]


def test_trunk_forward_counted_once(digits3):
    model = CombinedModel(digits3.members)
    calls = []
    model.trunks["0"].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(digits3.test[0][:8])
    assert len(calls) == 1
    shared = model.num_parameters
    separate = sum(m.num_parameters for m in digits3.members)
    assert shared < separate


def test_partial_sharing_cuts_before_the_first_different_layer(digits2):
    a, b = digits2.members
    module = copy.deepcopy(b.module)
    with torch.no_grad():  # fine-tune-like change of the last conv block
        module.features[5].weight.add_(0.01)
    b2 = Member(
        module, b.labels, name="b2", preprocessing=b.preprocessing, architecture=b.architecture
    )
    model = CombinedModel([a, b2])
    assert len(model.plan) == 1
    cut = model.plan[0].cut
    assert cut is not None and not isinstance(model.necks["b2"], nn.Identity)
    x = digits2.test[0][:16]
    with torch.no_grad():
        out = model.run_members(x)
    torch.testing.assert_close(out.logits[0], _by_hand(a, x))
    torch.testing.assert_close(out.logits[1], _by_hand(b2, x))


def test_members_that_share_nothing_run_side_by_side(digits2):
    a, b = digits2.members
    torch.manual_seed(3)
    other = SmallCNN(num_classes=5, in_channels=1, width=16, blocks=2).eval()
    b2 = Member(
        other, b.labels, name="other", preprocessing=b.preprocessing, architecture=b.architecture
    )
    model = CombinedModel([a, b2])
    assert len(model.plan) == 2
    x = digits2.test[0][:16]
    with torch.no_grad():
        out = model.run_members(x)
    torch.testing.assert_close(out.logits[1], _by_hand(b2, x))


@pytest.mark.parametrize("method", netmeld.list_methods())
def test_save_load_round_trip_gives_identical_outputs(digits2, method, tmp_path):
    from netmeld.demo import method_inputs

    model = netmeld.meld(digits2.members, method, **method_inputs(digits2, method))
    model.save(tmp_path / "m")
    loaded = netmeld.load(tmp_path / "m")
    x = digits2.test[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.labels == model.labels
    assert loaded.label_members == model.label_members
    assert loaded.method["name"] == method
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == [".netmeld-output", "model.safetensors", "netmeld.json"]
    for original, back in zip(model.members, loaded.members, strict=True):  # their own bodies
        head = loaded.head_names[back.name] + "."
        body = {k: v for k, v in original.module.state_dict().items() if not k.startswith(head)}
        mine = {k: v for k, v in back.module.state_dict().items() if not k.startswith(head)}
        assert state_equal(body, mine), back.name


def test_saved_trunk_is_stored_once(digits3, tmp_path):
    from safetensors import safe_open

    model = netmeld.meld(digits3.members, "concat")
    model.save(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    conv = [k for k in keys if k.endswith("features.0.weight")]
    assert len(conv) == 1, conv


def test_save_refuses_overwrite_and_is_atomic(digits2, tmp_path, monkeypatch):
    model = netmeld.meld(digits2.members, "concat")
    out = tmp_path / "m"
    model.save(out)
    with pytest.raises(netmeld.ModelFileError, match="exists"):
        model.save(out)
    before = (out / "model.safetensors").read_bytes()

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save(out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "new")
    assert (out / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(digits2, tmp_path):
    model = netmeld.meld(digits2.members, "concat")
    (tmp_path / "photos").mkdir()
    with pytest.raises(netmeld.ModelFileError, match="not a folder netmeld wrote"):
        model.save(tmp_path / "photos", overwrite=True)


def test_a_label_known_to_two_members_is_one_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pre = Preprocessing((4,))
    a = Member(net, ["cat", "dog"], name="a", preprocessing=pre)
    twin = Member(copy.deepcopy(net), ["cat", "dog"], name="twin", preprocessing=pre)
    model = CombinedModel([a, twin])
    assert model.labels == ["cat", "dog"]
    assert model.label_members == {"cat": ["a", "twin"], "dog": ["a", "twin"]}
    x = torch.randn(16, 4)
    with torch.no_grad():  # logsumexp over identical members: same probabilities as one
        torch.testing.assert_close(model(x).softmax(1), net(x).softmax(1))
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    b = Member(other, ["dog", "bird"], name="b", preprocessing=pre)
    model = CombinedModel([a, b])
    assert model.labels == ["cat", "dog", "bird"]
    with torch.no_grad():
        za, zb = net(x), other(x)
        want = torch.stack([za[:, 0], torch.logaddexp(za[:, 1], zb[:, 0]), zb[:, 1]], dim=1)
        torch.testing.assert_close(model(x), want)


def test_resized_inputs_for_members_of_other_sizes():
    torch.manual_seed(0)
    small = Member(
        SmallCNN(3, 1, 8, 2).eval(),
        ["a", "b", "c"],
        name="small",
        preprocessing=Preprocessing((1, 8, 8)),
    )
    big = Member(
        SmallCNN(2, 3, 8, 2).eval(),
        ["d", "e"],
        name="big",
        preprocessing=Preprocessing((3, 16, 16), mean=(0.5,), std=(0.25,)),
    )
    with pytest.raises(netmeld.IncompatibleMembersError, match=r"\(3, 16, 16\)"):
        CombinedModel([small, big])
    model = CombinedModel([small, big], input_shape=(1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        up = nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear")
        torch.testing.assert_close(model.run_members(x).logits[1], big.module((up - 0.5) / 0.25))


def test_predict_returns_label_names(digits2):
    model = netmeld.meld(digits2.members, "weight-norm")
    preds = model.predict(digits2.test[0][:20])
    assert all(p in model.labels for p in preds) and len(preds) == 20
    probs = model.predict_proba(digits2.test[0][:20])
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_untraceable_member_runs_whole_and_round_trips(tmp_path):
    from netmeld.members.graph import trace_member

    model_a = _Branchy().eval()
    a = Member(
        model_a,
        ["x", "y"],
        name="a",
        preprocessing=Preprocessing((4,)),
        architecture="tests.test_combined:_Branchy",
    )
    assert not trace_member(a).traced
    b_module = _Branchy().eval()
    b = Member(
        b_module,
        ["z", "w"],
        name="b",
        preprocessing=Preprocessing((4,)),
        architecture="tests.test_combined:_Branchy",
    )
    combined = CombinedModel([a, b])
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(combined(x), torch.cat([model_a(x), b_module(x)], 1))
    for _ in range(3):  # however many models are built on it, the user's module keeps no hook
        CombinedModel([a, b])(x)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model_a.modules())
    combined.save(tmp_path / "m")
    with torch.no_grad():
        # the builder is this test module's own: loading it is a choice to trust that code
        loaded = netmeld.load(tmp_path / "m", trust_code=True)
        torch.testing.assert_close(loaded(x), combined(x))


def test_meld_warns_once_naming_a_member_whose_trunk_cannot_be_shared(digits2):
    branchy = Member(
        _Branchy().eval(), ["x", "y"], name="branchy", preprocessing=Preprocessing((4,))
    )
    other = Member(_Branchy().eval(), ["z", "w"], name="other", preprocessing=Preprocessing((4,)))
    with pytest.warns(UserWarning, match="torch.fx cannot trace") as caught:
        netmeld.meld([branchy, other], "concat")
    messages = [str(w.message) for w in caught if "torch.fx" in str(w.message)]
    assert len(messages) == 2  # once per member, each named
    assert messages[0].startswith("member 'branchy'") and messages[1].startswith("member 'other'")
    assert all("not shared" in m for m in messages)


def test_the_union_head_refuses_a_fitted_value_of_the_wrong_shape_or_not_finite(digits2):
    model = CombinedModel(digits2.members)
    with pytest.raises(netmeld.MethodError, match=r"scale: a fitted value of shape \(3,\)"):
        model.union.set_calibration(scale=torch.ones(3))
    with pytest.raises(netmeld.MethodError, match="offset: the fitted value is not finite"):
        model.union.set_calibration(offset=torch.tensor([0.0, float("nan")]))
    with pytest.raises(netmeld.MethodError, match="no router"):
        model.union.set_router(mean=torch.zeros(4))
    assert torch.equal(model.union.offset, torch.zeros(2))  # nothing half-set


def test_labels_are_derived_from_the_members_and_follow_combiner_and_extension(digits2):
    from netmeld.model.heads import Extension

    model = CombinedModel(digits2.members)
    union = [label for m in digits2.members for label in m.labels]
    union = list(dict.fromkeys(union))
    assert model.labels == model.union_labels == union
    model.set_extension(Extension(3, ["alien"]))
    assert model.labels == [*union, "alien"] and model.label_members["alien"] == []
    model.set_extension(None)
    assert model.labels == union
    assert all(model.label_members[label] for label in union)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.sum() > 0:
            h = h.relu()
        return self.fc(h)


def test_load_of_a_non_model_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(netmeld.ModelFileError, match="not a netmeld model folder"):
        netmeld.load(tmp_path)
