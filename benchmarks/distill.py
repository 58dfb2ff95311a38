"""Two teachers with different label sets distilled into one student of one teacher's size.

Fashion-MNIST: the teachers are the small CNNs of ``benchmarks/ensembles.py`` (classes 0-6 and
3-9, trained on disjoint halves); their calibrated union (``calibrate`` on 20 labels per class)
is the teacher. The student is a copy of the first teacher's architecture with a ten-way head,
started from its weights, distilled on

- in-distribution unlabeled images (Fashion-MNIST training images, no labels),
- proxy images (MNIST digits: another data set),
- data-free inputs synthesized from the teachers' BatchNorm statistics (DeepInversion).

Reported: union accuracy of the naive union, the calibrated union, each student, and the
same CNN trained with every label ("student trained with all labels"), with MACs per image.

CIFAR-10 (``--dataset cifar10``): the teachers are the pretrained CIFAR-10 ResNet-20 and
ResNet-32 of ``../shared/data/pretrained`` (option-A shortcuts, ``netmeld.zoo.resnet20``), the
first keeping only its head's rows for classes 0-4, the second for 5-9; their calibrated union
(20 labels per class) is the teacher. The student is a ResNet-20 (one teacher's size) from the
first teacher's weights, distilled on unlabeled CIFAR-10 training images, on proxy images
(Fashion-MNIST, padded to 32x32 and repeated to RGB) or on synthesized inputs. The upper bound is
the ResNet-20 checkpoint itself (trained with all labels, on the original CIFAR-10). Both
teachers' bodies were trained on all ten classes, so this is the forum's "transfer-learned from
one base" case, not two networks that never saw the other's classes.

    python benchmarks/distill.py --seeds 0
    python benchmarks/distill.py --dataset cifar10 --seeds 0 --epochs 5 --unlabeled 10000

``--teachers scratch`` trains the two CIFAR-10 teachers (ResNet-20) from scratch, each on its own
five classes only (``--member-epochs``, the recipe of ``benchmarks/disjoint_merge.py``), and the
upper bound likewise on all ten: the hard case, where neither teacher has seen the other's
classes.
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
import netmeld.zoo
from netmeld.methods.distill import distill
from netmeld.methods.merge import count_macs


def measure(
    seed: int,
    args: argparse.Namespace,
    members: list[netmeld.Member],
    labeled: tuple,
    test: tuple,
    unlabeled: torch.Tensor,
    proxy: tuple[str, torch.Tensor],
    oracle: tuple[netmeld.Member, str],
) -> dict:
    """Union accuracy, MACs and distillation time of the naive and calibrated unions, each
    student of ``args.modes`` and the network trained with all labels."""
    rows: dict[str, dict] = {}

    def record(name: str, model: netmeld.CombinedModel, seconds: float = 0.0) -> None:
        rows[name] = {
            "acc": netmeld.evaluate(model, test).union_accuracy,
            "macs": count_macs(model, test[0][:1]),
            "seconds": seconds,
        }
        print(f"  seed {seed}: {name}: {rows[name]['acc']:.3f} ({seconds:.0f} s)", file=sys.stderr)

    record("teachers, naive union (concat)", netmeld.meld(members, "concat"))
    teacher = netmeld.meld(members, "calibrate", labeled, seed=seed)
    record("teachers, calibrated union (the teacher)", teacher)
    modes = {
        "indist": ("student, in-distribution unlabeled", unlabeled, {}),
        "proxy": (proxy[0], proxy[1], {}),
        "datafree": (
            "student, data-free (DeepInversion)",
            None,
            {"data_free": args.data_free, "synthesis": {"steps": args.synthesis_steps}},
        ),
    }
    for name, data, kw in (modes[m] for m in args.modes):
        start = time.perf_counter()
        student = distill(
            teacher,
            data,
            epochs=args.epochs,
            lr=args.lr,
            seed=seed,
            progress=False,
            hint_weight=args.hint_weight,
            **kw,
        )
        record(name, student, time.perf_counter() - start)
    record(oracle[1], netmeld.meld([oracle[0]], "concat"))
    return rows


def run(seed: int, args: argparse.Namespace) -> dict:
    from _datasets import load_idx
    from ensembles import fashion_scenario

    sc = fashion_scenario(seed, args.data_root, args.per_member, args.member_epochs)
    rng = np.random.default_rng(seed + 100)
    to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 255.0  # noqa: E731
    fx, _ = load_idx("fashion-mnist", "train", args.data_root)
    mx, _ = load_idx("mnist", "train", args.data_root)
    unlabeled = to_t(fx[rng.choice(len(fx), args.unlabeled, replace=False)])
    proxy = to_t(mx[rng.choice(len(mx), args.unlabeled, replace=False)])
    return measure(
        seed,
        args,
        sc["members"],
        sc["labeled"],
        sc["test"],
        unlabeled,
        ("student, proxy images (MNIST)", proxy),
        (sc["oracle"], "same CNN trained with all labels"),
    )


CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cifar_resnet(depth: int, rows: list[int], classes: list[str], root: str | None):
    """A pretrained CIFAR-10 ResNet whose head keeps only ``rows``."""
    from _datasets import data_root

    path = next((data_root(root) / "pretrained").glob(f"resnet{depth}-*.th"), None)
    if path is None:
        raise SystemExit(f"no resnet{depth}-*.th under {data_root(root) / 'pretrained'}")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module.").replace("linear.", "fc."): v for k, v in state.items()}
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][rows], state["fc.bias"][rows]
    kwargs = {"depth": depth, "shortcut": "pad"}
    module = netmeld.zoo.resnet20(num_classes=len(rows), **kwargs)
    module.load_state_dict(state)
    return netmeld.Member(
        module,
        [classes[r] for r in rows],
        name=f"resnet{depth}",
        preprocessing={"input_shape": (3, 32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD},
        architecture=netmeld.Architecture("netmeld.zoo:resnet20", kwargs),
    )


def run_cifar(seed: int, args: argparse.Namespace) -> dict:
    from _datasets import load_cifar10, load_idx

    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    train_x, train_y, classes = load_cifar10("train", root=args.data_root)
    test_x, test_y, _ = load_cifar10("test", root=args.data_root)
    rng = np.random.default_rng(seed + 100)
    labeled_idx = np.concatenate(
        [rng.choice(np.flatnonzero(train_y == c), 20, replace=False) for c in range(10)]
    )
    rest = np.setdiff1d(np.arange(len(train_x)), labeled_idx)
    unlabeled = to_t(train_x[rng.choice(rest, args.unlabeled, replace=False)])
    fx, _ = load_idx("fashion-mnist", "train", args.data_root)
    proxy = torch.from_numpy(fx[rng.choice(len(fx), args.unlabeled, replace=False)]).float()
    proxy = torch.nn.functional.pad(proxy / 255.0, (2, 2, 2, 2)).unsqueeze(1).repeat(1, 3, 1, 1)
    labeled = (to_t(train_x[labeled_idx]), [classes[i] for i in train_y[labeled_idx]])
    test = (to_t(test_x), [classes[i] for i in test_y])
    if args.teachers == "pretrained":
        members = [
            cifar_resnet(20, list(range(5)), classes, args.data_root),
            cifar_resnet(32, list(range(5, 10)), classes, args.data_root),
        ]
        oracle = cifar_resnet(20, list(range(10)), classes, args.data_root)
        oracle_name = "ResNet-20 trained with all labels (the checkpoint)"
    else:  # two ResNet-20s trained from scratch on their own five classes only
        from disjoint_merge import load, train_member

        data = load("cifar10", args.data_root)
        member_args = argparse.Namespace(
            train_per_task=None, full=False, epochs=args.member_epochs, lr=2e-3
        )
        members = [
            train_member(data, "cifar10", task, seed, member_args)
            for task in (list(range(5)), list(range(5, 10)))
        ]
        oracle = train_member(data, "cifar10", list(range(10)), seed, member_args)
        oracle_name = f"ResNet-20 trained with all labels ({args.member_epochs} epochs)"
    oracle.name = "all-labels"
    return measure(
        seed,
        args,
        members,
        labeled,
        test,
        unlabeled,
        ("student, proxy images (Fashion-MNIST)", proxy),
        (oracle, oracle_name),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--teachers",
        choices=["pretrained", "scratch"],
        default="pretrained",
        help="cifar10: the pretrained ResNets with split heads, or ResNet-20s trained from "
        "scratch on their own classes (--member-epochs)",
    )
    parser.add_argument("--per-member", type=int, default=8000, help="training images per teacher")
    parser.add_argument("--member-epochs", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=5000, help="unlabeled / proxy images")
    parser.add_argument("--data-free", type=int, default=1000, help="synthesized inputs")
    parser.add_argument("--synthesis-steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30, help="distillation epochs")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["indist", "proxy", "datafree"],
        choices=["indist", "proxy", "datafree"],
    )
    parser.add_argument("--hint-weight", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    per_seed = [(run_cifar if args.dataset == "cifar10" else run)(s, args) for s in args.seeds]
    names = list(per_seed[0])
    teacher_macs = np.mean(
        [r["teachers, calibrated union (the teacher)"]["macs"] for r in per_seed]
    )
    split = "0-4 and 5-9" if args.dataset == "cifar10" else "0-6 and 3-9"
    print(f"\n{args.dataset}, teachers know classes {split}; mean over seeds {args.seeds}")
    print("| model | union acc % | MACs / image (M) | vs teacher cost | distil s |")
    print("|---|---|---|---|---|")
    for n in names:
        acc = np.mean([r[n]["acc"] for r in per_seed]) * 100
        macs = np.mean([r[n]["macs"] for r in per_seed])
        sec = np.mean([r[n]["seconds"] for r in per_seed])
        print(f"| {n} | {acc:.1f} | {macs / 1e6:.1f} | {macs / teacher_macs:.2f}x | {sec:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(per_seed, indent=2))


if __name__ == "__main__":
    main()
