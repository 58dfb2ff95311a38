"""Folders saved by netmeld 0.1.0 (before the package was reorganised) still load, and give the
outputs that release computed for them (``tests/fixtures/legacy-0.1.0``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import netmeld
from netmeld.errors import ModelFileError
from netmeld.model.artifact import BUILDER_ALIASES

os.environ.setdefault("KERAS_BACKEND", "torch")
ROOT = Path(__file__).resolve().parent / "fixtures" / "legacy-0.1.0"
FOLDERS = sorted(p.name for p in ROOT.iterdir() if (p / "netmeld.json").is_file())
NEEDS = {"keras-onnx-torch": ("keras", "onnx2torch")}


def test_every_kind_of_saved_model_is_a_fixture():
    assert len(FOLDERS) >= 13
    specs = {
        m["architecture"]["spec"]
        for f in FOLDERS
        for m in json.loads((ROOT / f / "netmeld.json").read_text())["members"]
    }
    assert set(BUILDER_ALIASES) <= specs  # every alias is exercised by a fixture


@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_saved_by_0_1_0_loads_with_the_same_outputs(name):
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module)
    config = json.loads((ROOT / name / "netmeld.json").read_text())
    assert config["format_version"] == 1
    probe = load_file(str(ROOT / name / "probe.safetensors"))
    model = netmeld.load(ROOT / name)
    with torch.no_grad():  # float32 rounding: the CPU's matmul kernels differ between machines
        torch.testing.assert_close(model(probe["input"]), probe["output"], atol=1e-5, rtol=1e-5)


def test_an_unknown_format_version_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((ROOT / "concat" / "netmeld.json").read_text())
    config["format_version"] = 99
    (folder / "netmeld.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="version 99"):
        netmeld.load(folder)


def test_new_folders_are_written_with_the_current_format_version(digits2, tmp_path):
    from netmeld.model.combined import FORMAT_VERSION

    netmeld.meld(digits2.members, "concat").save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "netmeld.json").read_text())["format_version"] == (
        FORMAT_VERSION
    )
    assert FORMAT_VERSION == 2


@pytest.mark.parametrize(
    ("old", "name"),
    [
        ("netmeld.combined", "load"),
        ("netmeld.bridges", "keras_member"),
        ("netmeld.scenarios", "digits_scenario"),
        ("netmeld.shards", "CheckpointReader"),
        ("netmeld.methods.weights", "merge_members"),
    ],
)
def test_old_import_paths_work_with_a_deprecation_warning(old, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert callable(getattr(module, name))
    with pytest.raises(AttributeError, match="has no 'nope'"):
        _ = module.nope


def test_an_old_module_path_that_is_now_a_function_keeps_both():
    import netmeld
    from netmeld.io.checkpoint_merge import merge_weights, read_merge_recipe

    with pytest.warns(DeprecationWarning, match="netmeld.merge_weights moved to"):
        from netmeld.merge_weights import read_merge_recipe as old

    assert old is read_merge_recipe
    assert netmeld.merge_weights is merge_weights  # the function, not the old module


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("fit", "train"),
        ("parallel", "fusion.parallel"),
        ("keras_member", "Member.from_keras"),
        ("keras_members", "Member.from_keras_outputs"),
        ("onnx_member", "Member.from_onnx"),
        ("export_onnx", "export"),
    ],
)
def test_renamed_names_still_answer_with_a_deprecation_warning_naming_the_new_one(old, new):
    expected: object = netmeld
    for part in new.split("."):
        expected = getattr(expected, part)
    with pytest.warns(DeprecationWarning, match=rf"netmeld\.{old} is now netmeld\.{new}"):
        got = getattr(netmeld, old)
    assert got == expected
    assert old not in netmeld.__all__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = netmeld.nope


def test_fusion_fit_is_netmeld_train_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="is now netmeld.train"):
        got = netmeld.fusion.fit
    assert got is netmeld.train
