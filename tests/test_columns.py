"""Members that read named columns of a table: each reads only its columns, tables in any column
order (DataFrame, .csv) give the same answers, clear errors, and save/load."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import netmeld
from netmeld import Member, Preprocessing
from netmeld.demo.scenarios import TableScenario

from ._tables import wine_scenario


@pytest.fixture(scope="module")
def wine() -> TableScenario:
    return wine_scenario()


@pytest.fixture(scope="module")
def model(wine) -> netmeld.CombinedModel:
    return netmeld.meld(wine.members, "concat", feature_names=wine.feature_names)


def _shuffled_columns(names: list[str]) -> list[str]:
    order = list(names)
    random.Random(0).shuffle(order)
    assert order != list(names)
    return order


def _write_csv(path: Path, x: torch.Tensor, labels: list[str], names: list[str]) -> list[str]:
    """Rows of ``x`` (columns in ``names`` order) written with the columns shuffled and a
    'label' column in the middle; returns the header."""
    header = _shuffled_columns(names)
    header.insert(4, "label")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row, label in zip(x.tolist(), labels, strict=True):
            values = dict(zip(names, row, strict=True))
            writer.writerow([label if h == "label" else repr(values[h]) for h in header])
    return header


def test_the_model_reads_the_dataset_column_order(wine, model):
    assert model.feature_names == wine.feature_names
    assert model.input_shape == (len(wine.feature_names),)
    a, b = wine.members
    assert set(a.preprocessing.columns).isdisjoint(b.preprocessing.columns)


def test_each_member_reads_only_its_columns(wine, model):
    x = wine.test[0][:32]
    a = wine.members[0]
    reads = [wine.feature_names.index(c) for c in a.preprocessing.columns]
    others = [i for i in range(len(wine.feature_names)) if i not in reads]
    with torch.no_grad():
        base = model.run_members(x).logits
        # A's logits are A's own module on its columns, normalised as it asks
        mean = torch.tensor(a.preprocessing.mean)
        std = torch.tensor(a.preprocessing.std)
        torch.testing.assert_close(base[0], a.module((x[:, reads] - mean) / std))

        changed = x.clone()
        changed[:, others] = torch.randn(len(x), len(others)) * 50 + 7
        out = model.run_members(changed).logits
        assert torch.equal(out[0], base[0])  # A does not see B's columns
        assert not torch.allclose(out[1], base[1])  # B does

        one = x.clone()
        one[:, reads[0]] += 10 * x[:, reads[0]].std()
        out = model.run_members(one).logits
        assert not torch.allclose(out[0], base[0])
        assert torch.equal(out[1], base[1])


def test_a_shuffled_dataframe_gives_the_same_predictions(wine, model):
    pd = pytest.importorskip("pandas")
    x = wine.test[0]
    frame = pd.DataFrame(x.numpy(), columns=wine.feature_names)
    shuffled = frame[_shuffled_columns(wine.feature_names)]
    shuffled.insert(2, "comment", ["ignored"] * len(x))  # extra columns are ignored
    assert model.predict(shuffled) == model.predict(x)
    torch.testing.assert_close(model.predict_proba(shuffled), model.predict_proba(x))
    loaded = netmeld.load_data(shuffled, model.input_shape, feature_names=model.feature_names)
    assert torch.equal(loaded.inputs, x)


def test_a_shuffled_csv_file_reads_in_feature_order(wine, model, tmp_path):
    x, labels = wine.test
    path = tmp_path / "wine.csv"
    _write_csv(path, x, labels, wine.feature_names)
    data = netmeld.load_data(path, model.input_shape, feature_names=model.feature_names)
    assert torch.equal(data.inputs, x) and data.labels == labels
    assert model.predict(data.inputs) == model.predict(x)
    assert model.predict(path) == model.predict(x)
    # a method fitted on the csv file sees the same rows as one fitted on the tensor
    hold = tmp_path / "hold.csv"
    _write_csv(hold, *wine.holdout, wine.feature_names)
    a = netmeld.meld(wine.members, "calibrate", hold, feature_names=wine.feature_names)
    b = netmeld.meld(wine.members, "calibrate", wine.holdout, feature_names=wine.feature_names)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_evaluate_reads_a_shuffled_table_by_column_name(wine, model, tmp_path):
    path = tmp_path / "wine.csv"
    _write_csv(path, *wine.test, wine.feature_names)
    direct = netmeld.evaluate(model, wine.test, latency=False)
    via_file = netmeld.evaluate(model, path, latency=False)
    assert via_file.examples == direct.examples
    assert via_file.union_accuracy == direct.union_accuracy
    assert direct.union_accuracy > 0.9  # read in the file's own order it scores about 1/3
    (compared,) = netmeld.compare({"concat": model}, path)
    assert compared.union_accuracy == direct.union_accuracy


def test_evaluate_reads_a_shuffled_dataframe_by_column_name(wine, model):
    pd = pytest.importorskip("pandas")
    x, labels = wine.test
    frame = pd.DataFrame(x.numpy(), columns=wine.feature_names)
    shuffled = frame[_shuffled_columns(wine.feature_names)]
    direct = netmeld.evaluate(model, wine.test, latency=False)
    assert netmeld.evaluate(model, (shuffled, labels), latency=False).union_accuracy == (
        direct.union_accuracy
    )


def test_cli_eval_reads_a_shuffled_csv_file(wine, model, tmp_path, capsys):
    import json

    from netmeld.cli import main

    model.save(tmp_path / "m")
    path = tmp_path / "wine.csv"
    _write_csv(path, *wine.test, wine.feature_names)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    direct = netmeld.evaluate(model, wine.test, latency=False)
    assert report["examples"] == len(wine.test[1])
    assert report["union_accuracy"] == pytest.approx(direct.union_accuracy)


# -- errors ---------------------------------------------------------------------------------


def test_a_table_missing_a_column_names_it(wine, model, tmp_path):
    path = tmp_path / "short.csv"
    x, labels = wine.test
    keep = [n for n in wine.feature_names if n != "hue"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*keep, "label"])
        for row, label in zip(x.tolist(), labels, strict=True):
            writer.writerow([*(row[wine.feature_names.index(n)] for n in keep), label])
    with pytest.raises(netmeld.DataError, match="no column 'hue'"):
        netmeld.load_data(path, model.input_shape, feature_names=model.feature_names)


def test_a_dataframe_missing_a_column_names_it(wine, model):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(wine.test[0].numpy(), columns=wine.feature_names).drop(columns=["hue"])
    with pytest.raises(netmeld.DataError, match="no column 'hue'"):
        model.predict(frame)
    with pytest.raises(netmeld.DataError, match="no column 'hue'"):
        netmeld.meld(
            wine.members,
            "calibrate",
            (frame, wine.test[1]),
            feature_names=wine.feature_names,
        )


def test_a_column_not_among_the_feature_names_names_member_and_column(wine):
    names = [n for n in wine.feature_names if n != "proline"]
    with pytest.raises(
        netmeld.IncompatibleMembersError, match=r"member 'cols1' reads column 'proline'"
    ):
        netmeld.CombinedModel(wine.members, feature_names=names)
    with pytest.raises(netmeld.IncompatibleMembersError, match="repeat a name"):
        netmeld.CombinedModel(wine.members, feature_names=[*wine.feature_names, "hue"])


def test_columns_must_number_the_members_input_width():
    with pytest.raises(netmeld.MemberError, match="3 columns given for input_shape \\(2,\\)"):
        Preprocessing((2,), columns=("a", "b", "c"))
    with pytest.raises(netmeld.MemberError, match="columns are for vector inputs"):
        Preprocessing((1, 2, 2), columns=(0, 1, 2, 3))
    with pytest.raises(netmeld.MemberError, match="columns repeat"):
        Preprocessing((2,), columns=("a", "a"))


def _linear_member(name: str, columns: tuple, labels: list[str]) -> Member:
    torch.manual_seed(len(name))
    net = nn.Sequential(nn.Linear(len(columns), 4), nn.ReLU(), nn.Linear(4, len(labels)))
    return Member(
        net.eval(), labels, name=name, preprocessing=Preprocessing((len(columns),), columns=columns)
    )


def test_an_integer_column_beyond_the_input_width_is_refused():
    a = _linear_member("a", (0, 1), ["x", "y"])
    b = _linear_member("far", (2, 9), ["y", "z"])
    with pytest.raises(
        netmeld.IncompatibleMembersError, match="member 'far' reads column 9, but the combined"
    ):
        netmeld.CombinedModel([a, b], input_shape=(4,))
    # without an input shape the width is implied by the highest column
    model = netmeld.CombinedModel([a, b])
    assert model.input_shape == (10,) and model.feature_names is None
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(model.run_members(x).logits[1], b.module(x[:, [2, 9]]))


def test_default_feature_names_are_the_members_columns_in_first_appearance_order():
    a = _linear_member("a", ("h", "w"), ["x", "y"])
    b = _linear_member("b", ("age", "w", "z"), ["y", "z"])
    model = netmeld.CombinedModel([a, b])
    assert model.feature_names == ["h", "w", "age", "z"]
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.run_members(x).logits[1], b.module(x[:, [2, 1, 3]]))


# -- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["concat", "mean", "stack"])
def test_a_column_model_saves_and_loads(wine, method, tmp_path):
    data = wine.holdout if method == "stack" else None
    params = {"l2": 0.01, "steps": 30} if method == "stack" else None
    model = netmeld.meld(
        wine.members, method, data, params=params, feature_names=wine.feature_names
    )
    model.save(tmp_path / "m")
    loaded = netmeld.load(tmp_path / "m")
    assert loaded.feature_names == wine.feature_names
    assert loaded.input_shape == model.input_shape
    assert [m.preprocessing.columns for m in loaded.members] == [
        m.preprocessing.columns for m in wine.members
    ]
    x = wine.test[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.labels == model.labels


def test_explicit_feature_names_in_another_order_are_kept(wine, model, tmp_path):
    names = list(reversed(wine.feature_names))
    other = netmeld.meld(wine.members, "concat", feature_names=names)
    assert other.feature_names == names
    x = wine.test[0]
    with torch.no_grad():
        torch.testing.assert_close(other(x.flip(1)), model(x))
    other.save(tmp_path / "r")
    loaded = netmeld.load(tmp_path / "r")
    assert loaded.feature_names == names
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.flip(1)), model(x), rtol=0, atol=0)


def test_members_with_an_architecture_rebuild_from_the_saved_columns(wine, tmp_path):
    """The saved member spec records the columns by name, not by position."""
    import json

    model = netmeld.meld(wine.members, "concat", feature_names=wine.feature_names)
    model.save(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "netmeld.json").read_text())
    assert spec["feature_names"] == wine.feature_names
    assert spec["members"][0]["preprocessing"]["columns"] == list(
        wine.members[0].preprocessing.columns
    )
