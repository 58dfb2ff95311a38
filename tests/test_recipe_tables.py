"""The YAML recipe path for members that read table columns, with a CSV data file."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from safetensors.torch import save_file

import netmeld
from netmeld.cli import main
from netmeld.demo.scenarios import table_scenario


@pytest.fixture(scope="module")
def wine():
    return table_scenario("wine", seed=0, epochs=30)


def _write_csv(path, x, labels, names):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*reversed(names), "label"])  # column order differs from the model's
        for row, label in zip(x.tolist(), labels, strict=True):
            writer.writerow([*reversed(row), label])


def test_recipe_with_columns_and_csv_matches_the_python_api(wine, tmp_path):
    specs = []
    for m in wine.members:
        save_file(m.module.state_dict(), str(tmp_path / f"{m.name}.safetensors"))
        pre = m.preprocessing
        specs.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": m.architecture.spec,
                "architecture_kwargs": dict(m.architecture.kwargs),
                "labels": list(m.labels),
                "preprocessing": {
                    "input_shape": list(pre.input_shape),
                    "mean": list(pre.mean),
                    "std": list(pre.std),
                    "columns": list(pre.columns),
                },
            }
        )
    _write_csv(tmp_path / "holdout.csv", *wine.holdout, wine.feature_names)
    _write_csv(tmp_path / "test.csv", *wine.test, wine.feature_names)
    recipe = {
        "members": specs,
        "method": "stack",
        "params": {"l2": 0.01},
        "data": "holdout.csv",
        "feature_names": wine.feature_names,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    from_cli = netmeld.load(tmp_path / "out")
    direct = netmeld.meld(
        wine.members,
        "stack",
        wine.holdout,
        params={"l2": 0.01},
        feature_names=wine.feature_names,
    )
    x = wine.test[0]
    with torch.no_grad():
        torch.testing.assert_close(from_cli(x), direct(x))
    report = netmeld.evaluate(from_cli, tmp_path / "test.csv", latency=False)
    expected = netmeld.evaluate(direct, wine.test, latency=False)
    assert report.union_accuracy == expected.union_accuracy
    assert report.union_accuracy > 0.8
