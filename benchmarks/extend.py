"""Few-shot class extension (``netmeld.extend``): new-class accuracy and the old-class drop.

Scenario (Fashion-MNIST): two small CNN members trained on disjoint image halves know classes
0-3 and 4-7; they are combined with the ``router`` method on 20 labeled images per old class.
Then the two classes no member knows (8 "Bag", 9 "Ankle boot") are added from k = 1, 5, 20
examples each, by weight imprinting alone and with the distilling fine-tuning, given 1,000
unlabeled images of the old classes.

With ``--dataset cifar10`` the members are an ImageNet-pretrained EfficientNet-lite0 (frozen,
128 px) with new linear heads for classes 0-3 | 4-7 (airplane ... deer | dog ... horse) on
disjoint halves of 500 images per class, and "ship" and "truck" are added; test: 200 images
per class, scored through cached trunk features (checked against the real forward). Needs
``pip install -e ".[bench]"``.

Reported on the test set: new-class accuracy (top-1 over all 10 labels, on images of the new
classes), old-class accuracy and its drop against the model before extension, and the union
accuracy. Means over seeds.

    python benchmarks/extend.py                 # seeds 0 1 2
    python benchmarks/extend.py --seeds 0 --shots 5
    python benchmarks/extend.py --dataset cifar10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld.demo.scenarios import few_per_class, train_classifier
from netmeld.members.member import Architecture, Member, Preprocessing
from netmeld.zoo import SmallCNN

OLD_SPLITS = [[0, 1, 2, 3], [4, 5, 6, 7]]
NEW = [8, 9]
UNLABELED = 1000


def build(seed: int, root: str | None, n_per_member: int, epochs: int) -> dict[str, Any]:
    from _datasets import FASHION_CLASSES, load_idx

    xs, ys = load_idx("fashion-mnist", "train", root=root)
    xe, ye = load_idx("fashion-mnist", "test", root=root)
    names = list(FASHION_CLASSES)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xs))
    n_rows = n_per_member * 10 // 4  # each member keeps 4 of the 10 classes
    halves = [order[:n_rows], order[n_rows : 2 * n_rows]]
    pool = order[2 * n_rows : 2 * n_rows + 6000]
    to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 255.0  # noqa: E731
    mean, std = 0.29, 0.35
    members = []
    for i, (rows, classes) in enumerate(zip(halves, OLD_SPLITS, strict=True)):
        keep = rows[np.isin(ys[rows], classes)]
        remap = {c: j for j, c in enumerate(classes)}
        torch.manual_seed(seed * 10 + i)
        model = SmallCNN(num_classes=len(classes), in_channels=1, width=16, blocks=3)
        train_classifier(
            model,
            (to_t(xs[keep]) - mean) / std,
            torch.tensor([remap[int(v)] for v in ys[keep]]),
            epochs=epochs,
            lr=3e-3,
            batch_size=128,
            seed=seed * 10 + i,
        )
        members.append(
            Member(
                model,
                [names[c] for c in classes],
                name=f"m{i + 1}",
                preprocessing=Preprocessing((1, 28, 28), mean=(mean,), std=(std,)),
                architecture=Architecture(
                    "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 16, "blocks": 3}
                ),
            )
        )
    pool_labels = [names[v] for v in ys[pool]]
    old_names = {names[c] for s in OLD_SPLITS for c in s}
    old_pool = [i for i, label in enumerate(pool_labels) if label in old_names]
    few = [i for i in few_per_class(pool_labels, 20, seed=seed) if pool_labels[i] in old_names]
    test = rng.permutation(len(xe))[:3000]
    return {
        "members": members,
        "pool": to_t(xs[pool]),
        "pool_labels": pool_labels,
        "labeled_old": (to_t(xs[pool[few]]), [pool_labels[i] for i in few]),
        "unlabeled_old": to_t(xs[pool[old_pool[:UNLABELED]]]),
        "test": (to_t(xe[test]), [names[v] for v in ye[test]]),
        "new_names": [names[c] for c in NEW],
    }


def build_cifar(seed: int, root: str | None, resolution: int) -> dict[str, Any]:
    import _cifar_members as cm

    data = cm.load(seed, root, resolution, train_per_class=650, test_per_class=200)
    names = data["classes"]
    rng = np.random.default_rng(seed)
    halves: list[list[int]] = [[], []]
    pool: list[int] = []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(data["y_train"] == c))
        halves[0] += rows[:250].tolist()
        halves[1] += rows[250:500].tolist()
        pool += rows[500:].tolist()
    members = [
        cm.member(data, np.array(h), classes, f"m{i + 1}", seed * 10 + i)
        for i, (h, classes) in enumerate(zip(halves, OLD_SPLITS, strict=True))
    ]
    pool_arr = np.array(pool)
    pool_labels = [names[v] for v in data["y_train"][pool_arr]]
    old_names = {names[c] for s in OLD_SPLITS for c in s}
    few = [i for i in few_per_class(pool_labels, 20, seed=seed) if pool_labels[i] in old_names]
    rest = [i for i, label in enumerate(pool_labels) if label in old_names and i not in set(few)]
    unlabeled = rng.permutation(rest)[:UNLABELED]
    return {
        "members": members,
        "pool": data["x_train"][pool_arr],
        "pool_labels": pool_labels,
        "labeled_old": (data["x_train"][pool_arr[few]], [pool_labels[i] for i in few]),
        "unlabeled_old": data["x_train"][pool_arr[unlabeled]],
        "test": (data["x_test"], [names[v] for v in data["y_test"]]),
        "test_features": data["f_test"],
        "new_names": [names[c] for c in NEW],
        "input_shape": (3, 32, 32),  # members resize to their 128 px
    }


def accuracies(model: netmeld.CombinedModel, sc: dict[str, Any]) -> dict[str, float]:
    x, y = sc["test"]
    feats = sc.get("test_features")
    if feats is None:
        predicted = model.predict(x)
    else:
        import _cifar_members as cm

        cm.check_fast_path(model, x[:8], feats[:8])
        predicted = cm.predict(model, feats)
    new = [i for i, label in enumerate(y) if label in sc["new_names"]]
    old = [i for i, label in enumerate(y) if label not in sc["new_names"]]

    def acc(rows: list[int]) -> float:
        return 100 * sum(predicted[i] == y[i] for i in rows) / len(rows)

    return {"new": acc(new), "old": acc(old), "union": acc(list(range(len(y))))}


def run(
    sc: dict[str, Any],
    shots: list[int],
    seed: int,
    budgets: list[float],
    models: dict[str, netmeld.CombinedModel] | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracies before and after each extension; ``models`` collects the models by row."""
    base = netmeld.meld(
        sc["members"], "router", sc["labeled_old"], seed=seed, input_shape=sc.get("input_shape")
    )
    rows = {"before extension": accuracies(base, sc)}
    if models is not None:
        models["before extension"] = base
    pool, labels = sc["pool"], sc["pool_labels"]
    for k in shots:
        chosen = [i for i in few_per_class(labels, k, seed=seed) if labels[i] in sc["new_names"]]
        examples = (pool[chosen], [labels[i] for i in chosen])
        for budget in budgets:
            for mode, steps in (("imprint", 0), ("imprint + fine-tune", 300)):
                start = time.perf_counter()
                model = netmeld.extend(
                    base,
                    *examples,
                    unlabeled=sc["unlabeled_old"],
                    steps=steps,
                    seed=seed,
                    max_false_positives=budget,
                )
                result = accuracies(model, sc)
                result["seconds"] = time.perf_counter() - start
                result["drop"] = rows["before extension"]["old"] - result["old"]
                name = f"{k}-shot, {mode}"
                if len(budgets) > 1:
                    name += f", max_false_positives={budget}"
                rows[name] = result
                if models is not None:
                    models[name] = model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["fashion", "cifar10"], default="fashion")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--data-root", help="folder holding the shared data sets")
    parser.add_argument("--per-member", type=int, default=6000, help="training images per member")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cifar-resolution", type=int, default=128)
    parser.add_argument(
        "--max-false-positives",
        nargs="+",
        type=float,
        default=[0.005],
        help="extend's false-positive budgets to compare (default: the library default)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FOLDER",
        help="also write an HTML report per seed into FOLDER: every model before and after "
        "extension on the test set (the model before is scored on the labels it knows)",
    )
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        if args.dataset == "cifar10":
            sc = build_cifar(seed, args.data_root, args.cifar_resolution)
        else:
            sc = build(seed, args.data_root, args.per_member, args.epochs)
        models: dict[str, netmeld.CombinedModel] | None = {} if args.report else None
        results.append(run(sc, args.shots, seed, args.max_false_positives, models))
        if models:
            reports = netmeld.compare(models, sc["test"], latency=False, progress=False)
            reports.to_html(
                args.report / f"extend-{args.dataset}-seed{seed}.html",
                title=f"{args.dataset}: add {', '.join(sc['new_names'])}, seed {seed}",
                source=f"benchmarks/extend.py, {args.dataset} test set",
                baseline="before extension",
                overwrite=True,  # a rerun replaces its own reports
            )
        print(f"  seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    added = "'ship' and 'truck'" if args.dataset == "cifar10" else "'Bag' and 'Ankle boot'"
    table = Table(
        title=f"{args.dataset}: add {added} to a model of 8 classes (mean over seeds {args.seeds})",
        title_justify="left",
    )
    for col in ("", "new-class acc %", "old-class acc %", "old-class drop", "union acc %", "s"):
        table.add_column(col, justify="left" if not col else "right")
    for row in results[0]:

        def mean(key: str, row: str = row) -> str:
            values = [r[row][key] for r in results if key in r[row]]
            return f"{statistics.mean(values):.1f}" if values else "-"

        table.add_row(row, mean("new"), mean("old"), mean("drop"), mean("union"), mean("seconds"))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
