"""Two models trained from different initialisations on disjoint tasks, merged into one (the
ZipIt! setting): union accuracy and compute of weight averaging, permutation alignment,
ZipIt!-style full and partial zipping, against the two-model ensemble.

- cifar10 5+5: a CIFAR ResNet-20 (x1 width on CPU; ``--full``: x4, the paper's model) per task,
  classes 0-4 and 5-9; BatchNorm statistics are reset on data after merging.
- mnist / fashion-mnist 5+5: a VGG-style CNN without BatchNorm (REPAIR after merging).

Every merge sees ``--unlabeled`` training images of both tasks (no labels); the heads stay per
member and are concatenated (the union over all ten labels; ZipIt!'s "joint" accuracy).
Union accuracy = top-1 over the ten labels on the test set; MACs per image (a shared trunk
counts once). Published for reference (ZipIt!, ResNet-20x4 on CIFAR-10 5+5, joint accuracy):
ZipIt! 20/20 79.1 %, ensemble 87.4 %. This CPU run uses a short schedule: compare methods with
each other, not with the paper.

    python benchmarks/disjoint_merge.py --datasets cifar10 mnist fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld import Architecture, Member, Preprocessing, evaluate
from netmeld.demo.scenarios import train_classifier
from netmeld.methods.merge import count_macs
from netmeld.zoo import resnet20, vgg

TASKS = [list(range(5)), list(range(5, 10))]


def load(dataset: str, root: str | None) -> dict:
    import _datasets as ds

    if dataset == "cifar10":
        xtr, ytr, classes = ds.load_cifar10("train", root=root)
        xte, yte, _ = ds.load_cifar10("test", root=root)
        to_t = lambda a: torch.tensor(a, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0  # noqa: E731
        mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    else:
        xtr, ytr = ds.load_idx(dataset, "train", root)  # type: ignore[arg-type]
        xte, yte = ds.load_idx(dataset, "test", root)  # type: ignore[arg-type]
        classes = [str(i) for i in range(10)]
        to_t = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0  # noqa: E731
        mean, std = (0.2,), (0.3,)
    return {
        "xtr": to_t(xtr),
        "ytr": ytr,
        "xte": to_t(xte),
        "yte": yte,
        "classes": classes,
        "mean": mean,
        "std": std,
    }


def build(dataset: str, n_classes: int, full: bool) -> tuple[torch.nn.Module, Architecture]:
    if dataset == "cifar10":
        kw = {"num_classes": n_classes, "width": 4 if full else 1}
        return resnet20(**kw), Architecture("netmeld.zoo:resnet20", kw)
    kw = {
        "num_classes": n_classes,
        "in_channels": 1,
        "widths": [32, 64, 64],
        "image_size": 28,
        "hidden": 128,
    }
    return vgg(**kw), Architecture("netmeld.zoo:vgg", kw)


def train_member(data: dict, dataset: str, task: list[int], seed: int, args) -> Member:
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(np.isin(data["ytr"], task))
    if args.train_per_task:
        idx = rng.choice(idx, size=min(args.train_per_task, len(idx)), replace=False)
    remap = {c: i for i, c in enumerate(task)}
    y = torch.tensor([remap[v] for v in data["ytr"][idx]])
    pre = Preprocessing(tuple(data["xtr"].shape[1:]), mean=data["mean"], std=data["std"])
    x = (data["xtr"][idx] - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(pre.std).view(
        1, -1, 1, 1
    )
    torch.manual_seed(seed)
    model, arch = build(dataset, len(task), args.full)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    train_classifier(
        model,
        x.to(device),
        y.to(device),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=128,
        seed=seed,
        augment=dataset == "cifar10",
    )
    model.cpu().eval()
    labels = [data["classes"][c] for c in task]
    return Member(model, labels, name=f"task{task[0]}", preprocessing=pre, architecture=arch)


def run(dataset: str, seed: int, args) -> dict:
    data = load(dataset, args.data_root)
    start = time.perf_counter()
    a = train_member(data, dataset, TASKS[0], seed * 2 + 1, args)
    b = train_member(data, dataset, TASKS[1], seed * 2 + 2, args)
    print(
        f"  {dataset} seed {seed}: members trained in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    rng = np.random.default_rng(seed)
    unlabeled = data["xtr"][rng.choice(len(data["xtr"]), args.unlabeled, replace=False)]
    test_idx = rng.choice(len(data["xte"]), min(args.test, len(data["xte"])), replace=False)
    test = (data["xte"][test_idx], [data["classes"][v] for v in data["yte"][test_idx]])
    example = test[0][:1]
    rows: dict[str, dict] = {}

    def record(name: str, model: netmeld.CombinedModel, seconds: float) -> None:
        rows[name] = {
            "acc": evaluate(model, test).union_accuracy,
            "macs": count_macs(model, example),
            "seconds": seconds,
        }

    for m in (a, b):
        known = float(np.mean([lab in m.labels for lab in test[1]]))
        single = netmeld.meld([m], "concat")
        with torch.no_grad():
            pred = [single.labels[i] for i in single(test[0]).argmax(1).tolist()]
        acc = float(np.mean([p == t for p, t in zip(pred, test[1], strict=True)]))
        rows[f"member {m.name} alone (knows {known:.0%})"] = {
            "acc": acc,
            "macs": count_macs(single, example),
            "seconds": 0.0,
        }
    t = time.perf_counter()
    record(
        "ensemble (both models, concat heads)",
        netmeld.meld([a, b], "concat"),
        time.perf_counter() - t,
    )
    for name, kw in (
        ("weight average", {"align": "none"}),
        ("permute (weight matching) + average", {"align": "weight"}),
        ("permute (activation matching) + average", {"align": "activation"}),
    ):
        t = time.perf_counter()
        model = netmeld.merge_members([a, b], "linear", data=unlabeled, **kw)
        record(name, model, time.perf_counter() - t)
    t = time.perf_counter()
    full = netmeld.zip_members([a, b], unlabeled)
    record(
        f"ZipIt! full ({full.method['merge']['layers']} layers zipped)",
        full,
        time.perf_counter() - t,
    )
    for depth in full.method["merge"]["valid_layers"][:-1]:
        t = time.perf_counter()
        part = netmeld.zip_members([a, b], unlabeled, layers=depth)
        record(f"ZipIt! partial (first {depth} layers zipped)", part, time.perf_counter() - t)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["cifar10", "mnist", "fashion-mnist"],
        choices=["cifar10", "mnist", "fashion-mnist"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs per member (default: 4 on CPU, 40 with --full)",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--train-per-task", type=int, default=None, help="training images per task (default: all)"
    )
    parser.add_argument(
        "--unlabeled", type=int, default=2000, help="unlabeled training images the merges see"
    )
    parser.add_argument("--test", type=int, default=4000, help="test images")
    parser.add_argument(
        "--full", action="store_true", help="the paper's protocol on a GPU: ResNet-20x4, 40 epochs"
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 40 if args.full else 4
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = {}
    for ds in args.datasets:
        per_seed = [run(ds, s, args) for s in args.seeds]
        names = list(per_seed[0])
        results[ds] = per_seed
        net = "VGG" if ds != "cifar10" else "ResNet-20x4" if args.full else "ResNet-20x1"
        print(f"\n{ds} 5+5, {net}, {args.epochs} epochs, mean over seeds {args.seeds}")
        print("| method | union acc % | MACs / image (M) | merge s |")
        print("|---|---|---|---|")
        for n in names:
            acc = np.mean([r[n]["acc"] for r in per_seed]) * 100
            macs = np.mean([r[n]["macs"] for r in per_seed]) / 1e6
            sec = np.mean([r[n]["seconds"] for r in per_seed])
            print(f"| {n} | {acc:.1f} | {macs:.1f} | {sec:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
