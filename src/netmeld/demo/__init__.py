"""``netmeld demo``: the union-of-labels problem on sklearn's digits, no download.

A small CNN trunk is trained on a source half of the digits and frozen. Members are that trunk
plus a head trained on a subset of the digits (2 members: 0-4 and 5-9; 3 members: 0-2, 3-5,
6-9). Every registered union method combines them; a leaderboard compares them with the oracle
(one head trained on all ten digits), and the best combined model is saved and loaded back.
It takes about 20 s on a 2-core laptop (the figure the README and ``--help`` give).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from netmeld.demo.scenarios import Scenario, digits_scenario, few_per_class
from netmeld.evaluate import Report, evaluate, render_table
from netmeld.methods import get_method
from netmeld.methods.meld import meld
from netmeld.model.artifact import load

SPLITS = {
    "2 members (0-4 | 5-9)": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "3 members (0-2 | 3-5 | 6-9)": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
}
UNLABELED = 500  # unlabeled target images for the unlabeled methods
SHOTS = 5  # labeled examples per class for the few-label methods


def method_data(scenario: Scenario, method: str, *, seed: int = 0) -> Any:
    """The data a method gets in the demo and the benchmarks."""
    need = get_method(method).data
    if need == "none":
        return None
    if need == "unlabeled":
        return scenario.pool[:UNLABELED]
    few = few_per_class(scenario.pool_labels, SHOTS, seed=seed)
    return scenario.pool[few], [scenario.pool_labels[i] for i in few]


def method_inputs(scenario: Scenario, method: str, *, seed: int = 0) -> dict[str, Any]:
    """What ``meld`` gets for ``method`` in the demo, tests and benchmarks: ``data`` (see
    :func:`method_data`) and, for a semi-supervised method, ``unlabeled`` (the pool's first
    images); for the methods from statistics each member's ``statistics`` on its own training
    rows of the pool (the rows of its labels), from the pool's features."""
    info = get_method(method)
    if info.unlabeled:  # a few labels and the unlabeled pool
        data = method_data(scenario, method, seed=seed)
        return {"data": data, "unlabeled": scenario.pool[:UNLABELED]}
    if info.data != "statistics":
        return {"data": method_data(scenario, method, seed=seed)}
    from netmeld.methods.statistics import feature_statistics, statistics_from_features

    stats = []
    for m in scenario.members:
        rows = [i for i, label in enumerate(scenario.pool_labels) if label in m.labels]
        labels = [scenario.pool_labels[i] for i in rows]
        if scenario.pool_features is not None:
            stats.append(statistics_from_features(m, scenario.pool_features[rows], labels))
        else:
            stats.append(feature_statistics(m, (scenario.pool[rows], labels), progress=False))
    return {"statistics": stats}


def union_methods() -> list[str]:
    """The registered methods of the union-of-labels family (netmeld.methods.union)."""
    from netmeld.methods import method_infos

    family = ("netmeld.methods.union", "netmeld.methods.semi")
    return [info.name for info in method_infos() if info.fit.__module__ in family]


def leaderboard(
    scenario: Scenario, *, seed: int = 0, progress: bool | None = None
) -> tuple[list[Report], dict[str, Any]]:
    """Every union-head method on a scenario, plus the members' oracle.

    (The ensembles, stacking and transfer methods are for members whose label sets overlap or
    whose inputs differ; ``benchmarks/ensembles.py`` measures them.)
    """
    reports = []
    models = {}
    for method in union_methods():
        model = meld(
            scenario.members,
            method,
            **method_inputs(scenario, method, seed=seed),
            seed=seed,
            progress=False,
        )
        models[method] = model
        reports.append(evaluate(model, scenario.test, name=method, progress=progress))
    oracle = meld([scenario.oracle], "concat")
    reports.append(evaluate(oracle, scenario.test, name="oracle (joint head)", progress=progress))
    return reports, models


def run(
    out: str | Path = "netmeld-demo-model",
    *,
    seed: int = 0,
    console: Console | None = None,
    progress: bool | None = None,
) -> Path:
    """Run the demo; returns the folder the best combined model was saved to."""
    console = console or Console()
    start = time.perf_counter()
    console.print(
        "[bold]netmeld demo[/bold]: members share a frozen digits trunk, each knows some digits; "
        "combine them into one 10-digit model.\n"
        f"Data per method: none | {UNLABELED} unlabeled images | {SHOTS} labels per digit.\n"
    )
    best: tuple[float, str, Any] | None = None
    for title, splits in SPLITS.items():
        with console.status(f"training trunk and members for {title} ..."):
            scenario = digits_scenario(splits, seed=seed)
        with console.status(f"melding {title} with {len(union_methods())} methods ..."):
            reports, models = leaderboard(scenario, seed=seed, progress=progress)
        console.print(render_table(reports, title=title, reference="oracle (joint head)"))
        for r in reports:
            if r.name in models and (best is None or r.union_accuracy > best[0]):
                best = (r.union_accuracy, f"{r.name}, {title}", models[r.name])
    assert best is not None
    out = Path(out)
    best[2].save(out, overwrite=(out / "netmeld.json").is_file())
    reloaded = load(out)
    x = scenario.test[0][:64]
    with torch.no_grad():
        same = torch.allclose(reloaded(x), best[2](x), atol=1e-5)
    console.print(
        f"\nBest: [bold]{best[1]}[/bold] ({100 * best[0]:.1f}%), saved to [bold]{out}[/bold] "
        f"(reloaded outputs identical: {same}). Use it from Python:\n"
        f"    import netmeld\n"
        f"    model = netmeld.load({str(out)!r})\n"
        f"    model.predict(images)   # images: (N, 1, 8, 8) floats in [0, 1]\n"
        f"or: netmeld predict {out} IMAGE.png ...\n"
        f"Finished in {time.perf_counter() - start:.0f} s."
    )
    return out
