"""Head and shared-trunk discovery on torchvision and timm models."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from netmeld import CombinedModel, Member, MemberError, Preprocessing
from netmeld.members.graph import find_head, plan_groups, share_summary, trace_member

PRE = Preprocessing((3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _transfer_pair(builder, head_attr: str, seed: int = 0):
    """Two members transfer-learned from one base: same body, new heads of 2 and 3 classes."""
    torch.manual_seed(seed)
    base = builder().eval()
    pets, people = copy.deepcopy(base), copy.deepcopy(base)
    for module, k in ((pets, 2), (people, 3)):
        parent, _, leaf = head_attr.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        old = getattr(owner, leaf)
        setattr(owner, leaf, nn.Linear(old.in_features, k))
    return (
        Member(pets, ["cat", "dog"], name="pets", preprocessing=PRE),
        Member(people, ["man", "woman", "child"], name="people", preprocessing=PRE),
    )


@pytest.mark.parametrize(
    ("builder", "head"),
    [
        (lambda: torchvision.models.resnet18(num_classes=10), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), "classifier.3"),
    ],
    ids=["resnet18", "mobilenet_v3_small"],
)
def test_shared_trunk_found_for_torchvision_models_with_replaced_heads(builder, head):
    pets, people = _transfer_pair(builder, head)
    assert find_head(pets) == head
    model = CombinedModel([pets, people])
    assert len(model.plan) == 1
    assert all(isinstance(model.necks[n], nn.Identity) for n in ("pets", "people"))
    assert pets.architecture is not None and pets.architecture.spec.startswith("torchvision:")
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.cat([pets.module((x - mean) / std), people.module((x - mean) / std)], 1)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_fine_tuned_last_block_diverges_there():
    pets, people = _transfer_pair(lambda: torchvision.models.resnet18(num_classes=10), "fc")
    with torch.no_grad():
        people.module.layer4[1].conv2.weight.mul_(1.01)
    traced = [trace_member(pets), trace_member(people)]
    plan = plan_groups(traced)
    rows = share_summary(traced, plan)
    assert len(plan) == 1
    diverge = {r["member"]: r["diverges_at"] for r in rows}
    assert diverge["people"].startswith("layer4.1"), diverge
    model = CombinedModel([pets, people])
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.run_members(x)
        torch.testing.assert_close(
            out.logits[1], people.module((x - mean) / std), rtol=1e-4, atol=1e-5
        )
    shared = rows[0]["trunk_parameters"]
    layer4_1 = sum(p.numel() for p in people.module.layer4[1].parameters())
    body = sum(p.numel() for n, p in people.module.named_parameters() if not n.startswith("fc"))
    assert shared <= body - layer4_1


def test_members_with_different_weights_share_nothing():
    torch.manual_seed(0)
    a = Member(
        torchvision.models.resnet18(num_classes=2).eval(), ["a", "b"], name="a", preprocessing=PRE
    )
    b = Member(
        torchvision.models.resnet18(num_classes=2).eval(), ["c", "d"], name="b", preprocessing=PRE
    )
    traced = [trace_member(a), trace_member(b)]
    assert len(plan_groups(traced)) == 2


def test_timm_head_and_architecture():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    member = Member.from_timm(model, ["a", "b", "c", "d"])
    assert find_head(member) == "fc"
    assert member.architecture is not None and member.architecture.spec == "timm:resnet18"
    assert member.preprocessing.input_shape == (3, 224, 224)


def test_last_linear_in_execution_order_is_the_head():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(8, 3)  # defined first, runs last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.out(self.body(x).relu())

    m = Member(Odd(), ["a", "b", "c"], name="odd", preprocessing=Preprocessing((4,)))
    assert find_head(m) == "out"


def test_head_with_wrong_number_of_outputs_names_both_counts():
    m = Member(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        ["a", "b"],
        name="m",
        preprocessing=Preprocessing((4,)),
    )
    with pytest.raises(MemberError, match=r"3 outputs.*2 labels"):
        find_head(m)


def test_softmax_after_head_is_refused():
    m = Member(
        nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=1)),
        ["a", "b"],
        name="soft",
        preprocessing=Preprocessing((4,)),
    )
    with pytest.raises(MemberError, match="logits"):
        trace_member(m)


@pytest.mark.parametrize("method", ["infomax", "router"])
def test_gated_methods_on_partly_shared_torchvision_members_round_trip(method, tmp_path):
    """Two members share all but the last block, a third shares nothing and knows 'dog' too."""
    import netmeld

    pets, people = _transfer_pair(lambda: torchvision.models.resnet18(num_classes=10), "fc")
    with torch.no_grad():
        people.module.layer4[1].conv2.weight.mul_(1.01)
    torch.manual_seed(5)
    birds = Member(
        torchvision.models.resnet18(num_classes=2).eval(),
        ["dog", "bird"],
        name="birds",
        preprocessing=PRE,
    )
    x = torch.rand(24, 3, 32, 32)
    labels = ["cat", "dog", "man", "woman", "child", "bird"] * 4
    data = x if method == "infomax" else (x, labels)
    model = netmeld.meld([pets, people, birds], method, data)
    assert model.labels == ["cat", "dog", "man", "woman", "child", "bird"]
    assert [g.members for g in model.plan] == [("pets", "people"), ("birds",)]
    assert model.router_columns() == {
        "pets": (0, 512),
        "people": (512, 1024),
        "birds": (1024, 1536),
    }
    model.save(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(netmeld.load(tmp_path / "m")(x[:4]), model(x[:4]))
