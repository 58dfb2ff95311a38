"""Ensembles, stacking, routers and many-to-one transfer of prefit members, on real data.

Scenarios (every member is trained by us, then treated as a prefit black box):

- breast_cancer, wine (sklearn tables): two MLP members read different columns (every other
  column), both know every label; the rows no member saw (20 %) are the labeled data the
  combinations fit on; the reference is an MLP on all columns trained on those rows too.
- fashion (Fashion-MNIST): two small CNNs from different seeds, trained on disjoint halves of
  the training images and on partly overlapping label sets (classes 0-6 | 3-9); the
  combinations get 20 labeled images per class that no member saw; the reference is the same
  CNN trained on both halves with every label.
- cifar10: an ImageNet-pretrained EfficientNet-lite0 (frozen, 128 px) with a new linear head
  per member, trained on disjoint halves of 500 images per class and on classes 0-6 | 3-9;
  20 labeled images per class that no member saw; the reference is a head on all classes and
  both halves. Test: 200 images per class, scored through cached trunk features (checked
  against the real forward). Needs ``pip install -e ".[bench]"``.

Union accuracy = top-1 over every label on the test set (a member alone scores 0 on the labels
it does not know). Means over seeds.

    python benchmarks/ensembles.py                                   # everything, seeds 0 1 2
    python benchmarks/ensembles.py --datasets wine --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld.demo.scenarios import few_per_class, table_scenario, train_classifier
from netmeld.members.member import Architecture, Member, Preprocessing
from netmeld.zoo import SmallCNN

# (row name, method, params, data kind); data kind: none | labeled
METHODS: list[tuple[str, str, dict[str, Any], str]] = [
    ("concat (naive)", "concat", {}, "none"),
    ("mean", "mean", {}, "none"),
    ("vote", "vote", {}, "none"),
    ("max-confidence", "max-confidence", {}, "none"),
    ("weighted", "weighted", {}, "labeled"),
    ("best union head (select)", "select", {}, "labeled"),
    ("router (gate on features)", "router", {}, "labeled"),
    ("router (gate on input)", "router", {"gate_on": "input"}, "labeled"),
    ("stack (logistic)", "stack", {}, "labeled"),
    ("stack (MLP)", "stack", {"meta": "mlp"}, "labeled"),
    ("stack + input", "stack", {"passthrough": "input"}, "labeled"),
    ("transfer (concat)", "transfer", {}, "labeled"),
    ("transfer (attention)", "transfer", {"fusion": "attention"}, "labeled"),
]
# raw pixels are too wide for a meta-model or a gate fitted on 200 images
TABLE_ONLY = {"stack + input", "router (gate on input)"}
SHOTS = 20


def accuracy(model: netmeld.CombinedModel, x: torch.Tensor, y: Sequence[str]) -> float:
    """Top-1 over all test rows; a label the model does not know is always wrong."""
    predicted = model.predict(x)
    return sum(p == t for p, t in zip(predicted, y, strict=True)) / len(y)


def gate_accuracy(model: netmeld.CombinedModel, x: torch.Tensor, y: Sequence[str]) -> float | None:
    if model.union.router is None or model.combiner is not None:
        return None
    known = [i for i, label in enumerate(y) if label in model.labels]
    return netmeld.evaluate(model, (x[known], [y[i] for i in known]), latency=False).gate_accuracy


def fashion_scenario(seed: int, root: str | None, n_per_member: int, epochs: int) -> dict:
    from _datasets import FASHION_CLASSES, load_idx

    xs, ys = load_idx("fashion-mnist", "train", root=root)
    xe, ye = load_idx("fashion-mnist", "test", root=root)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xs))
    n_rows = n_per_member * 10 // 7  # each member keeps 7 of the 10 classes
    halves = [order[:n_rows], order[n_rows : 2 * n_rows]]  # disjoint images per member
    pool = order[2 * n_rows : 2 * n_rows + 5000]  # images no member saw
    to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 255.0  # noqa: E731
    names = list(FASHION_CLASSES)
    mean, std = 0.29, 0.35
    pre = Preprocessing((1, 28, 28), mean=(mean,), std=(std,))
    splits = [list(range(0, 7)), list(range(3, 10))]

    def train(rows: np.ndarray, classes: list[int], name: str, offset: int) -> Member:
        keep = rows[np.isin(ys[rows], classes)]
        remap = {c: i for i, c in enumerate(classes)}
        torch.manual_seed(seed * 10 + offset)
        model = SmallCNN(num_classes=len(classes), in_channels=1, width=16, blocks=3)
        train_classifier(
            model,
            (to_t(xs[keep]) - mean) / std,
            torch.tensor([remap[int(v)] for v in ys[keep]]),
            epochs=epochs,
            lr=3e-3,
            batch_size=128,
            seed=seed * 10 + offset,
        )
        return Member(
            model,
            [names[c] for c in classes],
            name=name,
            preprocessing=pre,
            architecture=Architecture(
                "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 16, "blocks": 3}
            ),
        )

    start = time.perf_counter()
    members = [
        train(h, s, f"m{i + 1}", i + 1) for i, (h, s) in enumerate(zip(halves, splits, strict=True))
    ]
    oracle = train(np.concatenate(halves), list(range(10)), "all-data", 0)
    print(
        f"  fashion seed {seed}: members trained in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    pool_labels = [names[v] for v in ys[pool]]
    few = few_per_class(pool_labels, SHOTS, seed=seed)
    test = rng.permutation(len(xe))[:2000]
    return {
        "members": members,
        "oracle": oracle,
        "labeled": (to_t(xs[pool[few]]), [pool_labels[i] for i in few]),
        "test": (to_t(xe[test]), [names[v] for v in ye[test]]),
        "feature_names": None,
    }


def cifar_scenario(seed: int, root: str | None, resolution: int) -> dict:
    import _cifar_members as cm

    data = cm.load(seed, root, resolution, train_per_class=540, test_per_class=200)
    rng = np.random.default_rng(seed)
    halves: list[list[int]] = [[], []]
    pool: list[int] = []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(data["y_train"] == c))
        halves[0] += rows[:250].tolist()
        halves[1] += rows[250:500].tolist()
        pool += rows[500:].tolist()
    h0, h1 = np.array(halves[0]), np.array(halves[1])
    members = [
        cm.member(data, h0, range(0, 7), "m1", seed * 10 + 1),
        cm.member(data, h1, range(3, 10), "m2", seed * 10 + 2),
    ]
    oracle = cm.member(data, np.concatenate([h0, h1]), range(10), "all-data", seed * 10)
    pool_arr = np.array(pool)
    pool_labels = [data["classes"][v] for v in data["y_train"][pool_arr]]
    few = few_per_class(pool_labels, SHOTS, seed=seed)
    return {
        "members": members,
        "oracle": oracle,
        "labeled": (data["x_train"][pool_arr[few]], [pool_labels[i] for i in few]),
        "test": (data["x_test"], [data["classes"][v] for v in data["y_test"]]),
        "test_features": data["f_test"],
        "feature_names": None,
        "input_shape": (3, 32, 32),  # members resize to their 128 px
    }


def table(dataset: str, seed: int) -> dict:
    sc = table_scenario(dataset, seed=seed)
    return {
        "members": sc.members,
        "oracle": sc.oracle,
        "labeled": sc.holdout,
        "test": sc.test,
        "feature_names": sc.feature_names,
    }


def run(sc: dict, dataset: str) -> dict[str, dict[str, float | None]]:
    x, y = sc["test"]
    names = sc["feature_names"]
    feats = sc.get("test_features")
    shape = sc.get("input_shape")
    rows: dict[str, dict[str, float | None]] = {}

    def score(model: netmeld.CombinedModel) -> float:
        if feats is None:
            return accuracy(model, x, y)
        import _cifar_members as cm

        cm.check_fast_path(model, x[:8], feats[:8])
        predicted = cm.predict(model, feats)
        return sum(p == t for p, t in zip(predicted, y, strict=True)) / len(y)

    def gate(model: netmeld.CombinedModel) -> float | None:
        if feats is None or model.union.router is None or model.combiner is not None:
            return None
        with torch.no_grad():
            chosen = model.union.gate_logits(feats).argmax(1).tolist()
        known = [(t, c) for t, c in zip(y, chosen, strict=True) if model.label_members.get(t)]
        hits = sum(model.member_names[c] in model.label_members[t] for t, c in known)
        return hits / len(known)

    for m in sc["members"]:
        alone = netmeld.meld([m], "concat", feature_names=names, input_shape=shape)
        rows[f"member {m.name} alone ({len(m.labels)} labels)"] = {"acc": score(alone)}
    for row, method, params, need in METHODS:
        if row in TABLE_ONLY and names is None:
            continue
        data = sc["labeled"] if need == "labeled" else None
        start = time.perf_counter()
        model = netmeld.meld(
            sc["members"], method, data, params=params, feature_names=names, input_shape=shape
        )
        fit_s = time.perf_counter() - start
        rows[row] = {
            "acc": score(model),
            "gate": gate_accuracy(model, x, y) if feats is None else gate(model),
            "fit_s": fit_s,
        }
    oracle = netmeld.meld([sc["oracle"]], "concat", feature_names=names, input_shape=shape)
    rows["trained on all the data (reference)"] = {"acc": score(oracle)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["breast_cancer", "wine", "fashion"],
        choices=["breast_cancer", "wine", "fashion", "cifar10"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", help="folder holding the shared data sets")
    parser.add_argument(
        "--fashion-per-member", type=int, default=8000, help="training images per member"
    )
    parser.add_argument("--fashion-epochs", type=int, default=3)
    parser.add_argument("--cifar-resolution", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    console = Console(width=140)
    results: dict[str, list[dict]] = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            start = time.perf_counter()
            if dataset == "fashion":
                sc = fashion_scenario(
                    seed, args.data_root, args.fashion_per_member, args.fashion_epochs
                )
            elif dataset == "cifar10":
                sc = cifar_scenario(seed, args.data_root, args.cifar_resolution)
            else:
                sc = table(dataset, seed)
            results.setdefault(dataset, []).append(run(sc, dataset))
            print(f"  {dataset} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    for dataset, per_seed in results.items():
        t = Table(
            title=f"{dataset}: union accuracy, mean over seeds {args.seeds}", title_justify="left"
        )
        t.add_column("method")
        t.add_column("union acc %", justify="right")
        t.add_column("min-max %", justify="right")
        t.add_column("gate acc %", justify="right")
        t.add_column("fit s", justify="right")
        for row in per_seed[0]:
            accs = [100 * r[row]["acc"] for r in per_seed]
            gates = [g for r in per_seed if (g := r[row].get("gate")) is not None]
            fits = [r[row].get("fit_s") for r in per_seed]
            t.add_row(
                row,
                f"{statistics.mean(accs):.1f}",
                f"{min(accs):.1f}-{max(accs):.1f}",
                f"{100 * statistics.mean(gates):.1f}" if gates else "-",
                "-" if fits[0] is None else f"{statistics.median(fits):.2f}",
            )
        console.print(t)


if __name__ == "__main__":
    main()
