"""A saved folder is validated whole before anything is built: tampered netmeld.json files and
safetensors files end in a ModelFileError naming the file and the key, never in a raw Python
exception, a huge allocation or a model with non-finite numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import netmeld
from netmeld.errors import ModelFileError

from ._members import mlp_member


def _member(name: str, labels: list[str], seed: int) -> netmeld.Member:
    return mlp_member(name, labels, seed, features=6, hidden=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = netmeld.meld([_member("a", ["x", "y"], 0), _member("b", ["z", "w"], 1)], "concat")
    model.save(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def _edit_json(folder: Path, edit) -> None:
    path = folder / "netmeld.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_the_untampered_folder_loads_with_equal_outputs(saved):
    model = netmeld.load(saved)
    x = torch.randn(5, 6)
    again = netmeld.load(saved)
    assert torch.equal(model(x), again(x))


JSON_TAMPERS = {
    "array": (lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "null": (lambda p: p.write_text("null"), "expected a JSON object"),
    "not utf-8": (lambda p: p.write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "deep nesting": (lambda p: p.write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    "truncated": (lambda p: p.write_text(p.read_text()[:50]), "not valid JSON"),
    "NaN std": (
        lambda p: p.write_text(p.read_text().replace('"std": null', '"std": [NaN]')),
        "non-finite number NaN",
    ),
}


@pytest.mark.parametrize("case", sorted(JSON_TAMPERS))
def test_garbled_json_is_a_clear_error(saved, tmp_path, case):
    folder = _copy(saved, tmp_path)
    tamper, message = JSON_TAMPERS[case]
    if case == "NaN std":  # a normalised member first, so the std key holds numbers
        _edit_json(folder, lambda c: c["members"][0]["preprocessing"].update(std=None))
    tamper(folder / "netmeld.json")
    with pytest.raises(ModelFileError, match=message):
        netmeld.load(folder)


FIELD_TAMPERS = {
    "members missing": (lambda c: c.pop("members"), "members"),
    "members not a list": (lambda c: c.update(members={"a": 1}), "members"),
    "labels a number": (lambda c: c["members"][0].update(labels=3), "labels"),
    "no labels": (lambda c: c["members"][0].update(labels=[]), "labels"),
    "unknown key": (lambda c: c.update(surprise=1), "surprise"),
    "architecture without spec": (lambda c: c["members"][0]["architecture"].pop("spec"), "spec"),
    "plan names a stranger": (lambda c: c["plan"][0].update(members=["q"]), "unknown members"),
    "negative cut": (lambda c: c["plan"][0].update(cut=-1), "cut"),
    "two members alike": (lambda c: c["members"][1].update(name="a"), "named alike"),
    "router source": (lambda c: c["union"].update(router_source="x"), "router_source"),
    "negative std": (
        lambda c: c["members"][0]["preprocessing"].update(mean=[0.0], std=[-1.0]),
        "member 'a'.*std must be positive",
    ),
    "huge width": (
        lambda c: c["members"][0]["architecture"]["kwargs"].update(hidden=10**7),
        "member 'a'.*refusing to build it",
    ),
    "missing kwargs": (
        lambda c: c["members"][0]["architecture"].update(kwargs={}),
        "member 'a'.*in_features",
    ),
    "huge router": (lambda c: c["union"].update(router_dim=10**12), "router_dim.*refusing"),
    "huge input": (lambda c: c.update(input_shape=[10**6, 10**6]), "input_shape|refusing"),
    "other format": (lambda c: c.update(format="other"), "expected netmeld version"),
}


@pytest.mark.parametrize("case", sorted(FIELD_TAMPERS))
def test_tampered_fields_are_named(saved, tmp_path, case):
    folder = _copy(saved, tmp_path)
    tamper, message = FIELD_TAMPERS[case]
    _edit_json(folder, tamper)
    with pytest.raises(ModelFileError, match=message):
        netmeld.load(folder)


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _first_weight(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if k.endswith("weight"))


TENSOR_TAMPERS = {
    "NaN weight": (
        lambda t: t[_first_weight(t)].view(-1).__setitem__(0, float("nan")),
        "non-finite",
    ),
    "wrong dtype": (
        lambda t: t.update({_first_weight(t): t[_first_weight(t)].double()}),
        "is F64, expected F32",
    ),
    "int weights": (
        lambda t: t.update({_first_weight(t): t[_first_weight(t)].long()}),
        "is I64, expected F32",
    ),
    "wrong shape": (lambda t: t.update({_first_weight(t): torch.zeros(1)}), "has shape"),
    "missing tensor": (lambda t: t.pop(_first_weight(t)), "is missing"),
    "extra tensor": (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor 'extra'"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_TAMPERS))
def test_tampered_tensors_are_named(saved, tmp_path, case):
    folder = _copy(saved, tmp_path)
    tamper, message = TENSOR_TAMPERS[case]
    _edit_tensors(folder, tamper)
    with pytest.raises(ModelFileError, match=message):
        netmeld.load(folder)


@pytest.mark.parametrize("cut", [0, 8, 100])
def test_corrupt_safetensors_is_a_clear_error(saved, tmp_path, cut):
    folder = _copy(saved, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:cut] + b"\x00garbage")
    with pytest.raises(ModelFileError, match=r"model\.safetensors"):
        netmeld.load(folder)


def test_negative_batchnorm_variance_is_refused(tmp_path):
    torch.manual_seed(0)
    arch = netmeld.Architecture(
        "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 4, "blocks": 1}
    )
    member = netmeld.Member(
        arch.build(num_classes=2),
        ["p", "q"],
        name="c",
        preprocessing={"input_shape": (1, 8, 8)},
        architecture=arch,
    )
    netmeld.meld([member], "concat").save(tmp_path / "m")

    def negative(t):
        key = next(k for k in t if k.endswith("running_var"))
        t[key][0] = -1.0

    _edit_tensors(tmp_path / "m", negative)
    with pytest.raises(ModelFileError, match=r"running_var.*negative"):
        netmeld.load(tmp_path / "m")


def test_a_member_whose_architecture_cannot_rebuild_it_is_not_saved(tmp_path):
    torch.manual_seed(0)
    module = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 6, "hidden": 8}).build(
        num_classes=2
    )
    no_kwargs = netmeld.Member(
        module,
        ["x", "y"],
        name="a",
        preprocessing={"input_shape": (6,)},
        architecture=netmeld.Architecture("netmeld.zoo:mlp"),
    )
    with pytest.raises(ModelFileError, match=r"member 'a'.*cannot be rebuilt.*in_features"):
        netmeld.meld([no_kwargs], "concat").save(tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())
    wrong_width = netmeld.Member(
        module,
        ["x", "y"],
        name="a",
        preprocessing={"input_shape": (6,)},
        architecture=netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 6, "hidden": 9}),
    )
    with pytest.raises(ModelFileError, match=r"tensors differ.*architecture_kwargs"):
        netmeld.meld([wrong_width], "concat").save(tmp_path / "m")
    assert not list(tmp_path.iterdir())
