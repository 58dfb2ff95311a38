"""Keras and ONNX members, and ONNX export of every kind of combined model."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

import netmeld
from netmeld.errors import MemberError, ModelFileError
from netmeld.members import bridges
from netmeld.methods import fusion
from netmeld.zoo import small_cnn

S = 16  # image size of the forum's models here


def _keras():
    import keras

    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(0)
    return keras


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.random((96, S, S, 1)).astype("float32")
    return x, rng.integers(0, 10, 96), rng.integers(0, 5, 96)


@pytest.fixture(scope="module")
def forum(tmp_path_factory, images):
    """The forum's three Keras models, trained briefly and saved as .keras (and (a) as .h5)."""
    keras = _keras()
    layers = keras.layers
    x, y10, y5 = images
    root = tmp_path_factory.mktemp("keras")
    # (a) two branches, 3x3 and 5x5 kernels, each with its own Input, concatenated
    inputs, flats = [], []
    for k in (3, 5):
        i = keras.Input((S, S, 1))
        h = layers.Conv2D(4, k, activation="relu")(i)
        h = layers.MaxPooling2D()(h)
        inputs.append(i)
        flats.append(layers.Flatten()(h))
    out = layers.Dense(10, activation="softmax")(layers.concatenate(flats))
    a = keras.Model(inputs, out)
    a.compile("adam", "sparse_categorical_crossentropy")
    a.fit([x, x], y10, epochs=1, verbose=0)
    a.save(root / "a.keras")
    a.save(root / "a.h5")
    # (b) a feature extractor feeding a second Conv2D classifier
    i = keras.Input((S, S, 1))
    f = layers.MaxPooling2D()(layers.Conv2D(4, 3, activation="relu", padding="same")(i))
    extractor = keras.Model(i, f)
    j = keras.Input((S, S, 1))
    h = layers.MaxPooling2D()(layers.Conv2D(8, 3, activation="relu", padding="same")(extractor(j)))
    b = keras.Model(j, layers.Dense(10, activation="softmax")(layers.Flatten()(h)))
    b.compile("adam", "sparse_categorical_crossentropy")
    b.fit(x, y10, epochs=1, verbose=0)
    b.save(root / "b.keras")
    # (c) a shared trunk with two softmax heads, 10 and 5 classes, loss weights 0.5 / 0.5
    i = keras.Input((S, S, 1))
    t = layers.Flatten()(layers.MaxPooling2D()(layers.Conv2D(4, 3, activation="relu")(i)))
    c = keras.Model(
        i,
        [
            layers.Dense(10, activation="softmax", name="digits")(t),
            layers.Dense(5, activation="softmax", name="shapes")(t),
        ],
    )
    c.compile("adam", ["sparse_categorical_crossentropy"] * 2, loss_weights=[0.5, 0.5])
    c.fit(x, [y10, y5], epochs=1, verbose=0)
    c.save(root / "c.keras")
    return root, {"a": a, "b": b, "c": c}


DIGITS = [f"d{i}" for i in range(10)]
SHAPES = [f"s{i}" for i in range(5)]


def _torch_member() -> netmeld.Member:
    torch.manual_seed(0)
    return netmeld.Member(
        small_cnn(num_classes=2, in_channels=1, width=8, blocks=2),
        ["cat", "dog"],
        name="torch",
        preprocessing={"input_shape": (1, S, S)},
        architecture=netmeld.Architecture(
            "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 8, "blocks": 2}
        ),
    )


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", ["a.keras", "a.h5", "b.keras"])
def test_keras_members_match_keras_and_combine_with_pytorch(forum, images, name, tmp_path):
    root, models = forum
    member = netmeld.Member.from_keras(root / name, DIGITS)
    assert member.preprocessing.input_shape == (1, S, S)
    x = images[0][:8]
    keras_model = models[name[0]]
    expected = keras_model.predict([x, x] if name[0] == "a" else x, verbose=0)
    with torch.no_grad():
        probs = torch.softmax(member.module(_nchw(x)), dim=1).numpy()
    assert abs(probs - expected).max() < 1e-5
    model = netmeld.meld([member, _torch_member()], "concat")
    assert model.labels == [*DIGITS, "cat", "dog"]
    model.save(tmp_path / "m")
    again = netmeld.load(tmp_path / "m")
    assert torch.equal(again(_nchw(x)), model(_nchw(x)))


def test_a_multi_output_keras_model_gives_members_that_share_the_trunk(forum, images):
    root, models = forum
    labels = {"digits": DIGITS, "shapes": SHAPES}
    members = netmeld.Member.from_keras_outputs(root / "c.keras", labels)
    model = netmeld.meld([*members, _torch_member()], "concat")
    assert set(model.plan[0].members) == {"c-digits", "c-shapes"}
    x = images[0][:6]
    digits, shapes = models["c"].predict(x, verbose=0)
    with torch.no_grad():
        logits = model(_nchw(x))
    assert abs(torch.softmax(logits[:, :10], 1).numpy() - digits).max() < 1e-5
    assert abs(torch.softmax(logits[:, 10:15], 1).numpy() - shapes).max() < 1e-5
    with pytest.raises(MemberError, match="2 outputs"):
        netmeld.Member.from_keras(root / "c.keras", DIGITS)
    with pytest.raises(MemberError, match="10 units, 5 labels"):
        netmeld.Member.from_keras(root / "c.keras", SHAPES, output="digits")
    keras = _keras()
    unbuilt = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(MemberError, match="not built"):
        netmeld.Member.from_keras(unbuilt, ["a", "b", "c"])


def test_a_keras_member_trains_in_a_fusion_with_a_pytorch_member(forum, images):
    root, _ = forum
    keras_member = netmeld.Member.from_keras(root / "b.keras", DIGITS)
    model = fusion.parallel([keras_member, _torch_member()], freeze=["b"])
    net = model.members[0].module
    frozen = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("branches.b.")}
    x, y10, _ = images
    out = netmeld.train(model, (_nchw(x), [DIGITS[i] for i in y10]), epochs=1, progress=False)
    after = out.members[0].module.state_dict()
    assert frozen and all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert out(_nchw(x[:3])).shape == (3, 12)


def _keras_and_torch(forum, images):
    root, _ = forum
    x, y10, _ = images
    labels = [DIGITS[v] if j % 2 else ("cat", "dog")[v % 2] for j, v in enumerate(y10)]
    return netmeld.Member.from_keras(root / "b.keras", DIGITS), _torch_member(), (_nchw(x), labels)


@pytest.mark.parametrize("method", netmeld.list_methods())
def test_a_keras_member_works_in_every_method(forum, images, method, tmp_path):
    keras_member, torch_member, data = _keras_and_torch(forum, images)
    if method == "bn-standardize":  # reads BatchNorm layers through torch.fx
        with pytest.raises(netmeld.MethodError, match="cannot be traced"):
            netmeld.meld([keras_member, torch_member], method, data)
        return
    if netmeld.get_method(method).data == "statistics":  # a head over one shared trunk
        stats = [
            netmeld.feature_statistics(m, (data[0][rows], [data[1][i] for i in rows]))
            for m in (keras_member, torch_member)
            for rows in [[i for i, label in enumerate(data[1]) if label in m.labels]]
        ]
        with pytest.raises(netmeld.MethodError, match="different trunks"):
            netmeld.meld([keras_member, torch_member], method, statistics=stats)
        return
    model = netmeld.meld([keras_member, torch_member], method, data)
    assert model.labels == [*DIGITS, "cat", "dog"]
    model.save(tmp_path / "m")
    x = data[0][:4]
    assert torch.equal(netmeld.load(tmp_path / "m")(x), model(x))


def test_keras_members_distil_merge_and_extend(forum, images, tmp_path):
    keras_member, torch_member, data = _keras_and_torch(forum, images)
    x = data[0]
    teacher = netmeld.meld([keras_member, torch_member], "concat")
    student = netmeld.distill(teacher, x, epochs=1, progress=False)
    assert isinstance(student.members[0].module, bridges.KerasClassifier)  # a new 12-way head
    twin = netmeld.Member.from_keras(forum[0] / "b.keras", DIGITS, name="b2")
    merged = netmeld.merge_members([keras_member, twin], "linear")  # identical weights
    assert merged.labels == DIGITS
    assert merged.predict(x) == netmeld.meld([keras_member], "concat").predict(x)
    bigger = netmeld.extend(teacher, (x[:10], ["new"] * 10), unlabeled=x[10:], steps=5)
    for i, model in enumerate((student, merged, bigger)):
        model.save(tmp_path / str(i))
        assert torch.equal(netmeld.load(tmp_path / str(i))(x[:4]), model(x[:4]))


def test_onnx_members_match_pytorch_and_save_without_the_file(tmp_path):
    torch.manual_seed(0)
    net = small_cnn(num_classes=3, in_channels=1, width=8, blocks=2).eval()
    with_softmax = torch.nn.Sequential(net, torch.nn.Softmax(1)).eval()
    torch.onnx.export(
        with_softmax,
        (torch.rand(2, 1, S, S),),
        str(tmp_path / "m.onnx"),
        opset_version=17,
        dynamo=False,
        input_names=["input"],
        output_names=["probs"],
        dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}},
    )
    member = netmeld.Member.from_onnx(tmp_path / "m.onnx", ["a", "b", "c"])
    x = torch.rand(5, 1, S, S)
    with torch.no_grad():
        assert (member.module(x) - net(x)).abs().max() < 1e-5  # logits: the softmax was cut
    model = netmeld.meld([member, _torch_member()], "concat")
    model.save(tmp_path / "combined")
    (tmp_path / "m.onnx").unlink()
    assert torch.equal(netmeld.load(tmp_path / "combined")(x), model(x))
    with pytest.raises(MemberError, match="no such file"):
        netmeld.Member.from_onnx(tmp_path / "m.onnx", ["a"])


def _ort(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _combined_models(digits2, forum):
    members = digits2.members
    pool = (digits2.pool[:300], digits2.pool_labels[:300])
    root, _ = forum
    extended = netmeld.extend(
        netmeld.meld(members, "concat"),
        (digits2.pool[:20], ["new"] * 20),
        unlabeled=digits2.pool[20:200],
        steps=0,
    )
    return {
        "concat": netmeld.meld(members, "concat"),
        "calibrate": netmeld.meld(members, "calibrate", pool),
        "router": netmeld.meld(members, "router", pool, params={"steps": 50}),
        "mean": netmeld.meld(members, "mean"),
        "vote": netmeld.meld(members, "vote"),
        "stack": netmeld.meld(members, "stack", pool),
        "extend": extended,
        "parallel-attention": fusion.parallel(members, fuse="attention"),
        "hierarchical": fusion.hierarchical(
            members[0],
            netmeld.Architecture("netmeld.zoo:small_cnn", {"in_channels": 3, "width": 8}),
            ["p", "q"],
            cut="features.3",
            second_input_shape=(3, 6, 6),
        ),
        "multitask": fusion.multitask(members[0], {"t": ["x", "y"], "u": ["z"]}),
        "distill": netmeld.distill(netmeld.meld(members, "concat"), pool[0], epochs=1),
        "merge-ties": netmeld.merge_members(members, "ties", params={"density": 0.5}),
        "zipit": netmeld.zip_members(members, pool[0]),
        "keras+torch": netmeld.meld(
            [netmeld.Member.from_keras(root / "b.keras", DIGITS), _torch_member()], "concat"
        ),
    }


def test_every_combined_model_exports_to_onnx(digits2, forum, tmp_path):
    for name, model in _combined_models(digits2, forum).items():
        path = tmp_path / f"{name}.onnx"
        diff = bridges.export_onnx(model, path)
        assert diff is not None and diff <= 1e-4, name
        x = torch.rand(5, *model.input_shape)  # a batch size the check did not use
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(_ort(path, x) - expected).max() <= 1e-4, name
    with pytest.raises(ModelFileError, match="exists"):
        bridges.export_onnx(model, path)


def _overlapping_members() -> list[netmeld.Member]:
    members = []
    for seed, labels in ((0, ["cat", "dog"]), (1, ["dog", "fox", "owl"])):
        torch.manual_seed(seed)
        members.append(
            netmeld.Member(
                small_cnn(num_classes=len(labels), in_channels=1, width=8, blocks=2),
                labels,
                name=f"m{seed}",
                preprocessing={"input_shape": (1, S, S), "mean": [0.5], "std": [0.25]},
                architecture=netmeld.Architecture(
                    "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 8, "blocks": 2}
                ),
            )
        )
    return members


@pytest.mark.parametrize("method", ["mean", "vote", "max-confidence"])
def test_ensembles_of_members_sharing_a_label_export_with_their_labels_and_any_size(
    method, tmp_path
):
    import json

    import onnx

    model = netmeld.meld(_overlapping_members(), method)
    assert model.labels == ["cat", "dog", "fox", "owl"]
    path = tmp_path / "m.onnx"
    assert bridges.export_onnx(model, path) <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["labels"]) == model.labels
    members = json.loads(meta["members"])
    assert [m["name"] for m in members] == ["m0", "m1"]
    assert members[1]["preprocessing"]["mean"] == [0.5]
    x = torch.rand(2, 1, S + 9, S + 5)  # another image size: each member resizes it
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_ort(path, x) - expected).max() <= 1e-4


def test_an_onnx_export_failure_is_one_line(monkeypatch, tmp_path, capfd):
    def failing(*args, **kwargs):
        print("graph(%input : Float(2, 1, 8, 8)):\n" + "  %1 = onnx::Op()\n" * 270)
        os.write(2, b"C++ noise\n")
        raise RuntimeError("index_add_(): duplicate indices\n" + "IR line\n" * 270)

    monkeypatch.setattr(torch.onnx, "export", failing)
    model = netmeld.meld(_overlapping_members(), "concat")
    with pytest.raises(ModelFileError) as caught:
        bridges.export_onnx(model, tmp_path / "m.onnx")
    assert "\n" not in str(caught.value) and "duplicate indices" in str(caught.value)
    out, err = capfd.readouterr()
    assert "onnx::Op" not in out + err and "C++ noise" not in out + err
    assert not (tmp_path / "m.onnx").exists()


def test_a_keras_model_ending_in_a_nested_sequential_classifier(tmp_path):
    """The seeds' hierarchical example: ``cnn2(cnn1(x))``, cnn2 a Sequential whose last Dense
    is the classifier."""
    keras = _keras()
    cnn1 = keras.Sequential(
        [
            keras.Input((S, S, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
        ],
        name="cnn1",
    )
    width = 4 * (S - 2) * (S - 2)
    cnn2 = keras.Sequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ],
        name="cnn2",
    )
    x = keras.Input((S, S, 1))
    model = keras.Model(x, cnn2(cnn1(x)))
    model.save(tmp_path / "h.keras")
    member = netmeld.Member.from_keras(tmp_path / "h.keras", ["a", "b", "c"])
    images = np.random.default_rng(0).random((5, S, S, 1)).astype("float32")
    combined = netmeld.meld([member], "concat")
    with torch.no_grad():
        probs = combined(_nchw(images)).softmax(1).numpy()
    assert np.abs(probs - model.predict(images, verbose=0)).max() < 1e-5
    loaded = netmeld.load(combined.save(tmp_path / "saved"))
    with torch.no_grad():
        assert np.abs(loaded(_nchw(images)).softmax(1).numpy() - probs).max() < 1e-6


def test_a_keras_members_wrong_input_shape_is_refused_when_it_is_built(forum):
    root, _ = forum
    with pytest.raises(MemberError, match=r"input_shape \(1, 12, 12\) does not fit"):
        netmeld.Member.from_keras(
            root / "b.keras", DIGITS, preprocessing=netmeld.Preprocessing((1, 12, 12))
        )
