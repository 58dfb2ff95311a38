"""Seeds make runs reproducible: the same inputs and seed give byte-identical saved files on one
device, whatever the global generator's state before the call, and the call leaves the
caller's global generator as it was; another seed gives other weights where the method draws
anything at random. Also ``netmeld distill`` and ``netmeld train`` recipes run twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import netmeld
from netmeld.methods import fusion
from netmeld.zoo import small_cnn

SHAPE = (1, 8, 8)
KWARGS = {"in_channels": 1, "width": 4, "blocks": 2}
ARCH = netmeld.Architecture("netmeld.zoo:small_cnn", KWARGS)
LABELS = [["a", "b", "c"], ["d", "e"]]
ALL = [label for group in LABELS for label in group]


def _member(name: str, labels: list[str], init: int) -> netmeld.Member:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init)
        module = small_cnn(num_classes=len(labels), **KWARGS)
    return netmeld.Member(
        module.eval(),
        labels,
        name=name,
        preprocessing={"input_shape": SHAPE, "mean": (0.5,), "std": (0.25,)},
        architecture=ARCH,
    )


@pytest.fixture(scope="module")
def members() -> list[netmeld.Member]:
    return [_member("m1", LABELS[0], 1), _member("m2", LABELS[1], 2)]


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(240, *SHAPE, generator=g)
    y = [ALL[int(i)] for i in torch.randint(len(ALL), (240,), generator=g)]
    return x, y


def _files(model: netmeld.CombinedModel, path: Path) -> tuple[bytes, bytes]:
    model.save(path)
    return (path / "model.safetensors").read_bytes(), (path / "netmeld.json").read_bytes()


def _reproducible(
    tmp_path: Path, make: Callable[[int], netmeld.CombinedModel], *, random: bool = True
) -> None:
    """``make(0)`` after two different global states: the same files, the caller's generator
    untouched; ``make(1)``: other weights where the method is random."""
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)
        before = torch.random.get_rng_state()
        model = make(0)
        assert torch.equal(torch.random.get_rng_state(), before), "the global generator moved"
        runs.append(_files(model, tmp_path / f"run{state}"))
    assert runs[0][0] == runs[1][0], "model.safetensors differs between two runs of one seed"
    assert runs[0][1] == runs[1][1], "netmeld.json differs between two runs of one seed"
    if random:
        other = _files(make(1), tmp_path / "seed1")
        assert other[0] != runs[0][0], "another seed gave the same weights"


def test_distill(tmp_path, members, data):
    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.distill(
            members, data[0][:64], epochs=1, batch_size=32, seed=seed, progress=False
        )

    _reproducible(tmp_path, make)


@pytest.mark.parametrize("init", ["scratch", "merge"])
def test_distill_fresh_and_merged_students_and_hints(tmp_path, data, init):
    same = [_member("m1", LABELS[0], 1), _member("m2", ["d", "e", "f"], 2)]

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.distill(
            same,
            data[0][:64],
            init=init,
            hint_weight=0.5,
            epochs=1,
            batch_size=32,
            seed=seed,
            progress=False,
        )

    _reproducible(tmp_path, make)


_BUILD: dict[str, Callable[[int], netmeld.CombinedModel]] = {
    "parallel": lambda seed: fusion.parallel(
        {"a": ARCH, "b": ARCH}, ALL, fuse="attention", input_shape=SHAPE, seed=seed
    ),
    "hierarchical": lambda seed: fusion.hierarchical(
        ARCH,
        netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 6, "hidden": 8}),
        ALL,
        input_shape=SHAPE,
        second_input_shape=(6,),
        seed=seed,
    ),
    "multitask": lambda seed: fusion.multitask(
        ARCH, {"t": ALL}, input_shape=SHAPE, seed=seed, weighting="uncertainty"
    ),
}


@pytest.mark.parametrize("kind", fusion.FUSION_KINDS)
def test_train_each_fusion_kind(tmp_path, data, kind):
    assert set(_BUILD) == set(fusion.FUSION_KINDS)
    x, y = data
    labels = [f"t/{v}" for v in y] if kind == "multitask" else y

    def make(seed: int) -> netmeld.CombinedModel:
        model = _BUILD[kind](seed)
        return netmeld.train(
            model, (x[:96], labels[:96]), epochs=1, batch_size=32, seed=seed, progress=False
        )

    _reproducible(tmp_path, make)


def test_fusion_builders_default_to_seed_0(members):
    torch.manual_seed(1)
    a = fusion.parallel({"a": ARCH, "m1": members[0]}, ALL, fuse="gating")
    torch.manual_seed(2)
    b = fusion.parallel({"a": ARCH, "m1": members[0]}, ALL, fuse="gating")
    sa, sb = a.members[0].module.state_dict(), b.members[0].module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("method", "params", "labeled"),
    [
        ("infomax", {"steps": 10}, False),
        ("router", {"steps": 10}, True),
        ("stack", {"meta": "mlp", "hidden": 8, "l2": 0.01, "steps": 20}, True),
    ],
)
def test_meld(tmp_path, members, data, method, params, labeled):
    x, y = data
    fit_on = (x, y) if labeled else x

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.meld(members, method, fit_on, params=params, seed=seed, progress=False)

    _reproducible(tmp_path, make, random=method == "stack")


@pytest.mark.parametrize("params", [{"unfreeze": 1, "batch_size": 16}, {"fusion": "attention"}])
def test_transfer(tmp_path, members, data, params):
    x, y = data[0][:64], data[1][:64]

    def make(seed: int) -> netmeld.CombinedModel:
        params_ = {"steps": 5, "dim": 8, **params}
        return netmeld.meld(members, "transfer", (x, y), params=params_, seed=seed, progress=False)

    _reproducible(tmp_path, make)


def test_merge_members_with_an_alignment(tmp_path, data):
    same = [_member("m1", LABELS[0], 1), _member("m2", LABELS[1], 2)]

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.merge_members(
            same, "linear", data=data[0][:64], align="weight", seed=seed, progress=False
        )

    _reproducible(tmp_path, make, random=False)  # weight matching may find one optimum


def test_merge_members_dare_follows_the_seed(tmp_path, data):
    base = _member("base", LABELS[0], 1)
    tuned = []
    for i, labels in enumerate(LABELS):
        m = _member(f"m{i}", labels, 1)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for k, p in m.module.named_parameters():
                if not k.startswith("fc."):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        tuned.append(m)

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.merge_members(
            tuned, "dare", base=base, data=data[0][:64], align="none", seed=seed, progress=False
        )

    _reproducible(tmp_path, make)


def test_zip_members(tmp_path, data):
    same = [_member("m1", LABELS[0], 1), _member("m2", LABELS[1], 2)]

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.zip_members(same, data[0][:64], seed=seed, progress=False)

    _reproducible(tmp_path, make, random=False)  # ZipIt! draws nothing at random


def test_extend(tmp_path, members, data):
    model = netmeld.meld(members, "concat")
    g = torch.Generator().manual_seed(3)
    new = torch.rand(6, *SHAPE, generator=g)

    def make(seed: int) -> netmeld.CombinedModel:
        return netmeld.extend(
            model, new, ["z"] * 6, unlabeled=data[0][:200], steps=5, seed=seed, progress=False
        )

    _reproducible(tmp_path, make)


# -- the CLI ----------------------------------------------------------------------------------


def _images(folder: Path, x: torch.Tensor, labels: list[str] | None = None) -> None:
    for i, img in enumerate(x):
        sub = folder / labels[i] if labels is not None else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, members, data) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    specs = []
    for m in members:
        save_file(m.module.state_dict(), str(root / f"{m.name}.safetensors"))
        specs.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": ARCH.spec,
                "architecture_kwargs": KWARGS,
                "labels": list(m.labels),
                "preprocessing": {"input_shape": list(SHAPE), "mean": [0.5], "std": [0.25]},
            }
        )
    x, y = data
    _images(root / "unlabeled", x[:64])
    _images(root / "labeled", x[:64], y[:64])
    schedule = {"epochs": 2, "batch_size": 16}
    distill = {"teachers": specs, "union": "concat", "data": "unlabeled", "schedule": schedule}
    (root / "distill.yaml").write_text(yaml.safe_dump(distill))
    train = {
        "build": "parallel",
        "branches": [
            {"name": "m1", "member": specs[0]},
            {"name": "fresh", "architecture": ARCH.spec, "architecture_kwargs": KWARGS},
        ],
        "labels": ALL,
        "fuse": "gating",
        "data": "labeled",
        "schedule": schedule,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    return root


@pytest.mark.parametrize("command", ["distill", "train"])
def test_cli_recipe_twice_gives_the_same_bytes(workspace, tmp_path, command):
    from netmeld.cli import main

    files = []
    for state in (1, 2):
        torch.manual_seed(state)
        out = tmp_path / f"run{state}"
        assert main([command, str(workspace / f"{command}.yaml"), "-o", str(out)]) == 0
        files.append([(out / name).read_bytes() for name in ("model.safetensors", "netmeld.json")])
    assert files[0] == files[1]


def test_cli_recipe_seed_sets_the_fresh_weights(workspace, tmp_path):
    """A distill recipe's own student and a train recipe's fresh branch start from the
    recipe's seed: the same seed gives the same bytes, another seed other weights."""
    from netmeld.cli import main

    distill = yaml.safe_load((workspace / "distill.yaml").read_text())
    distill["student"] = {"architecture": ARCH.spec, "architecture_kwargs": KWARGS}
    train = yaml.safe_load((workspace / "train.yaml").read_text())
    for command, recipe in (("distill", distill), ("train", train)):
        weights = []
        for i, seed in enumerate((0, 0, 1)):
            torch.manual_seed(i)
            path = workspace / f"{command}-seed{seed}.yaml"
            path.write_text(yaml.safe_dump({**recipe, "seed": seed}))
            out = tmp_path / f"{command}{i}"
            assert main([command, str(path), "-o", str(out)]) == 0
            weights.append((out / "model.safetensors").read_bytes())
        assert weights[0] == weights[1], command
        assert weights[0] != weights[2], command


@pytest.mark.filterwarnings("ignore:extend:UserWarning")
def test_meld_extend_and_load_leave_every_generator_alone(tmp_path, members, data, monkeypatch):
    """A seeded fit must not re-seed the caller's GPU generators (``torch.manual_seed`` does),
    and loading a folder builds its architectures without drawing from the global generator."""
    gpu_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", gpu_seeds.append)
    model = netmeld.meld(members, "finetune", data, params={"steps": 3})
    extended = netmeld.extend(model, data[0][:10], ["new"] * 10, steps=3)
    assert gpu_seeds == [], "a CPU fit re-seeded the GPU generators"
    extended.save(tmp_path / "m")
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    loaded = netmeld.load(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), before), "loading drew from the generator"
    assert torch.equal(loaded.predict_proba(data[0][:4]), extended.predict_proba(data[0][:4]))
