"""netmeld's weight merging beside mergekit and rebasin, in one run.

1. Equal tensors: a tiny LLaMA (base + two fine-tuned variants made with ``save_pretrained``)
   merged by ``mergekit-yaml`` and ``netmeld merge-weights`` from the same YAML recipe
   (linear, task arithmetic, TIES, breadcrumbs: max abs difference; DARE-TIES: drawn with
   other random numbers, so compared by statistics), and plain torch safetensors files merged
   by ``mergekit-pytorch``.
2. Cost: a TIES merge of three ~0.7 GB checkpoints (>= 2 GB of inputs): wall time and peak
   RSS of each tool in a fresh process, median of ``--repeats`` runs (warm page cache), beside
   the time to read every input tensor once with netmeld's reader.
3. Permutation alignment: two MLPs (3 x 512 hidden, as in Git Re-Basin) from different seeds
   on Fashion-MNIST and MNIST; accuracy along the interpolation path after alignment by
   rebasin's PermutationCoordinateDescent and by netmeld's weight matching (+ REPAIR), and the
   alignment time (median of ``--repeats``).

The peers live in their own venv (never netmeld's dependencies)::

    python -m venv ../peers && ../peers/bin/pip install mergekit rebasin
    python benchmarks/weights_vs_peers.py --peers-python ../peers/bin/python

``HF_HUB_OFFLINE=1`` is set for mergekit. Needs the shared data for part 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netmeld.io.shards import CheckpointReader

ROOT = Path(__file__).resolve().parent.parent

MAKE_LLAMA = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out, hidden, layers, vocab, shard = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64),
                      vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=256)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(f"{out}/base", max_shard_size=shard, safe_serialization=True)
    for i, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(i + 1)
        model = LlamaForCausalLM(cfg)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3)
                 for k, v in base.state_dict().items()}
        model.load_state_dict(state)
        model.save_pretrained(f"{out}/{name}", max_shard_size=shard, safe_serialization=True)
    """
)

REBASIN = textwrap.dedent(
    """
    import sys, time, json, torch
    from safetensors.torch import load_file, save_file
    from rebasin import PermutationCoordinateDescent
    a_path, b_path, out_path = sys.argv[1:4]
    widths = json.loads(sys.argv[4])
    torch.set_num_threads(2)
    def mlp():
        layers, w = [], widths[0]
        for h in widths[1:-1]:
            layers += [torch.nn.Linear(w, h), torch.nn.ReLU()]
            w = h
        layers.append(torch.nn.Linear(w, widths[-1]))
        return torch.nn.Sequential(*layers)
    a, b = mlp(), mlp()
    a.load_state_dict(load_file(a_path)); b.load_state_dict(load_file(b_path))
    start = time.perf_counter()
    pcd = PermutationCoordinateDescent(a, b, torch.zeros(2, widths[0]), logging_level="error")
    pcd.rebasin()
    seconds = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, out_path)
    print(json.dumps({"seconds": seconds}))
    """
)

READ_ONCE = textwrap.dedent(
    """
    import sys, time
    from netmeld.io.shards import CheckpointReader
    start = time.perf_counter()
    total = 0
    for path in sys.argv[1:]:
        r = CheckpointReader(path)
        for name in r:
            total += r.get(name).numel()
    print(time.perf_counter() - start)
    """
)


def _hwm_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (``VmHWM``), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh process: wall seconds, its peak RSS in MB, stdout.

    The peak is the child's own ``VmHWM``, read every 10 ms until it exits (``ru_maxrss``
    would include this process's memory, which the child had before ``exec``)."""
    start = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        while proc.poll() is None:
            hwm = _hwm_mb(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}"
            )
        return seconds, peak, out.read().decode()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader}


def write_recipe(
    path: Path,
    method: str,
    models: list[str],
    base: str | None,
    model_params: list[dict],
    params: dict,
) -> Path:
    recipe: dict = {
        "merge_method": method,
        "dtype": "float32",
        "models": [
            {"model": m, "parameters": p} for m, p in zip(models, model_params, strict=True)
        ],
    }
    if base is not None:
        recipe["base_model"] = base
    if params:
        recipe["parameters"] = params
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


EQUAL_CASES = [
    ("linear", None, [{"weight": 0.6}, {"weight": 0.4}], {}),
    ("task_arithmetic", "base", [{"weight": 0.6}, {"weight": 0.4}], {"lambda": 0.9}),
    (
        "ties",
        "base",
        [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}],
        {"normalize": True},
    ),
    (
        "breadcrumbs",
        "base",
        [
            {"weight": 0.6, "density": 0.8, "gamma": 0.02},
            {"weight": 0.4, "density": 0.8, "gamma": 0.02},
        ],
        {},
    ),
    ("dare_ties", "base", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}], {}),
]


def mergekit(peers: Path, tool: str, recipe: Path, out: Path, extra: list[str]) -> list[str]:
    return [str(peers.parent / tool), str(recipe), str(out), *extra]


def netmeld_cmd(recipe: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "netmeld",
        "merge-weights",
        str(recipe),
        "-o",
        str(out),
        "--overwrite",
    ]


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    common = [k for k in a if k in b]
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in common)
    return diff, len(common), len(set(a) ^ set(b))


def part_equal(peers: Path, work: Path) -> list[dict]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [str(peers), "-c", MAKE_LLAMA, str(work), "128", "2", "512", "200KB"],
        check=True,
        env={**os.environ, **env},
    )
    rows = []
    for method, base, mparams, params in EQUAL_CASES:
        recipe = write_recipe(
            work / f"{method}.yaml",
            method,
            [str(work / "a"), str(work / "b")],
            None if base is None else str(work / base),
            mparams,
            params,
        )
        run_rss(
            mergekit(
                peers,
                "mergekit-yaml",
                recipe,
                work / f"mk-{method}",
                ["--no-copy-tokenizer", "--quiet", "--random-seed", "0"],
            ),
            env,
        )
        run_rss(netmeld_cmd(recipe, work / f"nm-{method}"), {"NETMELD_PROGRESS": "0"})
        mk, nm = tensors_of(work / f"mk-{method}"), tensors_of(work / f"nm-{method}")
        diff, n, odd = compare(mk, nm)
        row = {
            "tool": "mergekit-yaml",
            "method": method,
            "tensors": n,
            "unmatched": odd,
            "max_abs_diff": diff,
        }
        if method == "dare_ties":
            base_t = tensors_of(work / "base")
            kept = [float(((t - base_t[k]) != 0).float().mean()) for k, t in mk.items()]
            kept_nm = [float(((t - base_t[k]) != 0).float().mean()) for k, t in nm.items()]
            row["changed_share"] = (float(np.mean(kept)), float(np.mean(kept_nm)))
            row["delta_l1"] = (
                float(np.mean([float((t - base_t[k]).abs().mean()) for k, t in mk.items()])),
                float(np.mean([float((t - base_t[k]).abs().mean()) for k, t in nm.items()])),
            )
        rows.append(row)
    # mergekit-pytorch on plain torch safetensors (a CIFAR ResNet-20's state dicts)
    from safetensors.torch import save_file

    from netmeld.zoo import resnet20

    torch.manual_seed(0)
    states = {}
    base_state = resnet20().state_dict()
    for i, name in enumerate(["base", "a", "b"]):
        g = torch.Generator().manual_seed(i)
        states[name] = {
            k: (
                v + 0.01 * torch.randn(v.shape, generator=g) if i and v.is_floating_point() else v
            ).contiguous()
            for k, v in base_state.items()
        }
        save_file(states[name], str(work / f"pt-{name}.safetensors"))
    for method, base, mparams, params in EQUAL_CASES[:3]:
        recipe = write_recipe(
            work / f"pt-{method}.yaml",
            method,
            [str(work / "pt-a.safetensors"), str(work / "pt-b.safetensors")],
            None if base is None else str(work / "pt-base.safetensors"),
            mparams,
            params,
        )
        run_rss(mergekit(peers, "mergekit-pytorch", recipe, work / f"mkpt-{method}", []), env)
        run_rss(netmeld_cmd(recipe, work / f"nmpt-{method}"), {"NETMELD_PROGRESS": "0"})
        diff, n, odd = compare(
            tensors_of(work / f"mkpt-{method}"), tensors_of(work / f"nmpt-{method}")
        )
        rows.append(
            {
                "tool": "mergekit-pytorch",
                "method": method,
                "tensors": n,
                "unmatched": odd,
                "max_abs_diff": diff,
            }
        )
    return rows


def part_cost(peers: Path, work: Path, repeats: int, hidden: int, layers: int, method: str) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    big = work / "big"
    big.mkdir(parents=True, exist_ok=True)
    if not (big / "b").exists():
        subprocess.run(
            [str(peers), "-c", MAKE_LLAMA, str(big), str(hidden), str(layers), "32000", "500MB"],
            check=True,
            env={**os.environ, **env},
        )
    inputs = [big / "base", big / "a", big / "b"]
    sparse = method != "linear"
    used = inputs if sparse else inputs[1:]  # linear reads a and b only
    size = sum(CheckpointReader(p).nbytes for p in used)
    recipe = write_recipe(
        big / f"{method}.yaml",
        method,
        [str(big / "a"), str(big / "b")],
        str(big / "base") if sparse else None,
        [
            {"weight": 0.6, **({"density": 0.5} if sparse else {})},
            {"weight": 0.4, **({"density": 0.5} if sparse else {})},
        ],
        {},
    )
    results: dict[str, list[tuple[float, float]]] = {"read": [], "mergekit": [], "netmeld": []}
    read_cmd = [sys.executable, "-c", READ_ONCE, *map(str, used)]
    run_rss(read_cmd)  # warm the page cache
    for _ in range(repeats):
        results["read"].append(run_rss(read_cmd)[:2])
        results["mergekit"].append(
            run_rss(
                mergekit(
                    peers,
                    "mergekit-yaml",
                    recipe,
                    big / "mk-out",
                    ["--no-copy-tokenizer", "--quiet", "--out-shard-size", "500M"],
                ),
                env,
            )[:2]
        )
        results["netmeld"].append(
            run_rss(netmeld_cmd(recipe, big / "nm-out"), {"NETMELD_PROGRESS": "0"})[:2]
        )
    diff, n, _ = compare(tensors_of(big / "mk-out"), tensors_of(big / "nm-out"))
    return {
        "input_gb": size / 1e9,
        "checkpoints": len(used),
        "max_abs_diff": diff,
        "tensors": n,
        **{
            k: {
                "seconds": statistics.median(s for s, _ in v),
                "rss_mb": statistics.median(r for _, r in v),
            }
            for k, v in results.items()
        },
    }


def _mlp(widths: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    w = widths[0]
    for h in widths[1:-1]:
        layers += [torch.nn.Linear(w, h), torch.nn.ReLU()]
        w = h
    layers.append(torch.nn.Linear(w, widths[-1]))
    return torch.nn.Sequential(*layers)


def part_rebasin(
    peers: Path, work: Path, dataset: str, repeats: int, epochs: int, root: str | None
) -> dict:
    from _datasets import load_idx
    from safetensors.torch import load_file, save_file

    from netmeld.demo.scenarios import train_classifier
    from netmeld.methods.permutation import align, interpolate, repair

    xtr, ytr = load_idx(dataset, "train", root)  # type: ignore[arg-type]
    xte, yte = load_idx(dataset, "test", root)  # type: ignore[arg-type]
    to_x = lambda a: torch.tensor(a.reshape(len(a), -1), dtype=torch.float32) / 255.0  # noqa: E731
    xtr_t, xte_t = to_x(xtr), to_x(xte)
    ytr_t, yte_t = torch.tensor(ytr, dtype=torch.long), torch.tensor(yte, dtype=torch.long)
    widths = [784, 512, 512, 512, 10]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = _mlp(widths)
        train_classifier(m, xtr_t, ytr_t, epochs=epochs, lr=1e-3, batch_size=256, seed=seed)
        models.append(m.eval())
        save_file(
            {k: v.contiguous() for k, v in m.state_dict().items()},
            str(work / f"{dataset}-{seed}.safetensors"),
        )

    @torch.no_grad()
    def acc(m: torch.nn.Module) -> float:
        return float((m(xte_t).argmax(1) == yte_t).float().mean())

    lambdas = [i / 10 for i in range(11)]

    def path(a: torch.nn.Module, b: torch.nn.Module, fix=None) -> list[float]:
        out = []
        for t in lambdas:
            m = interpolate(a, b, t)
            if fix is not None and 0 < t < 1:
                m = fix(m, t)
            out.append(acc(m))
        return out

    def barrier(accs: list[float]) -> float:
        return max((1 - t) * accs[0] + t * accs[-1] - a for t, a in zip(lambdas, accs, strict=True))

    a, b = models
    rows = {"naive": {"path": path(a, b), "seconds": 0.0}}
    rb_times = []
    for _ in range(repeats):
        _, _, out = run_rss(
            [
                str(peers),
                "-c",
                REBASIN,
                str(work / f"{dataset}-0.safetensors"),
                str(work / f"{dataset}-1.safetensors"),
                str(work / f"{dataset}-rb.safetensors"),
                json.dumps(widths),
            ]
        )
        rb_times.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    rb = _mlp(widths)
    rb.load_state_dict(load_file(str(work / f"{dataset}-rb.safetensors")))
    rows["rebasin (weight matching)"] = {
        "path": path(a, rb.eval()),
        "seconds": statistics.median(rb_times),
    }
    nm_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        aligned = align(a, b, method="weight", example=xte_t[:2])
        nm_times.append(time.perf_counter() - start)
    rows["netmeld (weight matching)"] = {
        "path": path(a, aligned.model),
        "seconds": statistics.median(nm_times),
    }
    calib = xtr_t[:2000]
    rows["netmeld (weight matching + REPAIR)"] = {
        "path": path(
            a,
            aligned.model,
            fix=lambda m, t: repair(m, [a, aligned.model], aligned.spec, calib, weights=[1 - t, t]),
        ),
        "seconds": statistics.median(nm_times),
    }
    for r in rows.values():
        r["barrier"] = barrier(r["path"])
        r["midpoint"] = r["path"][5]
    return {"dataset": dataset, "ends": [acc(a), acc(b)], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-python", required=True, help="python of the venv with the peers")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["equal", "cost", "rebasin"],
        choices=["equal", "cost", "rebasin"],
    )
    parser.add_argument("--cost-methods", nargs="+", default=["ties", "linear"])
    parser.add_argument("--hidden", type=int, default=768, help="LLaMA width for the cost part")
    parser.add_argument("--layers", type=int, default=14, help="LLaMA depth for the cost part")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["fashion-mnist", "mnist"],
        choices=["fashion-mnist", "mnist"],
    )
    parser.add_argument("--epochs", type=int, default=5, help="MLP training epochs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    peers = Path(args.peers_python)
    work = Path(args.work or tempfile.mkdtemp(prefix="netmeld-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if "equal" in args.parts:
        rows = part_equal(peers, work / "equal")
        results["equal"] = rows
        print("\nSame recipe, same inputs: netmeld vs mergekit (float32)")
        print("| tool | method | tensors | max abs diff | note |")
        print("|---|---|---|---|---|")
        for r in rows:
            note = ""
            if "changed_share" in r:
                note = (
                    f"entries changed {r['changed_share'][0]:.3f} vs {r['changed_share'][1]:.3f}; "
                    f"mean abs delta {r['delta_l1'][0]:.2e} vs {r['delta_l1'][1]:.2e} "
                    "(other random draws)"
                )
            diff = r["max_abs_diff"]
            print(f"| {r['tool']} | {r['method']} | {r['tensors']} | {diff:.2e} | {note} |")
    for method in args.cost_methods if "cost" in args.parts else []:
        c = part_cost(peers, work / "cost", args.repeats, args.hidden, args.layers, method)
        results[f"cost-{method}"] = c
        read = c["read"]["seconds"]
        mk = c["mergekit"]["seconds"]
        print(
            f"\n{method} merge of {c['input_gb']:.2f} GB of inputs ({c['checkpoints']} "
            f"checkpoints), median of {args.repeats}, warm page cache; max abs diff netmeld vs "
            "mergekit "
            f"{c['max_abs_diff']:.2e} over {c['tensors']} tensors"
        )
        print("| | wall s | vs mergekit | vs reading once | peak RSS MB |")
        print("|---|---|---|---|---|")
        for key, label in (
            ("read", "read every input tensor the merge reads, once (netmeld reader)"),
            ("mergekit", "mergekit-yaml"),
            ("netmeld", "netmeld merge-weights"),
        ):
            s, r = c[key]["seconds"], c[key]["rss_mb"]
            print(f"| {label} | {s:.1f} | {s / mk:.2f}x | {s / read:.2f}x | {r:,.0f} |")
    if "rebasin" in args.parts:
        results["rebasin"] = []
        for ds in args.datasets:
            r = part_rebasin(peers, work, ds, args.repeats, args.epochs, args.data_root)
            results["rebasin"].append(r)
            print(
                f"\n{ds}: MLPs 784-512-512-512-10 from seeds 0 and 1 "
                f"({100 * r['ends'][0]:.1f} % and {100 * r['ends'][1]:.1f} %); test accuracy %"
            )
            print("| alignment | midpoint | barrier (points) | align s | path 0.0 ... 1.0 |")
            print("|---|---|---|---|---|")
            for name, row in r["rows"].items():
                p = " ".join(f"{100 * v:.1f}" for v in row["path"])
                print(
                    f"| {name} | {100 * row['midpoint']:.1f} | {100 * row['barrier']:.1f} | "
                    f"{row['seconds']:.2f} | {p} |"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
