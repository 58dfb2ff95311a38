"""Fusion builders: parallel, hierarchical and multi-task networks; freezing; training; saving."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import netmeld
from netmeld.demo.scenarios import load_digits_images
from netmeld.errors import IncompatibleMembersError, LabelError, MemberError
from netmeld.methods import fusion
from netmeld.methods.fusion import training as fusion_training
from netmeld.zoo import small_cnn

from ._ddp import two_process_run

FRESH = netmeld.Architecture("netmeld.zoo:small_cnn", {"in_channels": 1, "width": 8, "blocks": 2})


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_images()
    labels = [str(int(v)) for v in y]
    return (x[:1200], labels[:1200]), (x[1200:], labels[1200:])


def _accuracy(model: netmeld.CombinedModel, data) -> float:
    x, labels = data
    return sum(p == t for p, t in zip(model.predict(x), labels, strict=True)) / len(labels)


def _state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("fuse", fusion.FUSIONS)
def test_parallel_fuses_the_members_union_and_keeps_frozen_parts(digits2, digits, fuse, tmp_path):
    a, b = digits2.members
    model = fusion.parallel([a, b], fuse=fuse, freeze=[a.name])
    assert model.labels == list(a.labels) + list(b.labels)
    x = digits[1][0][:5]
    assert model(x).shape == (5, 10)
    net = model.members[0].module
    frozen, trained = _state(net, f"branches.{a.name}"), _state(net, f"branches.{b.name}")
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics are checked too
    out = netmeld.train(model, digits[0], epochs=8, lr=1e-2, progress=False)
    after = out.members[0].module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, after[k]) for k, v in trained.items())
    # each branch's member alone knows half the digits (at most ~50 %)
    assert _accuracy(out, digits[1]) > 0.75
    assert out.method["name"] == "parallel" and out.method["params"]["fuse"] == fuse
    out.save(tmp_path / "m")
    again = netmeld.load(tmp_path / "m")
    assert torch.equal(again(x), out(x))


def test_fit_leaves_the_model_given_unchanged(digits2, digits):
    model = fusion.parallel(digits2.members)
    before = _state(model.members[0].module, "")
    netmeld.train(model, digits[0], epochs=1, progress=False)
    after = model.members[0].module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_parallel_branches_read_their_own_inputs():
    torch.manual_seed(0)
    model = fusion.parallel(
        {"a": FRESH, "b": FRESH},
        ["x", "y"],
        inputs={"a": [0], "b": [1]},
        input_shape=(2, 8, 8),
    )
    net = model.members[0].module
    x = torch.rand(4, 2, 8, 8)
    changed = x.clone()
    changed[:, 1] = torch.rand(4, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.branches["a"](x), net.branches["a"](changed))
        assert not torch.allclose(net.branches["b"](x), net.branches["b"](changed))
    with pytest.raises(IncompatibleMembersError, match="unknown branches"):
        fusion.parallel({"a": FRESH}, ["x"], inputs={"c": [0]}, input_shape=(1, 8, 8))


def test_table_members_read_their_own_columns():
    torch.manual_seed(0)
    mlp = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 2})

    def member(name: str, columns):
        return netmeld.Member(
            mlp.build(num_classes=2),
            ["no", "yes"],
            name=name,
            preprocessing={"input_shape": (2,), "columns": columns},
            architecture=mlp,
        )

    model = fusion.parallel([member("a", [0, 1]), member("b", [2, 3])], input_shape=(4,))
    x = torch.rand(5, 4)
    changed = x.clone()
    changed[:, 2:] = torch.rand(5, 2)
    branches = model.members[0].module.branches
    with torch.no_grad():
        assert torch.equal(branches["a"](x), branches["a"](changed))
        assert not torch.equal(branches["b"](x), branches["b"](changed))
    with pytest.raises(IncompatibleMembersError, match="by name"):
        fusion.parallel([member("a", ["age", "income"])], input_shape=(4,))


def test_freeze_names_a_block_or_says_what_exists(digits2):
    a, b = digits2.members
    model = fusion.parallel([a, b], freeze=[f"{a.name}.features.0"])
    net = model.members[0].module
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(f"branches.{a.name}.body.features.0") for n in frozen)
    with pytest.raises(MemberError, match="parts"):
        fusion.parallel([a, b], freeze=["nope"])


def test_hierarchical_adapts_mismatched_shapes_and_reports_it(digits, tmp_path):
    torch.manual_seed(0)
    first = netmeld.Member(
        small_cnn(num_classes=10, in_channels=1, width=8, blocks=2),
        [str(i) for i in range(10)],
        name="first",
        preprocessing={"input_shape": (1, 8, 8)},
        architecture=FRESH,
    )
    labels = [str(i) for i in range(10)]
    second = netmeld.Architecture(
        "netmeld.zoo:small_cnn", {"in_channels": 3, "width": 8, "blocks": 2}
    )
    model = fusion.hierarchical(
        first, second, labels, cut="features.3", second_input_shape=(3, 6, 6), freeze=["first"]
    )
    params = model.method["params"]
    assert params["first_features"] == [8, 4, 4] and params["second_input"] == [3, 6, 6]
    assert params["adapters"] == ["1x1 conv 8 -> 3 channels", "bilinear resize 4x4 -> 6x6"]
    x = digits[1][0][:4]
    assert model(x).shape == (4, 10)
    frozen = _state(model.members[0].module, "first.")
    out = netmeld.train(model, digits[0], epochs=2, lr=3e-3, progress=False)
    after = out.members[0].module.state_dict()
    assert frozen and all(torch.equal(v, after[k]) for k, v in frozen.items())
    out.save(tmp_path / "h")
    assert torch.equal(netmeld.load(tmp_path / "h")(x), out(x))
    with pytest.raises(IncompatibleMembersError, match=r"\(8, 4, 4\).*\(3, 6, 6\)"):
        fusion.hierarchical(
            first, second, labels, cut="features.3", second_input_shape=(3, 6, 6), adapt="none"
        )
    with pytest.raises(IncompatibleMembersError, match=r"\(16,\).*\(3, 6, 6\)"):
        fusion.hierarchical(first, second, labels, second_input_shape=(3, 6, 6))
    with pytest.raises(MemberError, match="no submodule 'nope'"):
        fusion.hierarchical(first, second, labels, cut="nope", second_input_shape=(3, 6, 6))


def test_hierarchical_vectors_get_a_linear_projection():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12))
    second = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(20, 3))
    model = fusion.hierarchical(
        first, second, ["a", "b", "c"], input_shape=(1, 8, 8), second_input_shape=(20,)
    )
    assert model.method["params"]["adapters"] == ["linear projection 12 -> 20 features"]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(MemberError, match="used whole"):
        fusion.hierarchical(first, second, ["a", "b", "c"], cut="1", input_shape=(1, 8, 8))


def _two_tasks(data):
    """Digits as two tasks on different examples: the digit, and whether it is >= 5."""
    x, labels = data
    tagged = [
        f"digit/{y}" if i % 2 == 0 else f"big/{'yes' if int(y) >= 5 else 'no'}"
        for i, y in enumerate(labels)
    ]
    return x, tagged


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_multitask_heads_label_map_and_weighting(digits, weighting, tmp_path):
    torch.manual_seed(0)
    tasks = {"digit": [str(i) for i in range(10)], "big": ["no", "yes"]}
    model = fusion.multitask(
        FRESH, tasks, weighting=weighting, input_shape=(1, 8, 8), loss_weights={"digit": 1.0}
    )
    assert model.labels[:2] == ["digit/0", "digit/1"] and model.labels[-2:] == ["big/no", "big/yes"]
    x = digits[1][0][:3]
    assert model(x).shape == (3, 12)
    assert fusion.task_slices(model) == {"digit": slice(0, 10), "big": slice(10, 12)}
    out = netmeld.train(model, _two_tasks(digits[0]), epochs=10, lr=1e-2, progress=False)
    acc = fusion.task_accuracy(out, _two_tasks(digits[1]))
    assert acc["digit"] > 0.5 and acc["big"] > 0.7, acc  # chance: 0.1 and 0.5
    learned = out.method["params"]["learned_weights"]
    if weighting == "fixed":
        assert learned == {"digit": 1.0, "big": 1.0}
    else:
        assert learned["digit"] != 1.0 and learned["big"] != 1.0
    out.save(tmp_path / "mt")
    assert torch.equal(netmeld.load(tmp_path / "mt")(x), out(x))


def test_multitask_errors():
    with pytest.raises(LabelError, match="unknown tasks"):
        fusion.multitask(FRESH, {"a": ["x"]}, loss_weights={"b": 1.0}, input_shape=(1, 8, 8))
    model = fusion.multitask(FRESH, {"a": ["x", "y"]}, input_shape=(1, 8, 8))
    with pytest.raises(LabelError, match="'task/label'"):
        netmeld.train(model, (torch.rand(2, 1, 8, 8), ["x", "a/y"]), epochs=1, progress=False)
    with pytest.raises(MemberError, match="weighting"):
        fusion.multitask(FRESH, {"a": ["x"]}, weighting="nope", input_shape=(1, 8, 8))


def test_fit_refuses_other_models_and_unknown_labels(digits2, digits):
    with pytest.raises(MemberError, match="method is 'concat'"):
        netmeld.train(netmeld.meld(digits2.members, "concat"), digits[0], progress=False)
    model = fusion.parallel({"a": FRESH}, ["0", "1"], input_shape=(1, 8, 8))
    with pytest.raises(LabelError, match="does not know"):
        netmeld.train(model, digits[0], epochs=1, progress=False)


def test_unsaveable_plain_modules_say_how_to_fix_it():
    model = fusion.parallel({"a": torch.nn.Flatten()}, ["x", "y"], input_shape=(1, 8, 8))
    with pytest.raises(netmeld.ModelFileError, match="architecture="):
        model.save("unused")


def test_netmeld_train_recipe_and_export(digits2, digits, tmp_path):
    from PIL import Image

    from netmeld.cli import main

    a = digits2.members[0]
    save_file(a.module.state_dict(), str(tmp_path / "a.safetensors"))
    x, labels = digits[0]
    for i, (img, label) in enumerate(zip(x[:300], labels[:300], strict=True)):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    recipe = {
        "build": "parallel",
        "branches": [
            {
                "name": "a",
                "member": {
                    "checkpoint": "a.safetensors",
                    "architecture": "netmeld.zoo:small_cnn",
                    "architecture_kwargs": {"in_channels": 1, "width": 16, "blocks": 2},
                    "labels": list(a.labels),
                    "preprocessing": {"input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4]},
                },
            },
            {"name": "fresh", "architecture": FRESH.spec, "architecture_kwargs": FRESH.kwargs},
        ],
        "labels": [str(i) for i in range(10)],
        "fuse": "gating",
        "freeze": ["a"],
        "data": "train",
        "schedule": {"epochs": 2, "batch_size": 32, "lr": 0.003},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "model"
    assert main(["train", str(tmp_path / "train.yaml"), "-o", str(out)]) == 0
    model = netmeld.load(out)
    assert model.method["name"] == "parallel" and model.labels == recipe["labels"]
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx")]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    probe = digits[1][0][:7]
    got = session.run(None, {"input": probe.numpy()})[0]
    assert abs(got - model(probe).detach().numpy()).max() <= 1e-4
    bad = dict(recipe, build="hierarchical")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["train", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "bad")]) != 0


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_a_killed_multitask_run_resumes_to_the_same_weights(
    digits, weighting, tmp_path, monkeypatch
):
    """The learned loss weights are checkpointed with the network."""
    from netmeld.engine import TrainConfig

    tasks = {"digit": [str(i) for i in range(10)], "big": ["no", "yes"]}
    torch.manual_seed(0)
    model = fusion.multitask(FRESH, tasks, weighting=weighting, input_shape=(1, 8, 8))
    data = _two_tasks((digits[0][0][:300], digits[0][1][:300]))

    def config(folder: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(epochs=3, batch_size=32, lr=5e-3, checkpoint_dir=folder, resume=resume)

    whole = netmeld.train(model, data, config=config(str(tmp_path / "a")), progress=False)
    real_train = fusion_training.run_epochs

    def killed_after_first_epoch(*args, **kwargs):
        def stop(epoch: int, _loss: float) -> None:
            if epoch == 0:
                raise KeyboardInterrupt

        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(fusion_training, "run_epochs", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        netmeld.train(model, data, config=config(str(tmp_path / "b")), progress=False)
    monkeypatch.setattr(fusion_training, "run_epochs", real_train)
    resumed = netmeld.train(model, data, config=config(str(tmp_path / "b"), True), progress=False)
    a, b = whole.members[0].module.state_dict(), resumed.members[0].module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.method["params"]["learned_weights"] == resumed.method["params"]["learned_weights"]


def _ddp_parallel() -> dict[str, torch.Tensor]:
    """A parallel fit of two MLP branches (no BatchNorm, no dropout), one frozen."""
    torch.manual_seed(0)
    mlp = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 64, "hidden": 16})
    model = fusion.parallel(
        {"a": mlp, "b": mlp}, ["x", "y", "z"], input_shape=(64,), fuse="gating", freeze=["a"]
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(120, 64, generator=generator)
    labels = [("x", "y", "z")[int(v)] for v in (x[:, 0] * 3).long().clamp(max=2)]
    out = netmeld.train(model, (x, labels), epochs=2, batch_size=30, lr=1e-2, progress=False)
    return {k: v.clone() for k, v in out.members[0].module.state_dict().items()}


def test_fit_under_two_process_ddp_matches_one_process(tmp_path):
    ddp, single = two_process_run(_ddp_parallel, tmp_path), _ddp_parallel()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)


def test_netmeld_train_multitask_recipe_reads_a_folder_per_task(digits, tmp_path):
    from PIL import Image

    from netmeld.cli import main

    x, labels = digits[0]
    for i, (img, label) in enumerate(zip(x[:400], labels[:400], strict=True)):
        task, name = ("digit", label) if i % 2 == 0 else ("big", "yes" if int(label) >= 5 else "no")
        folder = tmp_path / task / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    recipe = {
        "build": "multitask",
        "trunk": {"architecture": FRESH.spec, "architecture_kwargs": FRESH.kwargs},
        "tasks": {"digit": [str(i) for i in range(10)], "big": ["no", "yes"]},
        "weighting": "uncertainty",
        "input_shape": [1, 8, 8],
        "data": {"digit": "digit", "big": "big"},
        "schedule": {"epochs": 8, "batch_size": 32, "lr": 0.01},
    }
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "mt.yaml"), "-o", str(tmp_path / "mt")]) == 0
    model = netmeld.load(tmp_path / "mt")
    assert model.method["params"]["weighting"] == "uncertainty"
    acc = fusion.task_accuracy(model, _two_tasks(digits[1]))
    assert acc["digit"] > 0.3 and acc["big"] > 0.65, acc  # chance: 0.1 and 0.5
    bad = dict(recipe, data="digit")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(netmeld.RecipeError, match="maps each task"):
        from netmeld.cli.recipes import read_train_recipe

        read_train_recipe(tmp_path / "bad.yaml")


# one small model of each fusion kind: a test of every kind FUSION_KINDS lists
_EVERY_KIND = {
    "parallel": lambda: fusion.parallel(
        {"a": FRESH, "b": FRESH}, [str(i) for i in range(10)], input_shape=(1, 8, 8)
    ),
    "hierarchical": lambda: fusion.hierarchical(
        FRESH,
        netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 16, "num_classes": 10}),
        [str(i) for i in range(10)],
        input_shape=(1, 8, 8),
        second_input_shape=(16,),
    ),
    "multitask": lambda: fusion.multitask(
        FRESH, {"digit": [str(i) for i in range(10)]}, input_shape=(1, 8, 8)
    ),
}


@pytest.mark.parametrize("kind", fusion.FUSION_KINDS)
def test_every_fusion_kind_trains_saves_and_loads_equal(kind, digits, tmp_path):
    assert set(_EVERY_KIND) == set(fusion.FUSION_KINDS)
    torch.manual_seed(0)
    model = _EVERY_KIND[kind]()
    (x, labels), (test_x, _) = digits
    x, labels = x[:600], labels[:600]
    if kind == "multitask":
        labels = [f"digit/{label}" for label in labels]
    before = _accuracy(model, (x, labels))
    out = netmeld.train(model, (x, labels), epochs=4, lr=1e-2, progress=False)
    assert isinstance(out.members[0].module, fusion.FusedNet)
    assert out.members[0].module.kind == kind
    assert _accuracy(out, (x, labels)) > before + 0.2  # chance: 0.1
    out.save(tmp_path / kind)
    loaded = netmeld.load(tmp_path / kind)
    torch.testing.assert_close(loaded(test_x[:16]), out(test_x[:16]), atol=1e-6, rtol=0)


def test_hierarchical_cuts_after_a_whole_block_with_its_residual_add():
    from netmeld.zoo import resnet20

    torch.manual_seed(0)
    r = resnet20(num_classes=2)
    first = netmeld.Member(r, ["a", "b"], name="r", preprocessing={"input_shape": (3, 32, 32)})
    second = netmeld.Architecture("netmeld.zoo:small_cnn", {"in_channels": 3, "width": 4})
    model = fusion.hierarchical(
        first, second, ["a", "b"], cut="layer2", second_input_shape=(3, 32, 32)
    )
    assert model.method["params"]["first_features"] == [32, 16, 16]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = r.layer2(r.layer1(torch.relu(r.bn1(r.conv1(x)))))
        torch.testing.assert_close(model.members[0].module.first(x), expected)
