"""--overwrite replaces only what netmeld wrote (issue 13, item 2): every folder it writes
holds a marker, and a file, a link or a folder of the user's is refused and left untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import netmeld
from netmeld._outputs import MARKER
from netmeld.cli import main

from .test_merge_weights import _recipe, checkpoints  # noqa: F401 (the fixture)

LEGACY = Path(__file__).parent / "fixtures" / "legacy-0.1.0" / "concat"


def _foreign(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.txt").write_text("years of work")
    return path


def test_merge_weights_overwrite_leaves_a_foreign_folder_alone(checkpoints, capsys):  # noqa: F811
    tmp_path = checkpoints[0]
    out = _foreign(tmp_path / "out")
    assert main(["merge-weights", _recipe(tmp_path), "-o", str(out), "--overwrite"]) == 2
    assert "not a folder netmeld wrote" in capsys.readouterr().err
    assert (out / "thesis.txt").read_text() == "years of work" and len(list(out.iterdir())) == 1
    shutil.rmtree(out)
    assert main(["merge-weights", _recipe(tmp_path), "-o", str(out)]) == 0
    assert (out / MARKER).is_file()
    assert main(["merge-weights", _recipe(tmp_path), "-o", str(out), "--overwrite"]) == 0


def test_save_overwrite_replaces_only_netmeld_folders(digits2, tmp_path):
    model = netmeld.meld(digits2.members, "concat")
    foreign = _foreign(tmp_path / "mine")
    with pytest.raises(netmeld.ModelFileError, match="not a folder netmeld wrote"):
        model.save(foreign, overwrite=True)
    assert (foreign / "thesis.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(netmeld.ModelFileError, match="is a file"):
        model.save(tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(netmeld.ModelFileError, match="symbolic link"):
        model.save(tmp_path / "link", overwrite=True)
    assert not (tmp_path / "nowhere").exists()
    ours = model.save(tmp_path / "ours")
    assert (ours / MARKER).is_file()
    with pytest.raises(netmeld.ModelFileError, match="exists; pass overwrite"):
        model.save(ours)
    model.save(ours, overwrite=True)
    legacy = Path(shutil.copytree(LEGACY, tmp_path / "legacy"))  # 0.1.0 wrote no marker
    model.save(legacy, overwrite=True)
    x = digits2.test[0][:4]
    assert torch.equal(netmeld.load(legacy)(x), model(x))


def test_every_cli_writer_refuses_a_foreign_output(digits2, tmp_path, capsys):
    model_dir = netmeld.meld(digits2.members, "concat").save(tmp_path / "m")
    foreign = _foreign(tmp_path / "foreign")
    (tmp_path / "ex" / "new").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / "ex" / "new" / f"{i}.png")
    argv = ["extend", str(model_dir), "--examples", str(tmp_path / "ex"), "-o", str(foreign)]
    assert main([*argv, "--steps", "0", "--overwrite"]) == 2
    assert "not a folder netmeld wrote" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["thesis.txt"]


@pytest.mark.parametrize("weight", ["abc", None, True, [{"value": "x"}]])
def test_merge_recipe_weights_must_be_numbers(checkpoints, weight, capsys):  # noqa: F811
    tmp_path = checkpoints[0]
    models = [{"model": "a", "parameters": {"weight": weight}}, {"model": "b"}]
    recipe = _recipe(tmp_path, models=models)
    assert main(["merge-weights", recipe, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "models[0] ('a'): weight" in err and "unexpected" not in err
    assert not (tmp_path / "out").exists()


def test_merge_weights_twice_gives_the_same_bytes(checkpoints):  # noqa: F811
    tmp_path = checkpoints[0]
    recipe = _recipe(tmp_path, merge_method="dare", parameters={"seed": 3})  # a random mask
    outs = []
    for i in range(2):
        torch.manual_seed(i)
        assert main(["merge-weights", recipe, "-o", str(tmp_path / f"o{i}")]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"o{i}").iterdir())})
    assert outs[0] == outs[1]
    other = _recipe(tmp_path, merge_method="dare", parameters={"seed": 4})
    assert main(["merge-weights", other, "-o", str(tmp_path / "o2")]) == 0
    again = {p.name: p.read_bytes() for p in sorted((tmp_path / "o2").iterdir())}
    assert again != outs[0]


def test_export_overwrite_replaces_only_an_onnx_file_netmeld_wrote(digits2, tmp_path):
    pytest.importorskip("onnx")
    model = netmeld.meld(digits2.members, "concat")
    mine = tmp_path / "notes.onnx"
    mine.write_text("my notes")
    with pytest.raises(netmeld.ModelFileError, match="not an ONNX file netmeld wrote"):
        netmeld.export(model, mine, overwrite=True, check=False)
    assert mine.read_text() == "my notes"
    ours = tmp_path / "m.onnx"
    netmeld.export(model, ours, check=False)
    netmeld.export(model, ours, overwrite=True, check=False)  # ours: replaced
    with pytest.raises(netmeld.ModelFileError, match="exists; pass overwrite"):
        netmeld.export(model, ours, check=False)


def test_predictions_and_statistics_replace_only_files_netmeld_wrote(digits2, tmp_path, capsys):
    from PIL import Image

    from netmeld.methods.statistics import feature_statistics

    model_dir = netmeld.meld(digits2.members, "concat").save(tmp_path / "m")
    Image.new("L", (8, 8), color=90).save(tmp_path / "x.png")
    out = tmp_path / "preds.csv"
    argv = ["predict", str(model_dir), str(tmp_path / "x.png"), "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    mine = tmp_path / "mine.csv"
    mine.write_text("name,score\nalice,3\n")
    assert main([*argv[:-1], str(mine), "--overwrite"]) == 2
    assert "not a predictions file netmeld wrote" in capsys.readouterr().err
    assert mine.read_text() == "name,score\nalice,3\n"

    member = digits2.members[0]
    rows = [i for i, label in enumerate(digits2.pool_labels) if label in member.labels][:40]
    stats = feature_statistics(member, (digits2.pool[rows], [digits2.pool_labels[i] for i in rows]))
    path = stats.save(tmp_path / "a.stats")
    with pytest.raises(netmeld.ModelFileError, match="exists; pass --overwrite"):
        stats.save(path)
    stats.save(path, overwrite=True)
    (tmp_path / "thesis.stats").write_bytes(b"my own file")
    with pytest.raises(netmeld.ModelFileError, match="not a statistics file netmeld wrote"):
        stats.save(tmp_path / "thesis.stats", overwrite=True)
    assert (tmp_path / "thesis.stats").read_bytes() == b"my own file"
