"""Fusion architectures measured: parallel branches vs each branch alone (Fashion-MNIST), and a
multi-task network on MNIST + Fashion-MNIST with each loss weighting vs two single-task models.

Parallel (``--pair kernels``, the forum's pattern): branch A is a small CNN with 3x3 kernels
(``netmeld.zoo:small_cnn``), branch B the same CNN with 5x5 kernels; ``--pair mixed``: a tiny
3x3 CNN and a VGG (``netmeld.zoo:vgg``). Each is trained alone on the same images for the same
epochs; the fused network (both branches, fresh) is trained the same way with each fusion; and
the two trained members are fused with their branches frozen (only the fusion and head train,
one epoch).

Multi-task: one ``small_cnn`` trunk (``--trunk-width 32 --trunk-blocks 3`` by default), a
10-way head per task; half the training images are MNIST digits (labeled for task ``mnist``
only), half Fashion-MNIST (task ``fashion`` only). The
baseline is two single-task networks of the trunk's architecture, each trained on its own half.
Every model sees the same images for the same epochs.

    python benchmarks/fusion.py --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld.methods import fusion

CNN = netmeld.Architecture("netmeld.zoo:small_cnn", {"in_channels": 1, "width": 16, "blocks": 2})
VGG = netmeld.Architecture(
    "netmeld.zoo:vgg", {"in_channels": 1, "widths": [16, 32], "image_size": 28, "hidden": 64}
)
PAIRS = {
    "kernels": (
        (
            "A (CNN, 3x3)",
            netmeld.Architecture(
                "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 16, "blocks": 3}
            ),
        ),
        (
            "B (CNN, 5x5)",
            netmeld.Architecture(
                "netmeld.zoo:small_cnn",
                {"in_channels": 1, "width": 16, "blocks": 3, "kernel_size": 5},
            ),
        ),
    ),
    "mixed": (("A (CNN, 3x3)", CNN), ("B (VGG)", VGG)),
}


def images(name: str, split: str, n: int, seed: int, root: str | None):
    from _datasets import load_idx

    x, y = load_idx(name, split, root)
    idx = np.random.default_rng(seed).choice(len(x), n, replace=False)
    return torch.from_numpy(x[idx]).float().unsqueeze(1) / 255.0, [str(int(v)) for v in y[idx]]


def accuracy(model: netmeld.CombinedModel, data) -> float:
    x, labels = data
    return float(np.mean([p == t for p, t in zip(model.predict(x), labels, strict=True)]))


def single(arch: netmeld.Architecture, labels: list[str], name: str) -> netmeld.CombinedModel:
    """A fresh one-branch classifier: the same builder, so training is identical."""
    return fusion.parallel({name: arch}, labels, input_shape=(1, 28, 28))


def run_parallel(seed: int, args: argparse.Namespace) -> dict:
    train = images("fashion-mnist", "train", args.train, seed, args.data_root)
    test = images("fashion-mnist", "test", args.test, seed, args.data_root)
    labels = [str(i) for i in range(10)]
    fit = {"epochs": args.epochs, "lr": args.lr, "batch_size": 64, "seed": seed, "progress": False}
    rows: dict[str, dict] = {}

    def record(name: str, model: netmeld.CombinedModel, seconds: float) -> None:
        rows[name] = {"acc": accuracy(model, test), "params": model.num_parameters, "s": seconds}
        print(f"  seed {seed}: {name}: {rows[name]['acc']:.3f}", file=sys.stderr)

    trained = {}
    (_, arch_a), (_, arch_b) = PAIRS[args.pair]
    for name, arch in PAIRS[args.pair]:
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = netmeld.train(single(arch, labels, name[0]), train, **fit)
        record(f"branch {name} alone", model, time.perf_counter() - start)
        trained[name[0]] = model
    for fuse in fusion.FUSIONS:
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = netmeld.train(
            fusion.parallel({"A": arch_a, "B": arch_b}, labels, fuse=fuse, input_shape=(1, 28, 28)),
            train,
            **fit,
        )
        record(f"parallel A+B, {fuse}, trained together", model, time.perf_counter() - start)
    members = [
        netmeld.Member(
            m.members[0].module,
            labels,
            name=k,
            preprocessing={"input_shape": (1, 28, 28)},
            architecture=m.members[0].architecture,
            head="head",
        )
        for k, m in trained.items()
    ]
    for fuse in ("concat", "gating"):
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = netmeld.train(
            fusion.parallel(members, labels, fuse=fuse, freeze=["A", "B"]),
            train,
            **{**fit, "epochs": 1},
        )
        record(
            f"parallel of the trained A, B (frozen), {fuse}, +1 epoch",
            model,
            time.perf_counter() - start,
        )
    return rows


def run_multitask(seed: int, args: argparse.Namespace) -> dict:
    half = args.train // 2
    mx, my = images("mnist", "train", half, seed, args.data_root)
    fx, fy = images("fashion-mnist", "train", half, seed, args.data_root)
    mt, mty = images("mnist", "test", args.test, seed, args.data_root)
    ft, fty = images("fashion-mnist", "test", args.test, seed, args.data_root)
    train = (torch.cat([mx, fx]), [f"mnist/{v}" for v in my] + [f"fashion/{v}" for v in fy])
    test = (torch.cat([mt, ft]), [f"mnist/{v}" for v in mty] + [f"fashion/{v}" for v in fty])
    labels = [str(i) for i in range(10)]
    fit = {"epochs": args.epochs, "lr": args.lr, "batch_size": 64, "seed": seed, "progress": False}
    trunk = netmeld.Architecture(
        "netmeld.zoo:small_cnn",
        {"in_channels": 1, "width": args.trunk_width, "blocks": args.trunk_blocks},
    )
    rows: dict[str, dict] = {}
    total_params, total_s, accs = 0, 0.0, {}
    for task, data, evaluation in (
        ("mnist", (mx, my), (mt, mty)),
        ("fashion", (fx, fy), (ft, fty)),
    ):
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = netmeld.train(single(trunk, labels, task), data, **fit)
        total_s += time.perf_counter() - start
        total_params += model.num_parameters
        accs[task] = accuracy(model, evaluation)
    rows["two single-task CNNs"] = {**accs, "params": total_params, "s": total_s, "weights": "-"}
    for weighting in fusion.WEIGHTINGS:
        torch.manual_seed(seed)
        model = fusion.multitask(
            trunk,
            {"mnist": labels, "fashion": labels},
            weighting=weighting,
            loss_weights={"mnist": 0.5, "fashion": 0.5} if weighting == "fixed" else None,
            input_shape=(1, 28, 28),
        )
        start = time.perf_counter()
        out = netmeld.train(model, train, **fit)
        acc = fusion.task_accuracy(out, test)
        learned = out.method["params"]["learned_weights"]
        rows[f"multitask, {weighting}"] = {
            **acc,
            "params": out.num_parameters,
            "s": time.perf_counter() - start,
            "weights": " / ".join(f"{learned[t]:.2f}" for t in ("mnist", "fashion")),
        }
        print(f"  seed {seed}: multitask {weighting}: {acc}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train", type=int, default=10000, help="training images")
    parser.add_argument("--test", type=int, default=5000, help="test images (per task)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--parts", nargs="+", default=["parallel", "multitask"])
    parser.add_argument(
        "--pair", choices=sorted(PAIRS), default="kernels", help="parallel branches"
    )
    parser.add_argument("--trunk-width", type=int, default=32, help="multi-task trunk width")
    parser.add_argument("--trunk-blocks", type=int, default=3, help="multi-task trunk blocks")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if "parallel" in args.parts:
        per_seed = [run_parallel(s, args) for s in args.seeds]
        print(
            f"\nFashion-MNIST, branches {args.pair}, {args.train} training images, "
            f"{args.epochs} epochs, seeds {args.seeds}"
        )
        print("| model | accuracy % | parameters | train s |")
        print("|---|---|---|---|")
        for n in per_seed[0]:
            acc = np.mean([r[n]["acc"] for r in per_seed]) * 100
            sec = np.mean([r[n]["s"] for r in per_seed])
            print(f"| {n} | {acc:.1f} | {per_seed[0][n]['params']:,} | {sec:.0f} |")
    if "multitask" in args.parts:
        per_seed = [run_multitask(s, args) for s in args.seeds]
        print(
            f"\nMNIST + Fashion-MNIST as two tasks, {args.train} training images in all, "
            f"{args.epochs} epochs, seeds {args.seeds}"
        )
        print(
            "| model | MNIST % | Fashion-MNIST % | parameters | task weights (MNIST / Fashion) "
            "| train s |"
        )
        print("|---|---|---|---|---|---|")
        for n in per_seed[0]:
            m = np.mean([r[n]["mnist"] for r in per_seed]) * 100
            f = np.mean([r[n]["fashion"] for r in per_seed]) * 100
            sec = np.mean([r[n]["s"] for r in per_seed])
            print(
                f"| {n} | {m:.1f} | {f:.1f} | {per_seed[0][n]['params']:,} | "
                f"{per_seed[0][n]['weights']} | {sec:.0f} |"
            )


if __name__ == "__main__":
    main()
