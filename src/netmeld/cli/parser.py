"""The ``netmeld`` argument parser: one function per subcommand, each documenting every option
(``tests/test_cli.py`` checks that none is left without help)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import netmeld.cli.commands as commands
from netmeld._version import __version__


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


def _number(kind: type, low: float | None, high: float | None, *, strict: bool) -> Any:
    """An argparse type: a finite ``kind`` above ``low`` (``strict``: not equal to it) and
    below ``high``; anything else is argparse's one-line usage error naming the option."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (strict and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        if high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"{text} must be < {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, 0, None, strict=True)
COUNT = _number(int, 0, None, strict=False)
POSITIVE = _number(float, 0, None, strict=True)
NON_NEGATIVE = _number(float, 0, None, strict=False)
SHARE = _number(float, 0, 1, strict=True)


def _skip_unreadable_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out image files that cannot be read and say which (default: such a file "
        "is an error naming it)",
    )


def _run_arguments(
    p: argparse.ArgumentParser, *, data: bool = True, cache: bool = True, precision: bool = True
) -> None:
    """Where and how the models run: --device, and (for commands reading data) --workers,
    --precision and --cache-dir."""
    p.add_argument(
        "--device",
        default="auto",
        help="where models run: auto (a CUDA GPU when torch sees one, else the CPU), cpu, "
        "cuda or cuda:N (default: %(default)s); cuda on a machine without one is an error",
    )
    if precision:
        p.add_argument(
            "--precision",
            choices=("fp32", "bf16", "fp16"),
            default="fp32",
            help="run the members in float32, or autocast to bfloat16/float16 (faster on a "
            "GPU; features agree with fp32 to about 1e-2) (default: %(default)s)",
        )
    if data:
        p.add_argument(
            "--workers",
            type=COUNT,
            default=None,
            help="DataLoader workers decoding images (default: the cores but one, at most 8; "
            "0 decodes in the main process)",
        )
    if cache:
        p.add_argument(
            "--cache-dir",
            default=None,
            help="folder keeping the members' features across runs, keyed by trunk weights, "
            "preprocessing and data content (default: kept in memory for this run only)",
        )


def _trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="let the model folders and recipes read run the architecture builders they name "
        "even when netmeld does not know them (it imports and calls that code: only for files "
        "from someone you trust; torchvision, timm and netmeld's own builders need no flag)",
    )


def _demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in digits demo (no download, ~20 s on 2 cores)",
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
    p.set_defaults(func=commands.cmd_demo)


def _methods(sub: Any) -> None:
    p = sub.add_parser(
        "methods",
        help="list the registered methods",
        description="List every registered method, the data it needs and its "
        "parameters with their defaults.",
    )
    p.set_defaults(func=commands.cmd_methods)


def _meld(sub: Any) -> None:
    p = sub.add_parser(
        "meld",
        help="combine members described by a YAML recipe",
        description="Load the members of RECIPE.yaml, combine them with its "
        "method and data, and save the combined model to a folder.",
    )
    p.add_argument("recipe", help="the YAML recipe (members, method, params, data)")
    p.add_argument("-o", "--output", required=True, help="folder to write the combined model to")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _run_arguments(p)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_meld)


def _distill(sub: Any) -> None:
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
    _run_arguments(p, data=False, cache=False, precision=False)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_distill)


def _train(sub: Any) -> None:
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
    _run_arguments(p, data=False, cache=False, precision=False)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_train)


def _export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a saved combined model to ONNX, transformers, torchvision or timm",
        description="Write MODEL (a netmeld model folder) in a format that loads without "
        "netmeld. onnx: any combined model, dynamic batch, run with onnxruntime on random "
        "inputs and compared with PyTorch (an error above 1e-4). transformers / torchvision / "
        "timm: a plain checkpoint folder (weights, the union's labels, the members' "
        "preprocessor or tokenizer files) when the model is one shared trunk plus a linear "
        "head over the union (concat, weight-norm, calibrate, ridge, lda, ...); otherwise the "
        "error says why. Every export is checked against netmeld's logits.",
    )
    p.add_argument("model", help="a netmeld model folder (netmeld.json + model.safetensors)")
    p.add_argument(
        "--format",
        choices=["onnx", "transformers", "torchvision", "timm"],
        default="onnx",
        help="what to write (default: %(default)s)",
    )
    p.add_argument(
        "-o", "--output", metavar="OUT", help="the file (onnx) or folder (the others) to write"
    )
    p.add_argument(
        "--onnx", metavar="OUT.onnx", help="the ONNX file to write (the same as --format onnx -o)"
    )
    p.add_argument(
        "--opset", type=POSITIVE_INT, default=17, help="ONNX opset (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if netmeld wrote it before"
    )
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_export)


def _merge_weights(sub: Any) -> None:
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
    p.add_argument(
        "--device",
        default="cpu",
        help="where the merge kernels run, tensor by tensor: cpu, cuda, cuda:N or auto "
        "(default: %(default)s)",
    )
    p.set_defaults(func=commands.cmd_merge_weights)


def _eval(sub: Any) -> None:
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
        type=POSITIVE_INT,
        default=256,
        help="batch size for evaluation and latency (default: %(default)s)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the raw numbers as JSON to FILE (no FILE: print them instead of the table); "
        "'netmeld report FILE' turns them into an HTML report later",
    )
    p.add_argument(
        "--report",
        metavar="FILE.html",
        help="also write a self-contained HTML report with plots (needs matplotlib: "
        "pip install 'netmeld[report]')",
    )
    p.add_argument(
        "--oracle",
        metavar="MODEL",
        help="a model folder evaluated too and drawn as the oracle's line (e.g. a jointly "
        "trained model)",
    )
    p.add_argument(
        "--per-class", action="store_true", help="also print each label's recall per model"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the --json FILE and --report files if they exist (only files netmeld wrote)",
    )
    _skip_unreadable_argument(p)
    _run_arguments(p)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_eval)


def _report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="turn 'netmeld eval --json' results into an HTML report",
        description="Rebuild the self-contained HTML report of RESULTS (written by netmeld eval "
        "--json FILE, or Reports.to_json) without running any model.",
    )
    p.add_argument("results", help="the JSON results file")
    p.add_argument("-o", "--output", required=True, metavar="FILE.html", help="the report")
    p.add_argument("--oracle", metavar="NAME", help="the report drawn as the oracle's line")
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="the report drawn as the baseline's line (default: a model of method concat)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists (only a report netmeld wrote)",
    )
    p.set_defaults(func=commands.cmd_report)


def _extend(sub: Any) -> None:
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
        type=COUNT,
        default=300,
        help="fine-tuning steps after imprinting; 0 for imprinting only (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=POSITIVE, default=1e-2, help="fine-tuning learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--distill",
        type=NON_NEGATIVE,
        default=1.0,
        help="weight of the distillation of old outputs (default: %(default)s)",
    )
    p.add_argument(
        "--max-false-positives",
        type=SHARE,
        default=0.005,
        help="share of the other inputs each new class may claim; sets its threshold "
        "(default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _run_arguments(p, cache=False, precision=False)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_extend)


def _predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict labels for image files",
        description="Print (or with --output write) the top labels and probabilities for each "
        "image, reading and predicting a batch at a time.",
    )
    p.add_argument("model", help="a combined-model folder")
    p.add_argument("files", nargs="+", help="image files, or folders of images")
    p.add_argument(
        "--top", type=POSITIVE_INT, default=3, help="labels to show per image (default: 3)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--output",
        metavar="PREDS.csv|.jsonl",
        help="write the predictions to this file, a row per image (file, index, label, "
        "probability, top labels), instead of printing them",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the --output file if it exists (only a predictions file netmeld wrote)",
    )
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=256,
        help="images per batch (default: %(default)s)",
    )
    _skip_unreadable_argument(p)
    _run_arguments(p, cache=False)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_predict)


def _stats(sub: Any) -> None:
    p = sub.add_parser(
        "stats",
        help="write a member's statistics (for heads computed without the data)",
        description="Run MEMBER over its labeled training data and write the statistics of its "
        "head inputs (class counts, per-class sums, the Gram matrix; optionally through a "
        "seeded random projection) to a file. `meld` with method ridge or lda computes the "
        "union head from every member's file, equal to training on all their data together. "
        "The file reveals class means and feature covariance, no individual input.",
    )
    p.add_argument("member", help="a recipe (.yaml) naming the member, or a saved model folder")
    p.add_argument("--member", dest="name", help="which member of the recipe or folder")
    p.add_argument(
        "--data",
        required=True,
        help="the member's labeled training data: a folder with one subfolder per label, or a "
        ".csv table with a 'label' column",
    )
    p.add_argument("-o", "--output", required=True, help="the statistics file to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists (only a statistics file netmeld wrote)",
    )
    p.add_argument(
        "--projection",
        type=POSITIVE_INT,
        default=None,
        help="width of a random ReLU projection of the features first (RanPAC); every "
        "member's statistics must use the same width and --seed (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the projection (default: 0)")
    p.add_argument(
        "--folds",
        type=_number(int, 2, None, strict=False),
        default=5,
        help="held-out parts kept apart, to choose the regularisation (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=POSITIVE_INT, default=256, help="batch size (default: %(default)s)"
    )
    _run_arguments(p, cache=False, precision=False)
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_stats)


def _inspect(sub: Any) -> None:
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
    _trust_argument(p)
    p.set_defaults(func=commands.cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netmeld",
        description="Combine trained classifiers into one model over the union of their labels.",
    )
    parser.add_argument("--version", action="version", version=f"netmeld {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _demo,
        _methods,
        _meld,
        _distill,
        _train,
        _export,
        _merge_weights,
        _eval,
        _extend,
        _predict,
        _stats,
        _inspect,
        _report,
    ):
        add(sub)
    return parser
