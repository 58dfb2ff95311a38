"""Bad input gets a clear error naming the file, member, tensor or label."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import netmeld
from netmeld import Member, Preprocessing
from netmeld.zoo import SmallCNN

PRE = Preprocessing((1, 8, 8))


def _checkpoint(tmp_path, num_classes=3, name="net.safetensors"):
    torch.manual_seed(0)
    model = SmallCNN(num_classes, 1, 8, 2)
    path = tmp_path / name
    save_file(model.state_dict(), str(path))
    return model, path


def test_checkpoint_round_trip_through_safetensors_and_weights_only_pt(tmp_path):
    model, path = _checkpoint(tmp_path)
    m = Member.from_checkpoint(
        path,
        "netmeld.zoo:small_cnn",
        ["a", "b", "c"],
        architecture_kwargs={"width": 8, "blocks": 2},
        preprocessing=PRE,
    )
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "net.pth",
    )
    m2 = Member.from_checkpoint(
        tmp_path / "net.pth",
        "netmeld.zoo:small_cnn",
        ["a", "b", "c"],
        architecture_kwargs={"width": 8, "blocks": 2},
        preprocessing=PRE,
    )
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.module(x), model.eval()(x))
        torch.testing.assert_close(m2.module(x), model(x))


def test_checkpoint_whose_tensor_does_not_fit_names_tensor_and_shapes(tmp_path):
    _, path = _checkpoint(tmp_path, num_classes=5)
    with pytest.raises(
        netmeld.CheckpointError, match=r"'fc.weight' has shape \(5, 16\).*\(3, 16\)"
    ):
        Member.from_checkpoint(
            path,
            "netmeld.zoo:small_cnn",
            ["a", "b", "c"],
            name="pets",
            architecture_kwargs={"width": 8, "blocks": 2},
            preprocessing=PRE,
        )


def test_checkpoint_with_a_missing_tensor(tmp_path):
    model = SmallCNN(3, 1, 8, 2)
    state = {k: v for k, v in model.state_dict().items() if k != "fc.bias"}
    save_file(state, str(tmp_path / "x.safetensors"))
    with pytest.raises(netmeld.CheckpointError, match=r"'fc\.bias' is missing"):
        Member.from_checkpoint(
            tmp_path / "x.safetensors",
            "netmeld.zoo:small_cnn",
            ["a", "b", "c"],
            architecture_kwargs={"width": 8, "blocks": 2},
            preprocessing=PRE,
        )


def test_pickled_objects_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(netmeld.CheckpointError, match="weights-only"):
        Member.from_checkpoint(
            tmp_path / "evil.pt", "netmeld.zoo:small_cnn", ["a"], preprocessing=PRE
        )


def test_unreadable_checkpoint_and_missing_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(netmeld.CheckpointError, match=r"bad\.safetensors"):
        Member.from_checkpoint(
            tmp_path / "bad.safetensors", "netmeld.zoo:small_cnn", ["a"], preprocessing=PRE
        )
    with pytest.raises(netmeld.CheckpointError, match="does not exist"):
        Member.from_checkpoint(
            tmp_path / "nope.pt", "netmeld.zoo:small_cnn", ["a"], preprocessing=PRE
        )


def test_unknown_architecture(tmp_path):
    _, path = _checkpoint(tmp_path)
    with pytest.raises(netmeld.MemberError, match="no model named 'resnet9000'"):
        Member.from_checkpoint(path, "resnet9000", ["a", "b", "c"], preprocessing=PRE)
    with pytest.raises(netmeld.MemberError, match="cannot import module"):
        Member.from_checkpoint(path, "no_such_pkg.models:net", ["a"], preprocessing=PRE)


def test_duplicate_member_names(digits2):
    a, b = digits2.members
    twin = Member(b.module, b.labels, name=a.name, preprocessing=b.preprocessing)
    with pytest.raises(netmeld.IncompatibleMembersError, match="two members are named 'm1'"):
        netmeld.meld([a, twin])


def test_incompatible_input_sizes_name_both_members():
    a = Member(SmallCNN(2, 1, 8, 2).eval(), ["a", "b"], name="small", preprocessing=PRE)
    b = Member(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 2)),
        ["c", "d"],
        name="table",
        preprocessing=Preprocessing((10,)),
    )
    with pytest.raises(netmeld.IncompatibleMembersError, match="'table' expects input shape"):
        netmeld.meld([a, b])
    with pytest.raises(netmeld.IncompatibleMembersError, match=r"'table'.*vectors must match"):
        netmeld.meld([a, b], input_shape=(1, 8, 8))


def test_duplicate_and_empty_labels():
    with pytest.raises(netmeld.MemberError, match="'cat' appears twice"):
        Member(SmallCNN(2, 1, 8, 2), ["cat", "cat"], name="m", preprocessing=PRE)
    with pytest.raises(netmeld.MemberError, match="labels are empty"):
        Member(SmallCNN(2, 1, 8, 2), [], name="m", preprocessing=PRE)
    with pytest.raises(netmeld.MemberError, match="member name"):
        Member(SmallCNN(2, 1, 8, 2), ["a", "b"], name="has space", preprocessing=PRE)


def test_unknown_label_in_data_names_it(digits2):
    x = digits2.pool[:3]
    with pytest.raises(netmeld.LabelError, match="'alien bug' is not known"):
        netmeld.meld(digits2.members, "calibrate", (x, ["1", "2", "alien bug"]))


def test_integer_labels_are_refused(digits2):
    with pytest.raises(netmeld.DataError, match="label names"):
        netmeld.meld(digits2.members, "calibrate", (digits2.pool[:2], [1, 2]))


def test_empty_data(digits2):
    with pytest.raises(netmeld.DataError, match="empty"):
        netmeld.meld(digits2.members, "infomax", torch.zeros(0, 1, 8, 8))
    with pytest.raises(netmeld.DataError, match="empty"):
        netmeld.evaluate(netmeld.meld(digits2.members), (torch.zeros(0, 1, 8, 8), []))


def test_wrong_input_shape(digits2):
    with pytest.raises(netmeld.DataError, match=r"\(3, 8, 8\).*expects \(1, 8, 8\)"):
        netmeld.meld(digits2.members, "infomax", torch.zeros(4, 3, 8, 8))


def test_unreadable_image_names_the_file(digits2, tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(netmeld.DataError, match=r"broken\.png"):
        netmeld.meld(digits2.members, "calibrate", tmp_path)


def test_empty_label_folder(digits2, tmp_path):
    (tmp_path / "3").mkdir()
    with pytest.raises(netmeld.DataError, match="has no images"):
        netmeld.meld(digits2.members, "calibrate", tmp_path)


def test_the_demo_without_scikit_learn_says_which_extra_to_install(monkeypatch):
    import sys

    from netmeld.demo.scenarios import load_digits_images

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if it were not installed
    with pytest.raises(netmeld.NetmeldError, match=r"pip install 'netmeld\[demo\]'"):
        load_digits_images()
