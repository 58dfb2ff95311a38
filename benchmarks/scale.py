"""Real data sizes: memory, throughput, trunk sharing and the feature cache of netmeld eval.

Data: CIFAR-10 test images (``$NETMELD_DATA/cifar10/cifar10-jpeg75.tar.gz``) resized to
224x224 and saved as JPEG folders of 500, 2,000 and 8,000 images (one subfolder per class),
made once under ``--work``. Model: torchvision's MobileNetV3-small trunk (random weights: speed
and memory do not depend on them) with two heads, melded with ``concat``.

Tables (medians of ``--repeats`` runs; ratios measured side by side in this run):

1. peak RSS of ``netmeld eval MODEL --data DIR`` (a fresh process each) over the three sizes,
   and, with ``--before REV``, the same for netmeld at git revision REV (its own worktree);
2. throughput of ``netmeld.evaluate`` against a plain ``ImageFolder`` + ``DataLoader`` + model
   loop, same workers and model;
3. a combined model of three members on one trunk against one member alone and the three run
   separately;
4. ``compare`` over six combined models of the same members (feature cache) against
   ``evaluate`` of one;
5. threads: the evaluation at 1 and 2 torch threads, and ``netmeld demo`` with torch's
   default threads against ``OMP_NUM_THREADS=1``.

    NETMELD_DATA=../shared/data python benchmarks/scale.py
    python benchmarks/scale.py --sizes 500 2000 --repeats 3 --before 0a0841f
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import netmeld
from netmeld.methods._extract import FeatureCache

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
console = Console()


def make_folders(data: Path, work: Path, sizes: list[int]) -> dict[int, Path]:
    """Folders of ``n`` 224x224 JPEGs (the first n/10 test images of each class)."""
    from PIL import Image

    archive = data / "cifar10" / "cifar10-jpeg75.tar.gz"
    if not archive.is_file():
        sys.exit(f"missing {archive}: set NETMELD_DATA to the shared data folder")
    out = {}
    todo = [n for n in sizes if not (work / f"images-{n}.done").is_file()]
    if todo:
        biggest = max(todo)
        per_class: dict[str, list[bytes]] = {c: [] for c in CLASSES}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if len(parts) >= 3 and parts[-3] == "test" and member.isfile():
                    label = parts[-2]
                    if len(per_class[label]) < biggest // 10:
                        per_class[label].append(tar.extractfile(member).read())  # type: ignore[union-attr]
        for n in todo:
            folder = work / f"images-{n}"
            for label, images in per_class.items():
                (folder / label).mkdir(parents=True, exist_ok=True)
                for i, raw in enumerate(images[: n // 10]):
                    image = Image.open(io.BytesIO(raw)).convert("RGB").resize((224, 224))
                    image.save(folder / label / f"{i:05d}.jpg", quality=90)
            (work / f"images-{n}.done").write_text("")
    for n in sizes:
        out[n] = work / f"images-{n}"
    return out


def make_members(k: int) -> list[netmeld.Member]:
    """``k`` members on one MobileNetV3-small trunk, each with its own head (the classes split)."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    groups = [CLASSES[i::k] for i in range(k)]
    members = []
    for i, labels in enumerate(groups):
        module = torchvision.models.mobilenet_v3_small(num_classes=len(labels)).eval()
        state = {k2: v for k2, v in base.state_dict().items() if not k2.startswith("classifier.3")}
        module.load_state_dict(state, strict=False)
        members.append(
            netmeld.Member(
                module,
                labels,
                name=f"m{i}",
                preprocessing={
                    "input_shape": (3, 224, 224),
                    "mean": (0.485, 0.456, 0.406),
                    "std": (0.229, 0.224, 0.225),
                },
                architecture=netmeld.Architecture(
                    "torchvision:mobilenet_v3_small", {"num_classes": len(labels)}
                ),
            )
        )
    return members


def peak_rss_mb(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Peak resident memory (MB) and wall seconds of one fresh process running ``command``."""
    import tempfile

    with tempfile.TemporaryFile() as err_file:  # a file, not a pipe: a full pipe would hang
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err_file, env=env or dict(os.environ)
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{err}")
    return usage.ru_maxrss / 1024, wall


def median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_loop(model: torch.nn.Module, folder: Path, workers: int, batch_size: int) -> int:
    """What a PyTorch user writes: ImageFolder + DataLoader + the model, counting correct."""
    import torchvision
    from torchvision import transforms

    ds = torchvision.datasets.ImageFolder(
        str(folder),
        transform=transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()]),
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
    return correct


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("NETMELD_DATA", "../shared/data"))
    parser.add_argument("--work", default="/tmp/netmeld-scale", help="where folders are made")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=netmeld.data.default_workers())
    parser.add_argument("--before", help="a git revision to measure peak RSS of too")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(Path(args.data), work, args.sizes)
    members = make_members(2)
    model = netmeld.meld(members, "concat")
    saved = model.save(work / "model", overwrite=(work / "model").exists())
    results: dict[str, Any] = {"workers": args.workers, "threads": torch.get_num_threads()}
    mid = (
        folders[sorted(folders)[len(folders) // 2]] if len(folders) > 1 else folders[args.sizes[0]]
    )
    n_mid = sorted(folders)[len(folders) // 2] if len(folders) > 1 else args.sizes[0]

    # 1. peak RSS
    rss_rows, rss = [], {}
    before_src = None
    if args.before:
        tree = work / f"before-{args.before}"
        if not tree.exists():
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), args.before], check=True
            )
        before_src = tree / "src"
    for n, folder in sorted(folders.items()):
        command = [sys.executable, "-m", "netmeld", "eval", str(saved), "--data", str(folder)]
        command += ["--json"]  # the revision before had no --device (it ran on the CPU)
        mb, wall = peak_rss_mb([*command, "--device", "cpu"])
        rss[n] = {"rss_mb": mb, "wall_s": wall}
        row = [f"{n:,}", f"{mb:,.0f}", f"{n / wall:,.0f}"]
        if before_src is not None:
            env = dict(os.environ, PYTHONPATH=str(before_src))
            old = command
            if n <= 2000:
                mb_old, wall_old = peak_rss_mb(old, env)
                rss[n].update(before_rss_mb=mb_old, before_wall_s=wall_old)
                row += [f"{mb_old:,.0f}", f"{n / wall_old:,.0f}"]
            else:
                row += ["(not run)", ""]
        rss_rows.append(row)
    results["rss"] = rss
    columns = ["images", "peak RSS (MB)", "images/s (incl. start)"]
    if before_src is not None:
        columns += [f"RSS at {args.before} (MB)", f"images/s at {args.before}"]
    table("1. netmeld eval, one fresh process per size", columns, rss_rows)
    sizes = sorted(rss)
    if len(sizes) > 1:
        ratio = rss[sizes[-1]]["rss_mb"] / rss[sizes[0]]["rss_mb"]
        console.print(f"largest / smallest peak RSS: {ratio:.2f}x (target ≤ 1.2x)")
        results["rss_ratio"] = ratio

    # 2. throughput against a plain DataLoader loop
    def ours() -> None:
        netmeld.evaluate(
            model, mid, latency=False, cache=False, workers=args.workers, progress=False
        )

    def plain() -> None:
        plain_loop(model, mid, args.workers, 256)

    ours(), plain()  # warm the file cache
    t_ours, t_plain = median_time(ours, args.repeats), median_time(plain, args.repeats)
    results["throughput"] = {"netmeld": n_mid / t_ours, "plain": n_mid / t_plain}
    table(
        f"2. throughput over {n_mid:,} images, {args.workers} workers",
        ["loop", "images/s", "ratio"],
        [
            ["plain ImageFolder + DataLoader + model", f"{n_mid / t_plain:,.1f}", "1.00"],
            ["netmeld.evaluate", f"{n_mid / t_ours:,.1f}", f"{t_plain / t_ours:.2f}"],
        ],
    )

    # 3. three members on one trunk
    three = make_members(3)
    combined = netmeld.meld(three, "concat").eval()
    x = torch.rand(64, 3, 224, 224)
    with torch.no_grad():
        t_comb = median_time(lambda: combined(x), args.repeats + 2)
        t_one = median_time(lambda: three[0].module(x), args.repeats + 2)
        t_all = median_time(lambda: [m.module(x) for m in three], args.repeats + 2)
    results["sharing"] = {"combined": t_comb, "one": t_one, "three": t_all}
    table(
        "3. a batch of 64: three members on one shared trunk",
        ["run", "ms", "ratio to the combined model"],
        [
            ["combined model (trunk once, three heads)", f"{1000 * t_comb:.0f}", "1.00"],
            [
                "one member alone",
                f"{1000 * t_one:.0f}",
                f"combined / one = {t_comb / t_one:.2f} (target ≤ 1.1)",
            ],
            [
                "the three members one after another",
                f"{1000 * t_all:.0f}",
                f"combined / three = {t_comb / t_all:.2f} (target ≤ 0.4)",
            ],
        ],
    )

    # 4. six combined models of the same members, with the cache
    methods = ["concat", "weight-norm", "mean", "vote", "max-confidence"]
    six = {m: netmeld.meld(members, m) for m in methods}
    small = folders[min(folders)]  # calibrated on the smallest folder: a method that fits
    six["calibrate"] = netmeld.meld(members, "calibrate", small, progress=False)

    def one_model() -> None:
        netmeld.evaluate(
            six["concat"],
            mid,
            latency=False,
            cache=FeatureCache(),
            workers=args.workers,
            progress=False,
        )

    def six_models() -> None:
        netmeld.compare(
            six, mid, latency=False, cache=FeatureCache(), workers=args.workers, progress=False
        )

    def six_uncached() -> None:
        netmeld.compare(six, mid, latency=False, cache=False, workers=args.workers, progress=False)

    t1, t6 = median_time(one_model, args.repeats), median_time(six_models, args.repeats)
    t6u = median_time(six_uncached, 1)
    results["cache"] = {"one": t1, "six": t6, "six_uncached": t6u}
    table(
        f"4. evaluating combined models of the same two members over {n_mid:,} images",
        ["run", "s", "ratio to one"],
        [
            ["one model", f"{t1:.1f}", "1.00"],
            ["six models, feature cache", f"{t6:.1f}", f"{t6 / t1:.2f} (target ≤ 1.3)"],
            ["six models, no cache", f"{t6u:.1f}", f"{t6u / t1:.2f}"],
        ],
    )

    # 5. threads
    rows = []
    default_threads = torch.get_num_threads()
    by_threads = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        by_threads[threads] = median_time(ours, args.repeats)
    torch.set_num_threads(default_threads)
    best = min(by_threads.values())
    for threads, t in by_threads.items():
        rows.append(
            [
                f"evaluate, {threads} torch thread(s)",
                f"{n_mid / t:,.1f} images/s",
                f"{t / best:.2f}",
            ]
        )
    demo = {}
    for label, env in (
        (f"demo, default threads ({default_threads})", dict(os.environ, NETMELD_PROGRESS="0")),
        ("demo, OMP_NUM_THREADS=1", dict(os.environ, NETMELD_PROGRESS="0", OMP_NUM_THREADS="1")),
    ):
        walls = [
            peak_rss_mb([sys.executable, "-m", "netmeld", "demo"], env)[1]
            for _ in range(args.repeats)
        ]
        demo[label] = statistics.median(walls)
    best_demo = min(demo.values())
    rows += [[label, f"{t:.1f} s", f"{t / best_demo:.2f}"] for label, t in demo.items()]
    results["threads"] = {"evaluate": by_threads, "demo": demo}
    table("5. threads (ratio to the best setting)", ["run", "time", "ratio"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
