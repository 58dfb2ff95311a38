"""Few-shot class extension: old outputs kept, new classes learned, save/load, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import netmeld
from netmeld.cli import main
from netmeld.demo.scenarios import Scenario, digits_scenario, few_per_class

OLD = [str(d) for d in range(8)]
NEW = ["8", "9"]


@pytest.fixture(scope="module")
def digits8() -> Scenario:
    """Members that know only the digits 0-7 (0-3 | 4-7); pool and test hold all ten."""
    return digits_scenario([[0, 1, 2, 3], [4, 5, 6, 7]], seed=0)


@pytest.fixture(scope="module")
def base(digits8) -> netmeld.CombinedModel:
    few = [i for i in few_per_class(digits8.pool_labels, 5) if digits8.pool_labels[i] in OLD]
    data = digits8.pool[few], [digits8.pool_labels[i] for i in few]
    return netmeld.meld(digits8.members, "calibrate", data)


@pytest.fixture(scope="module")
def shots(digits8):
    """10 examples each of '8' then '9', and the other old-class pool inputs (unlabeled)."""
    labels = digits8.pool_labels
    chosen = [i for i in few_per_class(labels, 10, seed=1) if labels[i] in NEW]
    chosen.sort(key=lambda i: (labels[i], i))  # all the 8s first: new labels keep that order
    taken = set(chosen)
    unlabeled = [i for i, v in enumerate(digits8.pool_labels) if v in OLD and i not in taken]
    return (
        digits8.pool[chosen],
        [digits8.pool_labels[i] for i in chosen],
        digits8.pool[unlabeled],
    )


def _split(test: tuple[torch.Tensor, list[str]], labels: list[str]):
    rows = [i for i, v in enumerate(test[1]) if v in labels]
    return test[0][rows], [test[1][i] for i in rows]


def _accuracy(model: netmeld.CombinedModel, data) -> float:
    preds = model.predict(data[0])
    return sum(p == t for p, t in zip(preds, data[1], strict=True)) / len(preds)


@pytest.fixture(scope="module")
def imprinted(base, shots):
    x, y, unlabeled = shots
    return netmeld.extend(base, x, y, unlabeled=unlabeled, steps=0)


@pytest.fixture(scope="module")
def tuned(base, shots):
    x, y, unlabeled = shots
    return netmeld.extend(base, x, y, unlabeled=unlabeled, steps=300)


def test_the_base_model_knows_only_the_old_digits(base):
    assert base.labels == OLD


def test_imprinting_keeps_the_old_logits_exactly(base, imprinted, digits8):
    assert imprinted.labels == OLD + NEW
    assert imprinted.label_members["8"] == [] and imprinted.label_members["3"] == ["m1"]
    x = digits8.test[0]
    with torch.no_grad():
        assert torch.equal(imprinted(x)[:, : len(OLD)], base(x))


@pytest.mark.parametrize("steps", [0, 50])
def test_extend_never_changes_the_model_given(base, shots, digits8, steps):
    x = digits8.test[0][:64]
    with torch.no_grad():
        before = base(x).clone()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    netmeld.extend(base, shots[0], shots[1], unlabeled=shots[2][:100], steps=steps)
    assert base.labels == OLD and base.extension is None
    assert "extended" not in base.method
    with torch.no_grad():
        assert torch.equal(base(x), before)
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fine_tuned_extension_agrees_with_the_base_on_old_classes(base, tuned, digits8):
    old_x, _ = _split(digits8.test, OLD)
    with torch.no_grad():
        assert torch.equal(tuned(old_x)[:, : len(OLD)], base(old_x))  # old columns never move
    agree = np.mean(
        [a == b for a, b in zip(tuned.predict(old_x), base.predict(old_x), strict=True)]
    )
    assert agree >= 0.98, agree  # measured 0.993 (default false-positive budget 0.005)


def test_new_classes_are_learned_and_old_ones_kept(base, imprinted, tuned, shots, digits8):
    new = _split(digits8.test, NEW)
    old = _split(digits8.test, OLD)
    base_old = _accuracy(base, old)
    # the default budget keeps old digits (measured: 0.817 base, 0.813 / 0.810 after) and
    # still learns some of the new ones on this weak 8x8 trunk (0.21 / 0.27; chance 0.1)
    for model in (imprinted, tuned):
        assert _accuracy(model, old) >= base_old - 0.02
        assert _accuracy(model, new) > 0.15
    assert _accuracy(tuned, new) >= _accuracy(imprinted, new)
    history = tuned.method["extended"]
    assert len(history) == 1 and history[0]["labels"] == NEW
    assert history[0]["examples"] == {"8": 10, "9": 10}
    assert history[0]["unlabeled"] == len(shots[2]) and history[0]["steps"] == 300


def test_a_larger_false_positive_budget_trades_old_accuracy_for_new(base, shots, digits8):
    x, y, unlabeled = shots
    new = _split(digits8.test, NEW)
    old = _split(digits8.test, OLD)
    wide = netmeld.extend(base, x, y, unlabeled=unlabeled, max_false_positives=0.1)
    # measured: new 0.66, old 0.72 (base 0.82): each new class may claim 5 % of old inputs
    assert _accuracy(wide, new) > 0.5
    assert base_old_drop(base, wide, old) < 0.15
    with pytest.raises(ValueError, match="max_false_positives"):
        netmeld.extend(base, x, y, unlabeled=unlabeled, max_false_positives=1.5)


def base_old_drop(base, model, old) -> float:
    return _accuracy(base, old) - _accuracy(model, old)


def test_extended_model_saves_and_loads(tuned, digits8, tmp_path):
    tuned.save(tmp_path / "m")
    loaded = netmeld.load(tmp_path / "m")
    assert loaded.labels == OLD + NEW
    assert loaded.extension is not None and loaded.extension.labels == NEW
    x = digits8.test[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=0)
    assert loaded.method["extended"] == tuned.method["extended"]


def test_extending_twice_keeps_the_first_added_class(base, shots, digits8, tmp_path):
    x, y, unlabeled = shots
    eights = [i for i, v in enumerate(y) if v == "8"]
    nines = [i for i, v in enumerate(y) if v == "9"]
    wide = {"unlabeled": unlabeled, "steps": 50, "max_false_positives": 0.1}
    once = netmeld.extend(base, x[eights], ["8"] * len(eights), **wide)
    twice = netmeld.extend(once, x[nines], ["9"] * len(nines), **wide)
    assert once.labels == [*OLD, "8"] and twice.labels == OLD + NEW
    assert len(twice.method["extended"]) == 2
    first, second = once.extension, twice.extension
    assert first is not None and second is not None and second.labels == NEW
    assert torch.equal(second.weight[0], first.weight[0])
    assert torch.equal(second.bias[0], first.bias[0])
    assert torch.equal(second.center, first.center)
    assert torch.equal(second.log_scale, first.log_scale)
    test_x = digits8.test[0]
    with torch.no_grad():
        a, b = once(test_x), twice(test_x)
    assert torch.equal(b[:, : len(OLD)], a[:, : len(OLD)])
    # the same parameters; a wider matrix product may round differently in the last bit
    torch.testing.assert_close(b[:, len(OLD)], a[:, len(OLD)], rtol=1e-6, atol=1e-5)
    assert _accuracy(twice, _split(digits8.test, ["9"])) > 0.3  # chance 0.1
    twice.save(tmp_path / "twice")
    with torch.no_grad():
        torch.testing.assert_close(netmeld.load(tmp_path / "twice")(test_x), b, rtol=0, atol=0)


# -- errors ---------------------------------------------------------------------------------


def test_examples_of_known_labels_only_are_refused(base, digits8):
    x, y = _split(digits8.test, ["3", "5"])
    with pytest.raises(netmeld.LabelError, match="every label is known to the model already"):
        netmeld.extend(base, x[:10], y[:10])


def test_bad_settings_are_refused(base, shots):
    with pytest.raises(ValueError, match="lr and scale > 0"):
        netmeld.extend(base, shots[0], shots[1], lr=0)
    with pytest.raises(ValueError, match="steps and distill must be >= 0"):
        netmeld.extend(base, shots[0], shots[1], steps=-1)


def _save_png(path, image: torch.Tensor) -> None:
    array = (image[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def _image_folder(root, x: torch.Tensor, labels: list[str]):
    for i, (image, label) in enumerate(zip(x, labels, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        _save_png(root / label / f"{i}.png", image)
    return root


def test_empty_example_folders_are_data_errors(base, shots, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(netmeld.DataError, match="has no images and no label subfolders"):
        netmeld.extend(base, tmp_path / "empty")
    folder = _image_folder(tmp_path / "ex", shots[0][:3], ["8"] * 3)
    (folder / "9").mkdir()
    with pytest.raises(netmeld.DataError, match=r"label folder '.*ex[/\\]9' has no images"):
        netmeld.extend(base, folder)


def test_a_folder_with_an_old_label_uses_it_as_old_class_examples(base, shots, digits8, tmp_path):
    old_x, old_y = _split(digits8.test, ["2"])
    x = torch.cat([shots[0][:10], old_x[:5]])
    folder = _image_folder(tmp_path / "ex", x, [*shots[1][:10], *old_y[:5]])
    extended = netmeld.extend(base, folder, steps=0)
    assert extended.labels == [*OLD, "8"]
    assert extended.method["extended"][0]["old_class_examples"] == 5


# -- command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_base(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("extend") / "base"
    base.save(path)
    return path


def test_cli_extend_adds_the_example_labels(saved_base, shots, digits8, tmp_path, capsys):
    examples = _image_folder(tmp_path / "examples", shots[0], shots[1])
    out = tmp_path / "extended"
    args = ["extend", str(saved_base), "--examples", str(examples), "-o", str(out), "--steps", "10"]
    assert main(args) == 0
    assert "added 2 labels" in capsys.readouterr().out
    model = netmeld.load(out)
    assert model.labels == OLD + NEW
    assert json.loads((out / "netmeld.json").read_text())["extension"]["labels"] == NEW
    # the same as the Python API on the same folder
    api = netmeld.extend(netmeld.load(saved_base), examples, steps=10)
    x = digits8.test[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(model(x), api(x))
    assert main(args) == 2  # the output exists now
    assert "--overwrite" in capsys.readouterr().err


def test_cli_extend_with_no_examples_is_a_one_line_error(saved_base, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "extend",
            str(saved_base),
            "--examples",
            str(tmp_path / "empty"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and "has no images" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
