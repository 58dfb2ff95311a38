"""Loading a folder runs no code it names unless the user trusts it (issue 13, item 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import netmeld
from netmeld.members import trust

HOSTILE = [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("runpy:run_path", {"path_name": "{marker}"}),
    ("torch:load", {"f": "{marker}", "weights_only": False}),
    ("builtins:exec", {}),
]


def _saved(digits2, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    netmeld.meld(digits2.members, "concat").save(folder)
    return folder


def _tamper(folder: Path, spec: str, kwargs: dict) -> None:
    config = json.loads((folder / "netmeld.json").read_text())
    config["members"][0]["architecture"] = {"spec": spec, "kwargs": kwargs}
    (folder / "netmeld.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("spec", "kwargs"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_tampered_folder_naming_any_callable_is_refused_and_runs_nothing(
    digits2, tmp_path, spec, kwargs
):
    folder = _saved(digits2, tmp_path)
    marker = tmp_path / "ran"
    _tamper(folder, spec, json.loads(json.dumps(kwargs).replace("{marker}", str(marker))))
    with pytest.raises(netmeld.UntrustedCodeError, match=rf"'{spec}'.*trust_code=True"):
        netmeld.load(folder)
    assert not marker.exists()


def test_the_module_a_refused_builder_names_is_never_imported(digits2, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_netmeld_probe.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef build(**kw):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = _saved(digits2, tmp_path)
    _tamper(folder, "evil_netmeld_probe:build", {})
    with pytest.raises(netmeld.UntrustedCodeError):
        netmeld.load(folder)
    assert not marker.exists() and "evil_netmeld_probe" not in sys.modules


def test_a_user_builder_loads_with_trust_code_or_once_registered(digits2, tmp_path, monkeypatch):
    (tmp_path / "my_netmeld_arch.py").write_text(
        "from netmeld.zoo import small_cnn\n"
        "def build(num_classes, **kw):\n    return small_cnn(num_classes=num_classes, **kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = _saved(digits2, tmp_path)
    config = json.loads((folder / "netmeld.json").read_text())
    kwargs = config["members"][0]["architecture"]["kwargs"]
    _tamper(folder, "my_netmeld_arch:build", kwargs)
    x = digits2.test[0][:8]
    with torch.no_grad():
        expected = netmeld.meld(digits2.members, "concat")(x)
        torch.testing.assert_close(netmeld.load(folder, trust_code=True)(x), expected)
        with pytest.raises(netmeld.UntrustedCodeError):
            netmeld.load(folder)
        monkeypatch.setattr(trust, "_registered", set())
        netmeld.trust_builder("my_netmeld_arch:build")
        torch.testing.assert_close(netmeld.load(folder)(x), expected)


def test_python_code_builds_what_it_names_and_torchvision_names_are_trusted():
    # the user's own call is their choice; nothing is refused outside a file being read
    module = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 4}).build(num_classes=2)
    assert isinstance(module, torch.nn.Module)
    assert trust.is_trusted("torchvision:resnet18") and trust.is_trusted("netmeld.zoo:mlp")
    assert not trust.is_trusted("os:system") and not trust.is_trusted("netmeld.zoo:torch")
    with pytest.raises(netmeld.UntrustedCodeError, match=r"expected 'package\.module:callable'"):
        netmeld.trust_builder("nonsense")


def _recipe_naming(digits2, tmp_path: Path, spec: str, kwargs: dict) -> Path:
    from safetensors.torch import save_file

    members = []
    for m in digits2.members:
        save_file(m.module.state_dict(), str(tmp_path / f"{m.name}.safetensors"))
        members.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": spec,
                "architecture_kwargs": kwargs,
                "labels": list(m.labels),
                "preprocessing": {"input_shape": [1, 8, 8]},
            }
        )
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"members": members, "method": "concat"}))
    return path


@pytest.mark.parametrize("command", ["inspect", "meld"])
def test_cli_recipes_naming_a_callable_are_refused_and_run_nothing(
    digits2, tmp_path, capsys, command
):
    from netmeld.cli import main

    marker = tmp_path / "ran"
    recipe = _recipe_naming(digits2, tmp_path, "subprocess:run", {"args": ["touch", str(marker)]})
    argv = [command, str(recipe)] + (["-o", str(tmp_path / "out")] if command == "meld" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'subprocess:run'" in err and "--trust-code" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_folders_naming_a_callable_are_refused_in_every_reading_command(
    digits2, tmp_path, capsys
):
    from netmeld.cli import main

    folder = _saved(digits2, tmp_path)
    marker = tmp_path / "ran"
    _tamper(folder, "subprocess:run", {"args": ["touch", str(marker)]})
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    (tmp_path / "data" / "0").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "data" / "0" / "a.png")
    for argv in (
        ["eval", str(folder), "--data", str(tmp_path / "data")],
        ["predict", str(folder), str(image)],
        ["inspect", str(folder)],
        ["export", str(folder), "--onnx", str(tmp_path / "m.onnx")],
        ["extend", str(folder), "--examples", str(tmp_path / "data"), "-o", str(tmp_path / "e")],
    ):
        assert main(argv) == 2, argv
        assert "--trust-code" in capsys.readouterr().err, argv
    assert not marker.exists()


def test_cli_trust_code_lets_a_user_builder_run(digits2, tmp_path, monkeypatch, capsys):
    from netmeld.cli import main

    (tmp_path / "my_cli_arch.py").write_text(
        "from netmeld.zoo import small_cnn\n"
        "def build(num_classes, **kw):\n    return small_cnn(num_classes=num_classes, **kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    kwargs = {"in_channels": 1, "width": 16, "blocks": 2}
    recipe = _recipe_naming(digits2, tmp_path, "my_cli_arch:build", kwargs)
    assert main(["meld", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "'my_cli_arch:build'" in capsys.readouterr().err
    assert main(["meld", str(recipe), "-o", str(tmp_path / "out"), "--trust-code"]) == 0
    assert main(["inspect", str(tmp_path / "out")]) == 2
    assert main(["inspect", str(tmp_path / "out"), "--trust-code"]) == 0


def test_python_recipe_runners_refuse_untrusted_builders(digits2, tmp_path):
    from netmeld.cli.recipes import run_recipe

    marker = tmp_path / "ran"
    recipe = _recipe_naming(digits2, tmp_path, "subprocess:run", {"args": ["touch", str(marker)]})
    with pytest.raises(netmeld.UntrustedCodeError, match=r"recipe .*'subprocess:run'"):
        run_recipe(recipe)
    assert not marker.exists()
