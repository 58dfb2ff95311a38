"""The command line: recipes, meld, eval, predict, inspect, and one-line errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import netmeld
from netmeld.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits2):
    """Members saved as checkpoints, a recipe, and labeled/unlabeled image folders."""
    root = tmp_path_factory.mktemp("cli")
    members = []
    for m in digits2.members:
        save_file(m.module.state_dict(), str(root / f"{m.name}.safetensors"))
        members.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": "netmeld.zoo:small_cnn",
                "architecture_kwargs": {"in_channels": 1, "width": 16, "blocks": 2},
                "labels": list(m.labels),
                "preprocessing": {"input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4]},
            }
        )
    x, labels = digits2.test
    for i, (img, label) in enumerate(zip(x[:120], labels[:120], strict=True)):
        folder = root / "test" / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    (root / "unlabeled").mkdir()
    for i, img in enumerate(digits2.pool[:200]):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(
            root / "unlabeled" / f"{i}.png"
        )
    recipe = {"members": members, "method": "infomax", "data": "unlabeled"}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def test_meld_eval_predict_from_a_recipe(workspace, capsys):
    out = workspace / "model"
    assert main(["meld", str(workspace / "recipe.yaml"), "-o", str(out)]) == 0
    model = netmeld.load(out)
    assert model.method["name"] == "infomax" and model.method["examples"] == 200
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(workspace / "test"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["examples"] == 120 and report["union_accuracy"] > 0.7
    image = workspace / "test" / "3" / next(p.name for p in (workspace / "test" / "3").iterdir())
    assert main(["predict", str(out), str(image), "--json", "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["file"] == str(image) and len(rows[0]["predictions"]) == 2
    assert rows[0]["predictions"][0][0] in model.labels


def test_recipe_melds_the_same_model_as_the_python_api(workspace, digits2, tmp_path):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["method"] = "weight-norm"
    recipe.pop("data")
    (workspace / "wn.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(workspace / "wn.yaml"), "-o", str(tmp_path / "wn")]) == 0
    via_cli = netmeld.load(tmp_path / "wn")
    via_api = netmeld.meld(digits2.members, "weight-norm")
    x = digits2.test[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(via_cli(x), via_api(x))


def test_a_semi_supervised_recipe_reads_labels_and_unlabeled_images(workspace, tmp_path):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe.update(method="semi", data="test", unlabeled="unlabeled")
    (workspace / "semi.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(workspace / "semi.yaml"), "-o", str(tmp_path / "semi")]) == 0
    model = netmeld.load(tmp_path / "semi")
    assert model.method["name"] == "semi"
    assert model.method["fitted"] == {"labeled": 120, "unlabeled": 200}


def test_a_recipe_giving_unlabeled_images_to_a_method_that_reads_none_fails(
    workspace, tmp_path, capsys
):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["unlabeled"] = "unlabeled"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "method 'infomax' reads no 'unlabeled' data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inspect_reports_the_shared_trunk(workspace, capsys):
    assert main(["inspect", str(workspace / "recipe.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["shared_with"] for r in rows] == [["m2"], ["m1"]]
    assert rows[0]["diverges_at"] == "at head 'fc'"
    assert rows[0]["trunk_parameters"] == rows[1]["trunk_parameters"] > 0


def test_errors_are_one_line_and_debug_shows_the_traceback(workspace, tmp_path, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["method"] = "averaging"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["meld", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'averaging'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(netmeld.RecipeError):
        main(["--debug", "meld", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o")])


def test_recipe_missing_data_for_a_data_method_fails_before_loading(workspace, tmp_path, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe.pop("data")
    recipe["members"][0]["checkpoint"] = "does-not-exist.safetensors"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "needs unlabeled data" in capsys.readouterr().err


def test_meld_refuses_to_overwrite(workspace, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["meld", str(workspace / "recipe.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in netmeld.list_methods():
        assert name in out
    from netmeld.ops.merge import KERNELS

    for name in KERNELS:
        assert name in out


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from netmeld.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_and_every_option_is_documented():
    commands = _subcommands()
    assert {"meld", "eval", "predict", "inspect", "demo", "merge-weights", "distill"} <= set(
        commands
    )
    for name, parser in commands.items():
        assert parser.description, f"netmeld {name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"netmeld {name} {what}"
            assert len(action.help) >= 10, f"netmeld {name} {what}: {action.help!r} says little"


def test_inspect_checkpoints_with_an_architecture(workspace, capsys):
    args = [
        "inspect",
        str(workspace / "m1.safetensors"),
        str(workspace / "m2.safetensors"),
        "--arch",
        "netmeld.zoo:small_cnn",
    ]
    assert main(args) == 2  # the default width does not fit these checkpoints
    assert "has shape" in capsys.readouterr().err
    kwargs = json.dumps({"in_channels": 1, "width": 16, "blocks": 2})
    assert main([*args, "--arch-kwargs", kwargs, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["member"] for r in rows] == ["m1", "m2"]
    assert rows[0]["shared_with"] == ["m2"] and rows[0]["trunk_parameters"] > 0


def test_distill_from_a_recipe_with_checkpoints(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    distill_recipe = {
        "teachers": recipe["members"],
        "union": "infomax",
        "data": "unlabeled",
        "schedule": {"epochs": 3, "batch_size": 32},
    }
    path = workspace / "distill.yaml"
    path.write_text(yaml.safe_dump(distill_recipe))
    out, ckpt = workspace / "student", workspace / "ckpt"
    assert main(["distill", str(path), "-o", str(out), "--checkpoint-dir", str(ckpt)]) == 0
    assert "distilled a student over 10 labels" in capsys.readouterr().out
    student = netmeld.load(out)
    assert sorted(student.labels) == sorted(str(d) for d in range(10))
    assert student.method["name"] == "distill"
    assert (ckpt / "last" / "state.safetensors").is_file()
    # resuming a finished run trains nothing more and gives the same student
    again = workspace / "student2"
    assert (
        main(["distill", str(path), "-o", str(again), "--checkpoint-dir", str(ckpt), "--resume"])
        == 0
    )
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(netmeld.load(again)(x), student(x))
    del distill_recipe["data"]
    path.write_text(yaml.safe_dump(distill_recipe))
    assert main(["distill", str(path), "-o", str(workspace / "s3")]) == 2
    assert "data_free" in capsys.readouterr().err


def test_python_inspect_gives_the_rows_of_the_cli(workspace, digits2, capsys):
    assert main(["inspect", str(workspace / "recipe.yaml"), "--json"]) == 0
    cli_rows = json.loads(capsys.readouterr().out)
    from_file = netmeld.inspect(workspace / "recipe.yaml")
    from_members = netmeld.inspect(digits2.members)
    assert from_file == cli_rows
    assert [r["labels"] for r in from_file] == [list(m.labels) for m in digits2.members]
    for a, b in zip(from_file, from_members, strict=True):
        assert a | {"labels": None} == b | {"labels": None}
    model = netmeld.meld(digits2.members, "concat")
    assert netmeld.inspect(model) == from_members


def test_python_inspect_names_what_it_cannot_read(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(netmeld.MemberError, match="architecture="):
        netmeld.inspect(tmp_path / "w.safetensors")


def test_train_recipe_and_netmeld_train_share_their_default_schedule():
    import inspect as pyinspect

    from netmeld.cli.recipes import DistillSchedule, TrainSchedule

    for schedule, fn in ((TrainSchedule(), netmeld.train), (DistillSchedule(), netmeld.distill)):
        defaults = {
            k: v.default
            for k, v in pyinspect.signature(fn).parameters.items()
            if k in ("epochs", "batch_size", "lr")
        }
        assert defaults == {k: getattr(schedule, k) for k in defaults}, fn.__name__
        assert len(defaults) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "m", "--data", "d", "--batch-size", "0"], "--batch-size: 0 must be > 0"),
        (["predict", "m", "x.png", "--top", "-1"], "--top: -1 must be > 0"),
        (["extend", "m", "--examples", "e", "-o", "o", "--lr", "nan"], "not a finite number"),
        (["extend", "m", "--examples", "e", "-o", "o", "--steps", "x"], "'x' is not an integer"),
        (["extend", "m", "--examples", "e", "-o", "o", "--max-false-positives", "1"], "< 1"),
    ],
)
def test_bad_option_values_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
