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

    python benchmarks/distill.py --seeds 0
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
from netmeld.distill import distill
from netmeld.methods.weights import count_macs


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
    test = sc["test"]
    example = test[0][:1]
    rows: dict[str, dict] = {}

    def record(name: str, model: netmeld.CombinedModel, seconds: float = 0.0) -> None:
        rows[name] = {
            "acc": netmeld.evaluate(model, test).union_accuracy,
            "macs": count_macs(model, example),
            "seconds": seconds,
        }

    naive = netmeld.meld(sc["members"], "concat")
    record("teachers, naive union (concat)", naive)
    teacher = netmeld.meld(sc["members"], "calibrate", sc["labeled"], seed=seed)
    record("teachers, calibrated union (the teacher)", teacher)
    modes = {
        "indist": ("student, in-distribution unlabeled", unlabeled, {}),
        "proxy": ("student, proxy images (MNIST)", proxy, {}),
        "datafree": (
            "student, data-free (DeepInversion)",
            None,
            {"data_free": args.data_free, "synthesis": {"steps": args.synthesis_steps}},
        ),
    }
    for name, data, kw in (modes[m] for m in args.modes):
        kw = {**kw, "hint_weight": args.hint_weight}
        start = time.perf_counter()
        student = distill(teacher, data, epochs=args.epochs, seed=seed, progress=False, **kw)
        record(name, student, time.perf_counter() - start)
        print(
            f"  seed {seed}: {name}: {rows[name]['acc']:.3f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    record("same CNN trained with all labels", netmeld.meld([sc["oracle"]], "concat"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
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
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    per_seed = [run(s, args) for s in args.seeds]
    names = list(per_seed[0])
    teacher_macs = np.mean(
        [r["teachers, calibrated union (the teacher)"]["macs"] for r in per_seed]
    )
    print(f"\nFashion-MNIST, teachers know classes 0-6 and 3-9; mean over seeds {args.seeds}")
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
