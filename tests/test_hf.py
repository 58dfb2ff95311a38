"""Hugging Face transformers members (read offline from save_pretrained folders) and the
union exported as plain transformers / torchvision / timm checkpoints.

Every model is a tiny config built here; nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml

import netmeld
from netmeld.cli import main

transformers = pytest.importorskip("transformers")

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _labels_config(labels):
    return {"id2label": dict(enumerate(labels)), "label2id": {k: i for i, k in enumerate(labels)}}


CONFIGS = {
    "vit": lambda labels: transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **_labels_config(labels),
    ),
    "convnext": lambda labels: transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **_labels_config(labels)
    ),
    "resnet": lambda labels: transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **_labels_config(labels)
    ),
    "mobilenet_v2": lambda labels: transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35, **_labels_config(labels)
    ),
    "swin": lambda labels: transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=2,
        **_labels_config(labels),
    ),
}
SIZE = {"vit": 16, "convnext": 32, "resnet": 32, "mobilenet_v2": 32, "swin": 32}


def save_image_classifier(folder, family, labels, *, seed=0, backbone=None):
    """A tiny transformers image classifier saved with its image processor; ``backbone``
    (another model) gives it that model's backbone, as transfer learning on one frozen base."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageClassification.from_config(CONFIGS[family](labels))
    if backbone is not None:
        own = model.state_dict()
        shared = {k: v for k, v in backbone.state_dict().items() if "classifier" not in k}
        own.update(shared)
        model.load_state_dict(own)
    model.eval().save_pretrained(folder)
    size = SIZE[family]
    transformers.ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=MEAN, image_std=STD
    ).save_pretrained(folder)
    return model


def reference_logits(model, x):
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        return model(pixel_values=(x - mean) / std).logits


@pytest.fixture(scope="module")
def pets_people(tmp_path_factory):
    """Two ViT classifiers transfer-learned on one frozen backbone, with disjoint labels."""
    root = tmp_path_factory.mktemp("hf")
    pets = save_image_classifier(root / "pets", "vit", ["cat", "dog"])
    people = save_image_classifier(
        root / "people", "vit", ["man", "woman", "child"], seed=1, backbone=pets
    )
    return root, pets, people


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_member_gives_the_transformers_models_logits(family, tmp_path):
    model = save_image_classifier(tmp_path / family, family, ["a", "b", "c"])
    member = netmeld.Member.from_pretrained(tmp_path / family)
    assert member.labels == ("a", "b", "c")
    size = SIZE[family]
    assert member.preprocessing.input_shape == (3, size, size)
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        got = member.module(member_input(member, x))
    torch.testing.assert_close(got, reference_logits(model, x), atol=1e-5, rtol=1e-5)


def member_input(member, x):
    p = member.preprocessing
    return (x - torch.tensor(p.mean)[:, None, None]) / torch.tensor(p.std)[:, None, None]


def test_members_on_one_frozen_backbone_share_it_and_save(pets_people, tmp_path):
    root, pets, people = pets_people
    members = [netmeld.Member.from_pretrained(root / n) for n in ("pets", "people")]
    model = netmeld.meld(members, "concat")
    assert len(model.plan) == 1 and model.plan[0].members == ("pets", "people")
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        union = model(x)
    expected = torch.cat([reference_logits(pets, x), reference_logits(people, x)], 1)
    torch.testing.assert_close(union, expected, atol=1e-5, rtol=1e-5)
    loaded = netmeld.load(model.save(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), union)


def test_inspect_says_a_fine_tuned_backbone_shares_nothing(pets_people, tmp_path, capsys):
    root, _, _ = pets_people
    save_image_classifier(tmp_path / "tuned", "vit", ["fox", "owl"], seed=5)  # its own backbone
    assert main(["inspect", str(root / "pets"), str(root / "people"), str(tmp_path / "tuned")]) == 0
    capsys.readouterr()
    rows = netmeld.inspect([root / "pets", root / "people", tmp_path / "tuned"])
    shared = {r["member"]: r["shared_with"] for r in rows}
    assert shared == {"pets": ["people"], "people": ["pets"], "tuned": []}


def test_default_label_names_warn_and_can_be_replaced(tmp_path):
    torch.manual_seed(0)
    config = CONFIGS["vit"](["x", "y"])
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="default names .*pass labels"):
        member = netmeld.Member.from_pretrained(tmp_path / "m")
    assert member.labels == ("LABEL_0", "LABEL_1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = netmeld.Member.from_pretrained(tmp_path / "m", ["cat", "dog"])
    assert named.labels == ("cat", "dog")
    with pytest.raises(netmeld.MemberError, match="3 labels given for a classifier with 2"):
        netmeld.Member.from_pretrained(tmp_path / "m", ["a", "b", "c"])


def test_hostile_or_foreign_folders_are_refused(pets_people, tmp_path):
    root, _, _ = pets_people
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(root / "pets", custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "evil.Model"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(netmeld.UntrustedCodeError, match="custom model code"):
        netmeld.Member.from_pretrained(custom)

    pickled = tmp_path / "pickled"
    shutil.copytree(root / "pets", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(netmeld.CheckpointError, match="pickle"):
        netmeld.Member.from_pretrained(pickled)

    missing = tmp_path / "missing"
    shutil.copytree(root / "pets", missing)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(missing / "model.safetensors"))
    dropped = sorted(k for k in tensors if "classifier" not in k)[0]
    del tensors[dropped]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(netmeld.CheckpointError, match="is missing"):
        netmeld.Member.from_pretrained(missing)

    other = tmp_path / "other"
    shutil.copytree(root / "pets", other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["ViTModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(netmeld.MemberError, match="not an image or sequence classifier"):
        netmeld.Member.from_pretrained(other)

    broken = tmp_path / "broken"
    shutil.copytree(root / "pets", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(netmeld.MemberError, match=r"config\.json' is not valid JSON"):
        netmeld.Member.from_pretrained(broken)
    text = (root / "pets" / "config.json").read_text()
    (broken / "config.json").write_text(text.replace("{", '{"model_type": "bert", ', 1))
    with pytest.raises(netmeld.MemberError, match="'model_type' appears twice"):
        netmeld.Member.from_pretrained(broken)


def test_a_recipe_member_from_an_hf_folder(pets_people, tmp_path):
    root, _, _ = pets_people
    recipe = {
        "members": [{"hf": str(root / "pets")}, {"hf": str(root / "people"), "name": "folk"}],
        "method": "weight-norm",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "m")]) == 0
    model = netmeld.load(tmp_path / "m")
    assert model.member_names == ["pets", "folk"]
    assert model.labels == ["cat", "dog", "man", "woman", "child"]


# -- exports -----------------------------------------------------------------------------------

WITHOUT_NETMELD = """
import sys
sys.modules["netmeld"] = None  # netmeld cannot be imported: the export must stand alone
"""


def run_alone(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_NETMELD + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _own_rows(member, x, labels):
    rows = [i for i, k in enumerate(labels) if k in member.labels]
    return x[rows], [labels[i] for i in rows]


@pytest.mark.parametrize("method", ["concat", "weight-norm", "calibrate", "ridge"])
def test_a_linear_union_exports_as_a_plain_transformers_model(method, pets_people, tmp_path):
    root, _, _ = pets_people
    members = [netmeld.Member.from_pretrained(root / n) for n in ("pets", "people")]
    torch.manual_seed(0)
    x = torch.rand(30, 3, 16, 16)
    labels = [["cat", "dog", "man", "woman", "child"][i % 5] for i in range(30)]
    inputs: dict = {}
    if method == "calibrate":
        inputs["data"] = (x, labels)
    if method == "ridge":
        inputs["statistics"] = [
            netmeld.feature_statistics(
                m,
                (
                    x[[i for i, k in enumerate(labels) if k in m.labels]],
                    [k for k in labels if k in m.labels],
                ),
                progress=False,
            )
            for m in members
        ]
    model = netmeld.meld(members, method, **inputs)
    assert netmeld.export(model, tmp_path / "out", format="transformers") < 1e-5
    torch.save(x[:6], tmp_path / "x.pt")
    out = run_alone(
        f"""
        import json, torch, transformers
        folder = {str(tmp_path / "out")!r}
        m = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        p = transformers.AutoImageProcessor.from_pretrained(folder)
        x = torch.load({str(tmp_path / "x.pt")!r})
        mean = torch.tensor(p.image_mean)[:, None, None]
        std = torch.tensor(p.image_std)[:, None, None]
        with torch.no_grad():
            logits = m(pixel_values=(x - mean) / std).logits
        print(json.dumps({{"logits": logits.tolist(), "labels": m.config.id2label}}))
        """
    )
    result = json.loads(out)
    with torch.no_grad():
        expected = model(x[:6])
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert list(result["labels"].values()) == model.labels


@pytest.mark.parametrize("method", ["infomax", "max-logit"])
def test_a_union_that_is_not_linear_points_to_onnx(method, pets_people, tmp_path, capsys):
    root, _, _ = pets_people
    members = [netmeld.Member.from_pretrained(root / n) for n in ("pets", "people")]
    data = torch.rand(20, 3, 16, 16) if method == "infomax" else None
    model = netmeld.meld(members, method, data)
    with pytest.raises(netmeld.ExportError, match=r"not one plain model.*--format onnx"):
        netmeld.export(model, tmp_path / "out", format="transformers")
    assert not (tmp_path / "out").exists()
    model.save(tmp_path / "m")
    argv = ["export", str(tmp_path / "m"), "--format", "transformers", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--format onnx" in err and "Traceback" not in err


def test_the_cli_exports_a_saved_model_as_transformers(pets_people, tmp_path, capsys):
    root, _, _ = pets_people
    members = [netmeld.Member.from_pretrained(root / n) for n in ("pets", "people")]
    netmeld.meld(members, "weight-norm").save(tmp_path / "m")
    argv = ["export", str(tmp_path / "m"), "--format", "transformers", "-o", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "plain transformers checkpoint" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert main(argv) == 2  # exists: --overwrite replaces only what netmeld wrote
    assert main([*argv, "--overwrite"]) == 0


def _torchvision_members():
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v3_small(num_classes=2).eval()
    other = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    state = other.state_dict()
    state.update({k: v for k, v in base.state_dict().items() if not k.startswith("classifier.3")})
    other.load_state_dict(state)
    pre = netmeld.Preprocessing((3, 32, 32), mean=MEAN, std=STD)
    return [
        netmeld.Member.from_torchvision(base, ["cat", "dog"], name="pets", preprocessing=pre),
        netmeld.Member.from_torchvision(other, ["a", "b", "c"], name="abc", preprocessing=pre),
    ]


def _timm_members():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("test_resnet", num_classes=2).eval()
    other = timm.create_model("test_resnet", num_classes=3).eval()
    head = base.get_classifier()
    names = {n for n, m in base.named_modules() if m is head}
    (head_name,) = names
    state = other.state_dict()
    state.update({k: v for k, v in base.state_dict().items() if not k.startswith(head_name)})
    other.load_state_dict(state)
    pre = netmeld.Preprocessing((3, 32, 32), mean=MEAN, std=STD)
    return [
        netmeld.Member.from_timm(base, ["cat", "dog"], name="pets", preprocessing=pre),
        netmeld.Member.from_timm(other, ["a", "b", "c"], name="abc", preprocessing=pre),
    ]


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_linear_union_exports_as_a_plain_state_dict(library, tmp_path):
    members = _torchvision_members() if library == "torchvision" else _timm_members()
    model = netmeld.meld(members, "weight-norm")
    assert netmeld.export(model, tmp_path / "out", format=library) < 1e-5
    x = torch.rand(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    build = (
        "torchvision.models.get_model(info['architecture'], num_classes=info['num_classes'])"
        if library == "torchvision"
        else "timm.create_model(info['architecture'], num_classes=info['num_classes'])"
    )
    out = run_alone(
        f"""
        import json, torch, {library}
        from safetensors.torch import load_file
        folder = {str(tmp_path / "out")!r}
        info = json.load(open(folder + "/labels.json"))
        m = {build}
        m.load_state_dict(load_file(folder + "/model.safetensors"))
        m.eval()
        x = torch.load({str(tmp_path / "x.pt")!r})
        pre = info["preprocessing"]
        mean = torch.tensor(pre["mean"])[:, None, None]
        std = torch.tensor(pre["std"])[:, None, None]
        with torch.no_grad():
            print(json.dumps({{"logits": m((x - mean) / std).tolist(), "labels": info["labels"]}}))
        """
    )
    result = json.loads(out)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert result["labels"] == model.labels


def test_the_wrong_library_is_named(tmp_path):
    model = netmeld.meld(_torchvision_members(), "concat")
    with pytest.raises(netmeld.ExportError, match="--format timm needs members that are timm"):
        netmeld.export(model, tmp_path / "out", format="timm")


@pytest.mark.parametrize(
    "settings",
    [
        {},  # EfficientNet's default include_top divides by image_std a second time
        {"include_top": False},
        {"rescale_offset": True, "rescale_factor": 1 / 127.5, "do_normalize": False},
        {"do_rescale": False},
    ],
)
def test_image_processor_settings_give_the_processors_own_inputs(settings, tmp_path):
    import numpy as np

    from netmeld.io.hf import image_preprocessing

    proc = transformers.EfficientNetImageProcessor(
        size={"height": 8, "width": 8}, image_mean=MEAN, image_std=STD, **settings
    )
    proc.save_pretrained(tmp_path)
    pre = image_preprocessing(tmp_path, {"num_channels": 3})
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    theirs = proc(pixels, return_tensors="pt")["pixel_values"][0]
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    if "mean" in pre:
        x = (x - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
    torch.testing.assert_close(x, theirs, atol=1e-4, rtol=1e-4)
