"""The ``netmeld`` command line: a thin layer over the Python API.

Errors are printed as one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from netmeld._version import __version__
from netmeld.errors import NetmeldError

_console = Console(width=120)
_errors = Console(stderr=True, width=120)


def _cmd_demo(args: argparse.Namespace) -> int:
    from netmeld.demo import run

    run(args.out, seed=args.seed, console=_console)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from netmeld.methods import method_infos

    table = Table(title="registered methods", title_justify="left")
    table.add_column("method")
    table.add_column("data")
    table.add_column("what it does")
    table.add_column("parameters")
    for info in method_infos():
        params = ", ".join(f"{k}={v.default}" for k, v in info.params.model_fields.items()) or "-"
        table.add_row(info.name, info.data, info.summary, params)
    _console.print(table)
    from netmeld.ops.merge import KERNELS

    kernels = Table(
        title="weight-merging kernels (merge_members, merge-weights, recipe 'merge:')",
        title_justify="left",
    )
    kernels.add_column("kernel")
    kernels.add_column("needs")
    kernels.add_column("reference")
    kernels.add_column("parameters")
    for k in KERNELS.values():
        needs = "base" if k.needs_base else "inputs" if k.needs != "none" else "-"
        params = ", ".join(f"{p.rstrip('_')}={v}" for p, v in k.defaults.items()) or "-"
        kernels.add_row(k.name, needs, k.reference, params)
    _console.print(kernels)
    fusions = Table(
        title="fusion architectures (netmeld.fusion, netmeld train; need labeled data)",
        title_justify="left",
    )
    fusions.add_column("build")
    fusions.add_column("what it combines")
    fusions.add_column("options")
    fusions.add_row(
        "parallel",
        "branches side by side (same input or their own channels/columns), one head",
        "fuse=concat|sum|attention|gating, dim, inputs, freeze",
    )
    fusions.add_row(
        "hierarchical",
        "one network's features feed another; adapters where shapes differ",
        "cut, second_input_shape, adapt=auto|none, freeze",
    )
    fusions.add_row(
        "multitask",
        "a shared trunk, one head per task (labels 'task/label')",
        "weighting=fixed|uncertainty|gradnorm (Kendall 2018; Chen 2018), loss_weights, alpha, "
        "freeze",
    )
    _console.print(fusions)
    return 0


def _cmd_meld(args: argparse.Namespace) -> int:
    from netmeld.cli.recipes import run_recipe

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise NetmeldError(f"{str(out)!r} exists; pass --overwrite to replace it")
    model = run_recipe(args.recipe)
    model.save(out, overwrite=args.overwrite)
    _console.print(
        f"saved {len(model.labels)} labels from {len(model.members)} members "
        f"(method {model.method['name']!r}) to [bold]{out}[/bold]"
    )
    return 0


def _training_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """-o, --checkpoint-dir, --resume and --overwrite of the commands that train."""
    p.add_argument("-o", "--output", required=True, help=f"folder to write {what} to")
    p.add_argument(
        "--checkpoint-dir", default=None, help="folder for the per-epoch checkpoint (default: none)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


@contextlib.contextmanager
def _process_group() -> Iterator[int]:
    """Join the process group torchrun describes in the environment; yields this rank."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():  # launched by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_and_save(args: argparse.Namespace, run: Any, what: Any) -> int:
    """Run a training recipe (``run``) in torchrun's process group; rank 0 saves the model and
    prints ``what(model)``."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise NetmeldError(f"{str(out)!r} exists; pass --overwrite to replace it")
    with _process_group() as rank:
        model = run(args.recipe, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
        if rank == 0:
            model.save(out, overwrite=args.overwrite)
            _console.print(f"{what(model)} and saved it to [bold]{out}[/bold]")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from netmeld.cli.recipes import run_distill_recipe

    return _train_and_save(
        args,
        run_distill_recipe,
        lambda m: (
            f"distilled a student over {len(m.labels)} labels ({m.num_parameters:,} parameters)"
        ),
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from netmeld.cli.recipes import run_train_recipe

    def what(model: Any) -> str:
        params = model.method["params"]
        extra = ""
        if params.get("adapters"):
            extra = f"; adapters: {', '.join(params['adapters'])}"
        if params.get("learned_weights"):
            weights = ", ".join(f"{k} {v:.2f}" for k, v in params["learned_weights"].items())
            extra = f"; task weights: {weights}"
        return (
            f"trained a {model.method['name']} model over {len(model.labels)} labels "
            f"({model.num_parameters:,} parameters{extra})"
        )

    return _train_and_save(args, run_train_recipe, what)


def _cmd_export(args: argparse.Namespace) -> int:
    from netmeld.members.bridges import export_onnx
    from netmeld.model.artifact import load

    model = load(args.model)
    diff = export_onnx(model, args.onnx, opset=args.opset, overwrite=args.overwrite)
    checked = (
        f"; onnxruntime matches PyTorch within {diff:.1e}"
        if diff is not None
        else " (onnxruntime is not installed: not checked)"
    )
    _console.print(
        f"exported {args.model} ({len(model.labels)} labels, dynamic batch, opset {args.opset}) "
        f"to [bold]{args.onnx}[/bold]{checked}"
    )
    return 0


def _cmd_merge_weights(args: argparse.Namespace) -> int:
    from netmeld.io.checkpoint_merge import merge_checkpoints, read_merge_recipe
    from netmeld.io.shards import CheckpointReader

    if Path(args.output).exists() and not args.overwrite:
        raise NetmeldError(f"{args.output!r} exists; pass --overwrite to replace it")
    recipe, base = read_merge_recipe(args.recipe)
    out = merge_checkpoints(recipe, args.output, base_dir=base, overwrite=args.overwrite)
    written = CheckpointReader(out)
    _console.print(
        f"merged {len(recipe.models)} models with {recipe.merge_method!r}: "
        f"{len(written)} tensors, {written.nbytes / 1e6:,.1f} MB in "
        f"{len(list(out.glob('*.safetensors')))} shard(s) at [bold]{out}[/bold]"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from netmeld.data import load_data
    from netmeld.evaluate import evaluate, render_table
    from netmeld.model.artifact import load

    models = {str(path): load(path) for path in args.models}
    first = next(iter(models.values()))
    data = load_data(
        args.data,
        first.input_shape,
        require_labels=True,
        what="--data",
        feature_names=first.feature_names,
    )
    reports = [
        evaluate(m, data, name=f"{name} ({m.method.get('name')})", batch_size=args.batch_size)
        for name, m in models.items()
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        _console.print(render_table(reports, title=f"{len(data)} examples from {args.data}"))
    return 0


def _cmd_extend(args: argparse.Namespace) -> int:
    from netmeld.methods.extend import extend
    from netmeld.model.artifact import load

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise NetmeldError(f"{str(out)!r} exists; pass --overwrite to replace it")
    model = load(args.model)
    extended = extend(
        model,
        args.examples,
        unlabeled=args.unlabeled,
        steps=args.steps,
        lr=args.lr,
        distill=args.distill,
        max_false_positives=args.max_false_positives,
        seed=args.seed,
    )
    extended.save(out, overwrite=args.overwrite)
    added = extended.method["extended"][-1]
    shots = ", ".join(f"{label} ({n})" for label, n in added["examples"].items())
    _console.print(
        f"added {len(added['labels'])} labels from examples: {shots}; "
        f"saved {len(extended.labels)} labels to [bold]{out}[/bold]",
        highlight=False,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from netmeld.data import image_files, read_image
    from netmeld.model.artifact import load

    model = load(args.model)
    files: list[Path] = []
    for f in args.files:
        p = Path(f)
        files.extend(image_files(p) if p.is_dir() else [p])
    if not files:
        raise NetmeldError("no image files given")
    x = torch.stack([read_image(p, model.input_shape) for p in files])
    probs = model.predict_proba(x)
    top = min(args.top, len(model.labels))
    rows = []
    for path, p in zip(files, probs, strict=True):
        values, idx = p.topk(top)
        top_labels = [
            (model.labels[i], float(v)) for v, i in zip(values, idx.tolist(), strict=True)
        ]
        rows.append({"file": str(path), "predictions": top_labels})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        ranked = ", ".join(f"{label} {100 * v:.1f}%" for label, v in row["predictions"])
        _console.print(f"{row['file']}: {ranked}", highlight=False)
    return 0


def _inspect_members(
    items: Sequence[str], arch: str | None, arch_kwargs: dict[str, Any]
) -> list[Any]:
    from netmeld.cli.recipes import read_recipe, recipe_members
    from netmeld.members.member import Member, Preprocessing, read_state_dict
    from netmeld.model.artifact import load
    from netmeld.model.combined import CONFIG_FILE

    members: list[Any] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and (p / CONFIG_FILE).is_file():
            members.extend(load(p).members)
        elif p.suffix in (".yaml", ".yml"):
            recipe, base = read_recipe(p)
            members.extend(recipe_members(recipe, base))
        else:
            if arch is None:
                raise NetmeldError(
                    f"{item!r}: give a recipe (.yaml), a netmeld model folder, or a checkpoint "
                    "with --arch ARCHITECTURE"
                )
            tensors = read_state_dict(p)
            num = _num_outputs(arch, arch_kwargs, tensors, item)
            members.append(
                Member.from_checkpoint(
                    p,
                    arch,
                    [f"class{i}" for i in range(num)],
                    name=_unique(p.stem, members),
                    preprocessing=Preprocessing((3, 224, 224)),
                    architecture_kwargs=arch_kwargs,
                )
            )
    return members


def _unique(name: str, members: Sequence[Any]) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9_\-]", "-", name) or "member"
    taken = {m.name for m in members}
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def _num_outputs(arch: str, arch_kwargs: dict[str, Any], tensors: dict[str, Any], item: str) -> int:
    """The number of classes a checkpoint's head has, read from its tensors."""
    from netmeld.members.graph import find_head
    from netmeld.members.member import Architecture, Member, Preprocessing

    module = Architecture.parse(arch, arch_kwargs).build()
    out = [m for m in module.modules() if hasattr(m, "out_features")]
    probe = (
        Member(
            module,
            [f"c{i}" for i in range(int(getattr(out[-1], "out_features", 0)))],
            name="probe",
            preprocessing=Preprocessing((3, 224, 224)),
        )
        if out
        else None
    )
    head = find_head(probe) if probe is not None else None
    key = f"{head}.weight" if head else None
    if key is None or key not in tensors:
        raise NetmeldError(f"{item!r}: cannot find the head tensor {key!r} in the checkpoint")
    return int(tensors[key].shape[0])


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from netmeld.members.graph import plan_groups, share_summary, trace_member

    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise NetmeldError(f"--arch-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(arch_kwargs, dict):
        raise NetmeldError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 16}'")
    members = _inspect_members(args.items, args.arch, arch_kwargs)
    traced = [trace_member(m) for m in members]
    rows = share_summary(traced, plan_groups(traced))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{len(members)} members", title_justify="left")
    for col in (
        "member",
        "labels",
        "shares trunk with",
        "trunk params",
        "own params",
        "head",
        "diverges at",
    ):
        table.add_column(col, justify="right" if "params" in col else "left")
    by_name = {m.name: m for m in members}
    for r in rows:
        labels = by_name[r["member"]].labels
        table.add_row(
            r["member"],
            ", ".join(labels[:4]) + (f" (+{len(labels) - 4})" if len(labels) > 4 else ""),
            ", ".join(r["shared_with"]) or "-",
            f"{r['trunk_parameters']:,}",
            f"{r['own_parameters']:,}",
            f"{r['head']} ({r['head_parameters']:,})",
            r["diverges_at"] or "-",
        )
    _console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netmeld",
        description="Combine trained classifiers into one model over the union of their labels.",
    )
    parser.add_argument("--version", action="version", version=f"netmeld {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="run the built-in digits demo (no download, ~1 minute)",
        description="Train members on sklearn's digits, combine them with every "
        "registered method, print a leaderboard and save the best model.",
    )
    p.add_argument(
        "--out",
        default="netmeld-demo-model",
        help="folder to save the best combined model to (default: %(default)s; "
        "a previous demo model there is replaced)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "methods",
        help="list the registered methods",
        description="List every registered method, the data it needs and its "
        "parameters with their defaults.",
    )
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "meld",
        help="combine members described by a YAML recipe",
        description="Load the members of RECIPE.yaml, combine them with its "
        "method and data, and save the combined model to a folder.",
    )
    p.add_argument("recipe", help="the YAML recipe (members, method, params, data)")
    p.add_argument("-o", "--output", required=True, help="folder to write the combined model to")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_cmd_meld)

    p = sub.add_parser(
        "distill",
        help="distil teachers into one student over the union of their labels",
        description="Train the student of RECIPE.yaml on the teachers' calibrated soft "
        "outputs over unlabeled (or proxy) images, or on inputs synthesized from the "
        "teachers (data_free: N). Runs on CPU or GPU; launch with torchrun for several "
        "GPUs or machines (DDP). With --checkpoint-dir a checkpoint is written after every "
        "epoch, and --resume continues from it.",
    )
    p.add_argument(
        "recipe",
        help="the YAML distillation recipe (teachers or teacher, union, "
        "student, data or data_free, temperature, schedule)",
    )
    _training_arguments(p, "the student")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "train",
        help="build and train a fusion architecture (parallel, hierarchical, multi-task)",
        description="Build the fused network of RECIPE.yaml (build: parallel | hierarchical | "
        "multitask, from trained members or fresh architectures, with frozen parts) and train "
        "it on labeled data through the shared engine: CPU or GPU, torchrun for several GPUs "
        "or machines (DDP), a checkpoint every epoch with --checkpoint-dir, --resume after a "
        "kill.",
    )
    p.add_argument(
        "recipe",
        help="the YAML training recipe (build, branches | first/second | trunk/tasks, labels, "
        "freeze, data, schedule)",
    )
    _training_arguments(p, "the trained model")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "export",
        help="export a saved combined model to ONNX",
        description="Write MODEL (a netmeld model folder) as ONNX with a dynamic batch size, "
        "then run it with onnxruntime on random inputs and compare with PyTorch (an error "
        "above 1e-4).",
    )
    p.add_argument("model", help="a netmeld model folder (netmeld.json + model.safetensors)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "merge-weights",
        help="merge checkpoints of one architecture in weight space (mergekit-style recipe)",
        description="Merge the safetensors checkpoints of RECIPE.yaml (models, base_model, "
        "merge_method, parameters with per-tensor filters, dtype, out_dtype, shard_size) into "
        "one checkpoint, tensor by tensor: memory holds a few tensors whatever the size. "
        "Methods: linear, slerp, task-arithmetic, ties, dare, dare-ties, breadcrumbs. "
        "Inputs may be sharded (a folder with model.safetensors.index.json).",
    )
    p.add_argument("recipe", help="the YAML merge recipe")
    p.add_argument(
        "-o", "--output", required=True, help="folder to write the merged (sharded) checkpoint to"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_cmd_merge_weights)

    p = sub.add_parser(
        "eval",
        help="evaluate combined models on labeled data",
        description="Union accuracy, per-member accuracy with the member known, "
        "task confusion, calibration error, parameters and latency, one row per "
        "model.",
    )
    p.add_argument("models", nargs="+", help="combined-model folders (several: side by side)")
    p.add_argument(
        "--data",
        required=True,
        help="a folder with one subfolder of images per label, or a .csv table with a "
        "'label' column",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="batch size for evaluation and latency (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "extend",
        help="add classes to a combined model from a few examples each",
        description="Add the labels of EXAMPLES (one subfolder of images per new label) to a "
        "saved combined model: weight imprinting from the members' normalised features, then "
        "a short fine-tuning that distils the old model's outputs on --unlabeled inputs so old "
        "classes keep their accuracy. The model given is not changed.",
    )
    p.add_argument("model", help="a combined-model folder")
    p.add_argument(
        "--examples",
        required=True,
        help="folder with one subfolder of example images per label; subfolders named after "
        "labels the model knows are used as old-class examples",
    )
    p.add_argument("-o", "--output", required=True, help="folder to write the extended model to")
    p.add_argument(
        "--unlabeled",
        help="folder of unlabeled images (mostly old classes) to distil the old outputs on; "
        "without it only the new weights are fine-tuned",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="fine-tuning steps after imprinting; 0 for imprinting only (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=float, default=1e-2, help="fine-tuning learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--distill",
        type=float,
        default=1.0,
        help="weight of the distillation of old outputs (default: %(default)s)",
    )
    p.add_argument(
        "--max-false-positives",
        type=float,
        default=0.005,
        help="share of the other inputs each new class may claim; sets its threshold "
        "(default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_cmd_extend)

    p = sub.add_parser(
        "predict",
        help="predict labels for image files",
        description="Print the top labels and probabilities for each image.",
    )
    p.add_argument("model", help="a combined-model folder")
    p.add_argument("files", nargs="+", help="image files, or folders of images")
    p.add_argument("--top", type=int, default=3, help="labels to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "inspect",
        help="show what members share and where they diverge",
        description="Find each member's head and the trunk members share with "
        "identical parameters; print parameter counts.",
    )
    p.add_argument(
        "items",
        nargs="+",
        help="recipes (.yaml), combined-model folders, or checkpoints (with --arch)",
    )
    p.add_argument("--arch", help="architecture of checkpoint files, e.g. torchvision:resnet18")
    p.add_argument(
        "--arch-kwargs",
        default="{}",
        help="keyword arguments of the architecture, as JSON (default: {})",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)
    return parser


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    _errors.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.showwarning = _show_warning
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        _errors.print("interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, NetmeldError):
            _errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            return 2
        _errors.print(
            f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
