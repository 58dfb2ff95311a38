"""What each ``netmeld`` subcommand does: one ``cmd_*`` function per verb, each a thin call of
the Python API (parse, validate, call, print). The parser is in :mod:`netmeld.cli.parser`."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from netmeld.errors import ExportError, NetmeldError

console = Console(width=120)


def cmd_demo(args: argparse.Namespace) -> int:
    from netmeld.demo import run

    run(args.out, seed=args.seed, console=console)
    return 0


def _output(args: argparse.Namespace) -> Path:
    """``--output``, refused when it exists and ``--overwrite`` is not given."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise NetmeldError(f"{str(out)!r} exists; pass --overwrite to replace it")
    return out


def _print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def cmd_methods(args: argparse.Namespace) -> int:
    from netmeld.methods import method_infos
    from netmeld.methods.fusion.parts import FUSION_NETS
    from netmeld.ops.merge import KERNELS

    def params(defaults: Mapping[str, Any]) -> str:
        return ", ".join(f"{k.rstrip('_')}={v}" for k, v in defaults.items()) or "-"

    _print_table(
        "registered methods",
        ("method", "data", "what it does", "parameters"),
        (
            (
                i.name,
                i.data + (" + unlabeled" if i.unlabeled else ""),
                i.summary,
                params({k: v.default for k, v in i.params.model_fields.items()}),
            )
            for i in method_infos()
        ),
    )
    _print_table(
        "weight-merging kernels (merge_members, merge-weights, recipe 'merge:')",
        ("kernel", "needs", "reference", "parameters"),
        (
            (
                k.name,
                "base" if k.needs_base else "inputs" if k.needs != "none" else "-",
                k.reference,
                params(k.defaults),
            )
            for k in KERNELS.values()
        ),
    )
    _print_table(
        "fusion architectures (netmeld.fusion, netmeld train; need labeled data)",
        ("build", "what it combines", "options"),
        ((kind, net.summary, ", ".join(net.options)) for kind, net in FUSION_NETS.items()),
    )
    return 0


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    """The --device, --precision, --workers and --cache-dir a command was given, as keywords
    of the Python functions (checked before anything is read)."""
    from netmeld.runtime import resolve_device

    resolve_device(args.device)  # a GPU asked for on a machine without one: say so first
    runtime: dict[str, Any] = {"device": args.device}
    if hasattr(args, "precision"):
        runtime["precision"] = args.precision
    if hasattr(args, "workers"):
        runtime["workers"] = args.workers
    if hasattr(args, "cache_dir"):
        runtime["cache"] = args.cache_dir if args.cache_dir is not None else True
    return runtime


def cmd_meld(args: argparse.Namespace) -> int:
    from netmeld.cli.recipes import run_recipe

    out = _output(args)
    model = run_recipe(args.recipe, **_runtime(args))
    model.save(out, overwrite=args.overwrite)
    console.print(
        f"saved {len(model.labels)} labels from {len(model.members)} members "
        f"(method {model.method['name']!r}) to [bold]{out}[/bold]"
    )
    return 0


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
    out = _output(args)
    with _process_group() as rank:
        model = run(
            args.recipe,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            device=_runtime(args)["device"],
        )
        if rank == 0:
            model.save(out, overwrite=args.overwrite)
            console.print(f"{what(model)} and saved it to [bold]{out}[/bold]")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from netmeld.cli.recipes import run_distill_recipe

    return _train_and_save(
        args,
        run_distill_recipe,
        lambda m: (
            f"distilled a student over {len(m.labels)} labels ({m.num_parameters:,} parameters)"
        ),
    )


def cmd_train(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from netmeld.model.artifact import export, load

    if args.onnx is not None and args.output is not None:
        raise ExportError("give the output once: --onnx OUT or -o OUT, not both")
    out = args.onnx or args.output
    if out is None:
        raise ExportError("export needs -o OUT (or --onnx OUT.onnx)")
    fmt = "onnx" if args.onnx is not None else args.format
    model = load(args.model)
    options: dict[str, Any] = {"overwrite": args.overwrite}
    if fmt == "onnx":
        options["opset"] = args.opset
    diff = export(model, out, format=fmt, **options)
    if fmt != "onnx":
        console.print(
            f"exported {args.model} ({len(model.labels)} labels) as a plain {fmt} checkpoint "
            f"to [bold]{out}[/bold]; its logits match netmeld's within {diff:.1e}"
        )
        return 0
    checked = (
        f"; onnxruntime matches PyTorch within {diff:.1e}"
        if diff is not None
        else " (onnxruntime is not installed: not checked)"
    )
    console.print(
        f"exported {args.model} ({len(model.labels)} labels, dynamic batch, opset {args.opset}) "
        f"to [bold]{out}[/bold]{checked}"
    )
    return 0


def cmd_merge_weights(args: argparse.Namespace) -> int:
    from netmeld.io.checkpoint_merge import merge_weights, read_merge_recipe
    from netmeld.io.shards import CheckpointReader

    _output(args)
    recipe, base = read_merge_recipe(args.recipe)
    out = merge_weights(
        recipe,
        args.output,
        base_dir=base,
        overwrite=args.overwrite,
        device=_runtime(args)["device"],
    )
    written = CheckpointReader(out)
    console.print(
        f"merged {len(recipe.models)} models with {recipe.merge_method!r}: "
        f"{len(written)} tensors, {written.nbytes / 1e6:,.1f} MB in "
        f"{len(list(out.glob('*.safetensors')))} shard(s) at [bold]{out}[/bold]"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from netmeld.evaluate import Reports, compare, render_table
    from netmeld.model.artifact import load

    runtime = _runtime(args)
    models = {str(path): load(path) for path in args.models}
    named = {f"{name} ({m.method.get('name')})": m for name, m in models.items()}
    oracle = None
    if args.oracle is not None:
        oracle = f"{args.oracle} (oracle)"
        named[oracle] = load(args.oracle)
    with _process_group() as rank:
        reports = compare(
            named,
            args.data,
            batch_size=args.batch_size,
            skip_unreadable=args.skip_unreadable,
            **runtime,
        )
        if rank != 0:
            return 0
    if args.json == "-":
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        n = reports[0].examples + sum(reports[0].unknown.values()) if reports else 0
        console.print(render_table(reports, title=f"{n} examples from {args.data}"))
        _print_label_sets(reports)
        if args.per_class:
            _print_per_class(reports)
    if args.json not in (None, "-"):
        Reports(reports).to_json(args.json, overwrite=args.overwrite)
        console.print(f"wrote the numbers to [bold]{args.json}[/bold]")
    if args.report is not None:
        Reports(reports).to_html(
            args.report, source=str(args.data), oracle=oracle, overwrite=args.overwrite
        )
        console.print(f"wrote the report to [bold]{args.report}[/bold]")
    return 0


def _print_label_sets(reports: Sequence[Any]) -> None:
    """When the models know different labels: accuracy on the labels they all know."""
    from netmeld.html_report import shared_labels

    common = shared_labels(reports)
    if common is None:
        return
    _print_table(
        f"the models know different labels: accuracy on the {len(common)} they all know",
        ("model", "accuracy (shared labels)", "left out (unknown labels)"),
        (
            (
                r.name,
                "-" if r.accuracy_on(common) is None else f"{100 * r.accuracy_on(common):.1f}%",
                ", ".join(f"{k} ({v})" for k, v in r.unknown.items()) or "-",
            )
            for r in reports
        ),
    )


def _print_per_class(reports: Sequence[Any]) -> None:
    labels = list(dict.fromkeys(label for r in reports for label in r.labels))
    recall = [{row["label"]: row["recall"] for row in r.per_label()} for r in reports]
    _print_table(
        "recall per label",
        ("label", *(r.name for r in reports)),
        (
            (
                label,
                *("-" if rec.get(label) is None else f"{100 * rec[label]:.1f}%" for rec in recall),
            )
            for label in labels
        ),
    )


def cmd_report(args: argparse.Namespace) -> int:
    from netmeld.evaluate import Reports

    path = Path(args.results)
    reports = Reports.from_json(path)
    reports.to_html(
        args.output,
        source=str(path),
        oracle=args.oracle,
        baseline=args.baseline,
        overwrite=args.overwrite,
    )
    console.print(f"wrote the report of {len(reports)} models to [bold]{args.output}[/bold]")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from netmeld.methods.extend import extend
    from netmeld.model.artifact import load

    out = _output(args)
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
        **_runtime(args),
    )
    extended.save(out, overwrite=args.overwrite)
    added = extended.method["extended"][-1]
    shots = ", ".join(f"{label} ({n})" for label, n in added["examples"].items())
    console.print(
        f"added {len(added['labels'])} labels from examples: {shots}; "
        f"saved {len(extended.labels)} labels to [bold]{out}[/bold]",
        highlight=False,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from netmeld.model.artifact import load
    from netmeld.predict import predict, write_predictions

    runtime = _runtime(args)
    model = load(args.model)
    rows = predict(
        model,
        [Path(f) for f in args.files],
        top=args.top,
        batch_size=args.batch_size,
        skip_unreadable=args.skip_unreadable,  # skipped files: one warning on stderr
        **runtime,
    )
    if args.output is not None:
        n = write_predictions(rows, args.output, overwrite=args.overwrite)
        console.print(f"wrote {n} predictions to [bold]{args.output}[/bold]")
        return 0
    if args.json:
        print(json.dumps([{"file": r.file, "predictions": r.top} for r in rows], indent=2))
        return 0
    for row in rows:
        ranked = ", ".join(f"{label} {100 * v:.1f}%" for label, v in row.top)
        console.print(f"{row.file}: {ranked}", highlight=False)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from netmeld.methods.statistics import feature_statistics

    runtime = _runtime(args)
    source = Path(args.member)
    if source.is_dir():  # a saved model folder: its members are loaded with it
        from netmeld.cli.recipes import pick_member
        from netmeld.model.artifact import load

        members = load(source).members
        member = members[pick_member([m.name for m in members], args.name, repr(str(source)))]
    else:
        from netmeld.cli.recipes import recipe_member

        member = recipe_member(source, args.name, trust_code=args.trust_code)
    stats = feature_statistics(
        member,
        args.data,
        projection=args.projection,
        seed=args.seed,
        folds=args.folds,
        batch_size=args.batch_size,
        **runtime,
    )
    path = stats.save(args.output, overwrite=args.overwrite)
    console.print(
        f"statistics of member {member.name!r} ({stats.examples:,} examples, "
        f"{len(stats.labels)} labels, features of width {stats.width}) saved to "
        f"[bold]{path}[/bold]",
        highlight=False,
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from netmeld.cli.inspection import inspect

    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise NetmeldError(f"--arch-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(arch_kwargs, dict):
        raise NetmeldError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 16}'")
    rows = inspect(args.items, architecture=args.arch, architecture_kwargs=arch_kwargs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{len(rows)} members", title_justify="left")
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
    for r in rows:
        labels = r["labels"]
        table.add_row(
            r["member"],
            ", ".join(labels[:4]) + (f" (+{len(labels) - 4})" if len(labels) > 4 else ""),
            ", ".join(r["shared_with"]) or "-",
            f"{r['trunk_parameters']:,}",
            f"{r['own_parameters']:,}",
            f"{r['head']} ({r['head_parameters']:,})",
            r["diverges_at"] or "-",
        )
    console.print(table)
    return 0
