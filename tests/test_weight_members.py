"""Members merged in weight space (common base, permutation alignment, ZipIt!) on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netmeld
from netmeld import Architecture, Member, Preprocessing, evaluate
from netmeld.demo.scenarios import load_digits_images, train_classifier
from netmeld.errors import IncompatibleMembersError, MethodError
from netmeld.methods.merge import count_macs
from netmeld.methods.permutation import align, interpolate
from netmeld.ops.merge import KERNELS
from netmeld.zoo import mlp

NAMES = [str(d) for d in range(10)]
A, B = list(range(5)), list(range(5, 10))


class Digits:
    def __init__(self) -> None:
        x, y = load_digits_images()
        self.x = x.reshape(len(x), 64)
        self.y = y
        order = np.random.default_rng(0).permutation(len(x))
        self.train, self.test_idx = order[:1200], order[1200:]
        self.test = (self.x[self.test_idx], [NAMES[v] for v in y[self.test_idx]])

    def fit(self, classes, seed, *, init=None, epochs=20, hidden=64):
        torch.manual_seed(seed)
        model = mlp(64, len(classes), hidden=hidden, depth=2)
        if init is not None:
            body = {k: v for k, v in init.state_dict().items() if not k.startswith("fc.")}
            model.load_state_dict(body, strict=False)
        idx = self.train[np.isin(self.y[self.train], classes)]
        remap = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([remap[v] for v in self.y[idx]])
        train_classifier(model, self.x[idx], targets, epochs=epochs, seed=seed)
        return model.eval()

    def member(self, model, classes, name, hidden=64):
        arch = Architecture(
            "netmeld.zoo:mlp",
            {"in_features": 64, "num_classes": len(classes), "hidden": hidden, "depth": 2},
        )
        return Member(
            model,
            [NAMES[c] for c in classes],
            name=name,
            preprocessing=Preprocessing((64,)),
            architecture=arch,
        )


def _best_alone(digits, *members) -> float:
    """The most a member alone can score on the union: the share of test labels it knows."""
    return max(np.mean([label in m.labels for label in digits.test[1]]) for m in members)


@pytest.fixture(scope="module")
def digits():
    return Digits()


@pytest.fixture(scope="module")
def finetuned(digits):
    base = digits.fit(list(range(10)), 0, epochs=3)
    a = digits.member(digits.fit(A, 1, init=base), A, "a")
    b = digits.member(digits.fit(B, 2, init=base), B, "b")
    return base, a, b


@pytest.fixture(scope="module")
def independent(digits):
    return (digits.member(digits.fit(A, 11), A, "a"), digits.member(digits.fit(B, 12), B, "b"))


def test_identical_bodies_merge_to_themselves(digits, finetuned):
    _, a, _ = finetuned
    b_head = torch.nn.Linear(64, 5)
    torch.nn.init.normal_(b_head.weight)
    twin = a.module.__class__(64, 5)
    twin.load_state_dict(a.module.state_dict())
    twin.fc = b_head
    b = digits.member(twin.eval(), B, "b")
    merged = netmeld.merge_members([a, b], "linear")
    assert merged.method["merge"]["merged_tensors"] == 0
    by_hand = netmeld.meld([a, b], "concat")
    x = digits.test[0]
    torch.testing.assert_close(merged(x), by_hand(x))


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_merged_body_serves_both_tasks(digits, finetuned, method):
    base, a, b = finetuned
    kwargs = {}
    if KERNELS[method].needs_base:
        kwargs["base"] = base
    if KERNELS[method].needs != "none":
        kwargs["data"] = digits.x[digits.train[:300]]
    merged = netmeld.merge_members([a, b], method, **kwargs)
    alone = _best_alone(digits, a, b)
    acc = evaluate(merged, digits.test).union_accuracy
    assert alone < 0.55 < acc  # a member alone knows half the labels
    # one body: the merged model runs half the multiply-accumulates of the two members
    assert count_macs(merged, digits.x[:1]) < 0.6 * count_macs(
        netmeld.meld([a, b], "concat"), digits.x[:1]
    )


def test_alignment_lowers_the_interpolation_barrier(digits):
    m1 = digits.fit(list(range(10)), 21, hidden=128)
    m2 = digits.fit(list(range(10)), 22, hidden=128)
    x, y = digits.x[digits.test_idx], torch.tensor(digits.y[digits.test_idx])

    def acc(m):
        with torch.no_grad():
            return (m(x).argmax(1) == y).float().mean().item()

    naive = acc(interpolate(m1, m2, 0.5))
    aligned = align(m1, m2, method="weight", example=x[:2]).model
    assert acc(aligned) == acc(m2)  # the same function
    assert acc(interpolate(m1, aligned, 0.5)) > naive + 0.05


def test_zip_full_and_partial(digits, independent, tmp_path):
    a, b = independent
    data = digits.x[digits.train[:500]]
    full = netmeld.zip_members([a, b], data)
    partial = netmeld.zip_members([a, b], data, layers=1)
    assert full.method["merge"]["valid_layers"] == [1, 2]
    concat = netmeld.meld([a, b], "concat")
    alone = _best_alone(digits, a, b)
    assert evaluate(full, digits.test).union_accuracy > alone + 0.25
    macs = [count_macs(m, digits.x[:1]) for m in (full, partial, concat)]
    assert macs[0] < macs[1] < macs[2]  # partial zipping keeps more layers per member
    full.save(tmp_path / "zipped")
    again = netmeld.load(tmp_path / "zipped")
    torch.testing.assert_close(again(digits.test[0]), full(digits.test[0]))


def test_errors(digits, finetuned, independent):
    _, a, b = finetuned
    with pytest.raises(MethodError, match="needs the common base"):
        netmeld.merge_members([a, b], "ties", align="none")
    with pytest.raises(MethodError, match=r"valid depths: \[1, 2\]"):
        netmeld.zip_members(list(independent), digits.x[:100], layers=3)
    wide = digits.member(digits.fit(B, 3, hidden=32), B, "wide", hidden=32)
    with pytest.raises(
        IncompatibleMembersError,
        match=r"tensor 'features.0.weight' has shape \(64, 64\) in member 'a' and \(32, 64\) in "
        r"member 'wide'",
    ):
        netmeld.merge_members([a, wide], "linear")


def test_recipe_merges_bodies_like_the_python_api(digits, finetuned, tmp_path):
    import yaml
    from safetensors.torch import save_file

    from netmeld.cli.recipes import read_recipe, run_recipe
    from netmeld.errors import RecipeError

    base, a, b = finetuned
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    members = []
    for m, classes in ((a, A), (b, B)):
        save_file(m.module.state_dict(), str(tmp_path / f"{m.name}.safetensors"))
        members.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": "netmeld.zoo:mlp",
                "architecture_kwargs": {"in_features": 64, "num_classes": 5, "hidden": 64},
                "labels": [NAMES[c] for c in classes],
                "preprocessing": {"input_shape": [64]},
            }
        )
    recipe = {
        "members": members,
        "method": "concat",
        "merge": {
            "method": "ties",
            "base": "base.safetensors",
            "params": {"density": 0.5},
            "align": "none",
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from_recipe = run_recipe(path)
    by_api = netmeld.merge_members([a, b], "ties", base=base, params={"density": 0.5}, align="none")
    x = digits.test[0]
    torch.testing.assert_close(from_recipe(x), by_api(x))
    assert from_recipe.method["merge"]["method"] == "ties"
    recipe["merge"] = {"method": "soup"}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"unknown merge method 'soup'; valid .*, or zipit"):
        read_recipe(path)
    recipe["merge"] = {"method": "zipit"}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"needs data"):
        read_recipe(path)
