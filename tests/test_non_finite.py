"""Non-finite values are refused, naming where they are (issue 13, item 4): inputs to predict,
evaluate and meld, CSV cells, preprocessing; and a fit that diverges."""

from __future__ import annotations

import warnings

import pytest
import torch

import netmeld
from netmeld.errors import DataError, MemberError, MethodError


def _poisoned(x: torch.Tensor, at: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[at].view(-1)[3] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_predict_evaluate_and_meld_refuse_non_finite_inputs(digits2, value):
    model = netmeld.meld(digits2.members, "concat")
    x, labels = digits2.test[0][:40], digits2.test[1][:40]
    bad = _poisoned(x, 7, value)
    with pytest.raises(DataError, match="input 7 holds NaN or infinite"):
        model.predict(bad)
    with pytest.raises(DataError, match="input 7 holds NaN or infinite"):
        model.predict_proba(bad)
    with pytest.raises(DataError, match="input 7"):
        netmeld.evaluate(model, (bad, labels))
    with pytest.raises(DataError, match="input 7"):
        netmeld.meld(digits2.members, "infomax", _poisoned(digits2.pool[:100], 7, value))


def test_csv_cells_that_are_not_finite_name_row_and_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,nan,y\n")
    with pytest.raises(DataError, match=r"row 3, column 'b': 'nan' is not a finite number"):
        netmeld.load_data(tmp_path / "t.csv", (2,))
    (tmp_path / "l.csv").write_bytes("a,b,label\n1,2,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        netmeld.load_data(tmp_path / "l.csv", (2,))


@pytest.mark.parametrize("std", [float("nan"), float("inf")])
def test_preprocessing_refuses_non_finite_statistics(std):
    with pytest.raises(MemberError, match="std must be finite"):
        netmeld.Preprocessing((1, 8, 8), mean=(0.5,), std=(std,))


def test_a_diverged_fit_is_refused(digits2):
    few = list(range(60))
    data = (digits2.pool[few], [digits2.pool_labels[i] for i in few])
    with pytest.raises(MethodError, match="non-finite values"):
        netmeld.meld(digits2.members, "finetune", data, params={"lr": 1e30, "steps": 20})


def test_labeled_data_of_one_class_is_refused(digits2):
    idx = [i for i, label in enumerate(digits2.pool_labels) if label == "3"][:30]
    data = (digits2.pool[idx], [digits2.pool_labels[i] for i in idx])
    with pytest.raises(DataError, match=r"at least two labels.*only \['3'\]"):
        netmeld.meld(digits2.members, "calibrate", data)


def test_fewer_examples_than_fitted_numbers_without_a_penalty_warn(digits2):
    few = list(range(20))
    data = (digits2.pool[few], [digits2.pool_labels[i] for i in few])
    with pytest.warns(
        netmeld.UnderdeterminedFitWarning, match=r"finetune fits [\d,]{3,} numbers from 20 examples"
    ):
        netmeld.meld(digits2.members, "finetune", data, params={"anchor": 0, "steps": 5})
    with pytest.warns(netmeld.UnderdeterminedFitWarning, match="transfer fits .* from 20 examples"):
        netmeld.meld(digits2.members, "transfer", data, params={"weight_decay": 0, "steps": 5})
    with warnings.catch_warnings():  # a penalty pins the answer down: no warning
        warnings.simplefilter("error", netmeld.UnderdeterminedFitWarning)
        netmeld.meld(digits2.members, "finetune", data, params={"steps": 5})


def test_a_member_whose_labels_never_occur_is_named(digits2):
    first = set(digits2.members[0].labels)
    idx = [i for i, label in enumerate(digits2.pool_labels) if label not in first][:60]
    data = (digits2.pool[idx], [digits2.pool_labels[i] for i in idx])
    name = digits2.members[0].name
    with pytest.warns(UserWarning, match=rf"label of member '{name}'"):
        netmeld.meld(digits2.members, "stack", data)


def test_files_an_image_folder_does_not_read_are_named(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"1 files are not images.*notes\.txt"):
        data = netmeld.load_data(tmp_path, (1, 8, 8))
    assert len(data) == 1
    (tmp_path / "cat" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"b\.png.*cannot be read"):
        netmeld.load_data(tmp_path, (1, 8, 8))


def test_skip_unreadable_leaves_out_and_names_broken_images(digits2, tmp_path, capsys):
    from PIL import Image

    from netmeld.cli import main

    for label in ("0", "1"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=60 * i).save(tmp_path / "d" / label / f"{i}.png")
    (tmp_path / "d" / "1" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"skipped 1 of 5 images.*broken\.png"):
        data = netmeld.load_data(tmp_path / "d", (1, 8, 8), skip_unreadable=True)
    assert len(data) == 4 and data.labels == ["0", "0", "1", "1"]
    model = netmeld.meld(digits2.members, "concat").save(tmp_path / "m")
    assert main(["eval", str(model), "--data", str(tmp_path / "d")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["eval", str(model), "--data", str(tmp_path / "d"), "--skip-unreadable"]) == 0
    capsys.readouterr()
    files = [str(tmp_path / "d" / "0" / "0.png"), str(tmp_path / "d" / "1" / "broken.png")]
    assert main(["predict", str(model), *files, "--json", "--skip-unreadable"]) == 0
    out = capsys.readouterr()
    import json

    assert [r["file"] for r in json.loads(out.out)] == files[:1]
    assert "skipped 1 of 2 images" in out.err and "broken.png" in out.err
