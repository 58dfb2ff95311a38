"""The README's examples run.

Every ```python, ```bash (```sh, ```shell) and ```yaml block of README.md is executed here:

* a Python block runs (``exec``) in a fresh namespace holding a tiny stand-in for each name it
  uses but does not define (``STAND_INS``), in a temporary folder holding a tiny stand-in for
  each file or folder it names in a string (``FILES``);
* a shell block runs its ``netmeld ...`` commands through :func:`netmeld.cli.main`, one line at
  a time and in order, in a temporary folder holding the stand-ins of the files they name; a
  line is left out only by a rule of ``SKIPPED_LINES``;
* a YAML block is read as the recipe it is (meld, distill, train or merge-weights) and
  validated whole, as ``netmeld`` does before it reads any checkpoint.

A block that uses a name, a file or a command the test does not know fails. The recipe
reference between the README's ``recipe-reference`` markers is the generated one.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
S = 16  # the side of the tiny stand-in photos

# Shell lines the test does not run, each with why; every other line of a shell block runs.
SKIPPED_LINES: list[tuple[str, str]] = [
    (
        r"python -m venv .*",
        "set-up: makes a virtual environment and installs netmeld (CI runs the dev line: "
        "test_ci_runs_the_readme_test_command)",
    ),
    (r"python benchmarks/.*", "a benchmark: minutes to hours, on data from ../shared"),
    (r"torchrun .*", "a multi-process DDP launch (tests/test_engine.py runs 2-process DDP)"),
    (
        r"netmeld demo",
        "the whole demo: it trains its members and runs every method, longer than all of this file",
    ),
]
RUNNABLE = {"python", "bash", "sh", "shell", "yaml"}
NOT_CODE = {"text"}  # blocks that show output, not code to run


# -- the README's blocks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence
    section: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks of the README, in order, with the section each is in."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            assert end < len(lines), f"README.md line {i + 1}: the block is never closed"
            blocks.append(Block(lang, "\n".join(lines[i + 1 : end]) + "\n", i + 1, section))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()


def _blocks(*langs: str) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.lang in langs]


def test_every_block_is_one_the_test_runs():
    unknown = [f"line {b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in RUNNABLE | NOT_CODE]
    assert not unknown, f"README blocks of a kind this test cannot run: {unknown}"
    assert len(_blocks("python")) >= 7 and len(_blocks("yaml")) >= 5


def test_ci_runs_the_readme_test_command():
    readme = README.read_text(encoding="utf-8")
    commands = re.findall(r"^python -m venv .*$", readme, flags=re.MULTILINE)
    test_command = next(c for c in commands if '".[dev]"' in c)
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines()
    assert any("netmeld demo" in c for c in commands)


# -- tiny stand-ins for the user's objects and files -------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _photos(folder: Path, n: int, seed: int, file: str | None = None) -> None:
    """``n`` random RGB photos in ``folder`` (one, named ``file``, if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / (file or f"{i}.png"))


def _labeled_photos(folder: Path, labels: list[str], per_label: int, seed: int) -> None:
    for j, label in enumerate(labels):
        _photos(folder / label, per_label, seed + j)


def _small_cnn_member(
    name: str, labels: list[str], seed: int, width: int = 4, blocks: int = 2, size: int = S
) -> Any:
    from netmeld import Architecture, Member
    from netmeld.zoo import small_cnn

    kwargs = {"in_channels": 3, "width": width, "blocks": blocks}
    torch.manual_seed(seed)
    return Member(
        small_cnn(num_classes=len(labels), **kwargs).eval(),
        labels,
        name=name,
        preprocessing={"input_shape": (3, size, size)},
        architecture=Architecture("netmeld.zoo:small_cnn", kwargs),
    )


PETS, PEOPLE = ["cat", "dog"], ["man", "woman"]
DIGITS = [str(i) for i in range(10)]
SHAPES = ["circle", "square", "triangle"]
COLUMNS = [f"x{i}" for i in range(30)]


def _tuned_member(name: str, labels: list[str], seed: int) -> Any:
    """A small CNN member fine-tuned (a small seeded nudge) from the seed-0 base."""
    member = _small_cnn_member(name, labels, 0, width=8, blocks=3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in member.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return member


def _pets() -> Any:
    return _tuned_member("pets", PETS, 1)


def _people() -> Any:
    return _tuned_member("people", PEOPLE, 2)


def _tasks(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    torch.manual_seed(seed)
    labels = [f"digits/{DIGITS[i % 10]}" if i % 2 else f"shapes/{SHAPES[i % 3]}" for i in range(n)]
    return torch.rand(n, 3, S, S), labels


def _frame(n: int, seed: int) -> Any:
    import pandas as pd

    return pd.DataFrame(_rng(seed).normal(size=(n, len(COLUMNS))), columns=COLUMNS)


def _mlp(seed: int) -> torch.nn.Module:
    from netmeld.zoo import mlp

    torch.manual_seed(seed)
    return mlp(15, 2, hidden=8).eval()


def _combined(method: str = "concat") -> Any:
    import netmeld

    return netmeld.meld(
        [_small_cnn_member("pets", PETS, 1), _small_cnn_member("people", PEOPLE, 2)], method
    )


# The names README blocks use without defining them, and what stands in for each.
STAND_INS: dict[str, Callable[[], Any]] = {
    # the imports of the README's first example
    "netmeld": lambda: __import__("netmeld"),
    "Member": lambda: __import__("netmeld").Member,
    "Preprocessing": lambda: __import__("netmeld").Preprocessing,
    # image members (3 x 16 x 16) and data
    "images": lambda: torch.rand(2, 3, 224, 224),  # the first example's photos
    "pets": _pets,
    "people": _people,
    "pytorch_member": lambda: _small_cnn_member("pytorch", PETS, 3),
    "member_a": lambda: _small_cnn_member("a", PETS, 4, width=32, blocks=3, size=32),
    "labels": lambda: ["cat", "dog", "bird"],
    "trunk": lambda: _small_cnn_member("trunk", ["a", "b"], 5),
    "digit_names": lambda: list(DIGITS),
    "shape_names": lambda: list(SHAPES),
    "task_images": lambda: _tasks(24, 0)[0],
    "task_labels": lambda: _tasks(24, 0)[1],
    "task_test": lambda: _tasks(12, 1),
    "model": _combined,
    "unlabeled": lambda: torch.rand(16, 3, S, S),
    "few_labeled": lambda: (torch.rand(16, 3, S, S), (PETS + PEOPLE) * 4),
    # table members reading every other of 30 columns
    "names": lambda: list(COLUMNS),
    "mlp_a": lambda: _mlp(0),
    "mlp_b": lambda: _mlp(1),
    "holdout_frame": lambda: _frame(40, 0),
    "holdout_labels": lambda: ["benign", "malignant"] * 20,
    "test_frame": lambda: _frame(8, 1),
}


def _write_resnet18(root: Path, name: str) -> None:
    """pets or people: a torchvision ResNet-18 (2 labels); both have one body, their own head."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(num_classes=2).state_dict()
    torch.manual_seed(1 if name.startswith("pets") else 2)
    head = torch.nn.Linear(512, 2)
    state.update({"fc.weight": head.weight.detach(), "fc.bias": head.bias.detach()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / name))


def _write_keras(root: Path, name: str) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    assert keras.backend.backend() == "torch", (
        "the README's Keras example needs KERAS_BACKEND=torch"
    )
    keras.utils.set_random_seed(0)
    layers = keras.layers
    x = keras.Input((S, S, 3))
    h = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, activation="relu")(x))
    if name == "cats_dogs.keras":
        outputs: Any = layers.Dense(2, activation="softmax")(h)
    else:
        outputs = [
            layers.Dense(len(DIGITS), activation="softmax", name="digits")(h),
            layers.Dense(len(SHAPES), activation="softmax", name="shapes")(h),
        ]
    keras.Model(x, outputs).save(root / name)


def _write_onnx(root: Path, name: str) -> None:
    from netmeld.zoo import small_cnn

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        small_cnn(num_classes=2, in_channels=3, width=4, blocks=2), torch.nn.Softmax(1)
    )
    torch.onnx.export(
        net.eval(),
        (torch.rand(2, 3, S, S),),
        str(root / name),
        opset_version=17,
        dynamo=False,
        input_names=["input"],
        output_names=["probs"],
        dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}},
    )


def _write_model(root: Path, name: str, method: str) -> None:
    _combined(method).save(root / name)


def _member_entry(member: Any, file: str) -> dict[str, Any]:
    return {
        "name": member.name,
        "checkpoint": file,
        "architecture": member.architecture.spec,
        "architecture_kwargs": dict(member.architecture.kwargs),
        "labels": list(member.labels),
        "preprocessing": {"input_shape": list(member.preprocessing.input_shape)},
    }


def _write_members(root: Path, folder: str) -> list[dict[str, Any]]:
    (root / folder).mkdir()
    entries = []
    for member in (_small_cnn_member("pets", PETS, 1), _small_cnn_member("people", PEOPLE, 2)):
        save_file(member.module.state_dict(), str(root / folder / f"{member.name}.safetensors"))
        entries.append(_member_entry(member, f"{folder}/{member.name}.safetensors"))
    return entries


def _write_meld_recipe(root: Path, name: str) -> None:
    _photos(root / "recipe-files" / "unlabeled", 8, 20)
    recipe = {
        "members": _write_members(root, "recipe-files/members"),
        "method": "infomax",
        "params": {"steps": 20},
        "data": "recipe-files/unlabeled",
    }
    (root / name).write_text(yaml.safe_dump(recipe))


def _write_distill_recipe(root: Path, name: str) -> None:
    _photos(root / "distill-files" / "unlabeled", 8, 21)
    recipe = {
        "teachers": _write_members(root, "distill-files/members"),
        "data": "distill-files/unlabeled",
        "schedule": {"epochs": 2, "batch_size": 4},
    }
    (root / name).write_text(yaml.safe_dump(recipe))


def _write_train_recipe(root: Path, name: str) -> None:
    _labeled_photos(root / "fusion-files" / "train", ["cat", "dog", "bird"], 2, 22)
    recipe = {
        "build": "parallel",
        "branches": [
            {
                "name": "a",
                "architecture": "netmeld.zoo:small_cnn",
                "architecture_kwargs": {"in_channels": 3, "width": 4, "blocks": 2},
            },
            {
                "name": "b",
                "architecture": "netmeld.zoo:small_cnn",
                "architecture_kwargs": {
                    "in_channels": 3,
                    "width": 4,
                    "blocks": 2,
                    "kernel_size": 5,
                },
            },
        ],
        "labels": ["cat", "dog", "bird"],
        "input_shape": [3, S, S],
        "data": "fusion-files/train",
        "schedule": {"epochs": 1, "batch_size": 4},
    }
    (root / name).write_text(yaml.safe_dump(recipe))


def _write_merge_recipe(root: Path, name: str) -> None:
    folder = root / "merge-files"
    folder.mkdir()
    torch.manual_seed(0)
    base = {"mlp.weight": torch.randn(4, 4), "attn.weight": torch.randn(4, 4)}
    save_file(base, str(folder / "base.safetensors"))
    for i in range(2):
        save_file(
            {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()},
            str(folder / f"m{i}.safetensors"),
        )
    recipe = {
        "merge_method": "ties",
        "base_model": "merge-files/base.safetensors",
        "models": [
            {"model": "merge-files/m0.safetensors", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "merge-files/m1.safetensors", "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    (root / name).write_text(yaml.safe_dump(recipe))


def _write_base(root: Path, name: str) -> None:
    """The seed-0 base pets and people are nudged from."""
    save_file(
        _small_cnn_member("base", PETS, 0, width=8, blocks=3).module.state_dict(), str(root / name)
    )


def _write_hf(root: Path, name: str) -> None:
    """hf/cats-dogs or hf/men-women: tiny transformers ViT classifiers on one frozen backbone;
    men-women keeps transformers' default LABEL_0/LABEL_1 names (the recipe names them)."""
    import transformers

    labels = PETS if name.endswith("cats-dogs") else ["LABEL_0", "LABEL_1"]
    config = transformers.ViTConfig(
        image_size=S,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    torch.manual_seed(1 if name.endswith("cats-dogs") else 2)
    model.classifier.reset_parameters()
    model.eval().save_pretrained(root / name)
    transformers.ViTImageProcessor(
        size={"height": S, "width": S}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(root / name)


def _write_hf_recipe(root: Path, name: str) -> None:
    for folder in ("hf/cats-dogs", "hf/men-women"):
        _write_hf(root, folder)
    _labeled_photos(root / "few_labeled_photos", PETS + PEOPLE, 2, 22)
    recipe = {
        "members": [{"hf": "hf/cats-dogs"}, {"hf": "hf/men-women", "labels": PEOPLE}],
        "method": "calibrate",
        "data": "few_labeled_photos",
    }
    (root / name).write_text(yaml.safe_dump(recipe))


# The files and folders README blocks name (in strings or command arguments) and how each
# stand-in is written; a factory writes the named path (and what it refers to) into ``root``.
FILES: dict[str, Callable[[Path, str], None]] = {
    "pets.safetensors": _write_resnet18,
    "people.safetensors": _write_resnet18,
    "base.safetensors": _write_base,
    "unlabeled_photos": lambda root, name: _photos(root / name, 6, 10),
    "photos": lambda root, name: _photos(root / name, 8, 11),
    "labeled_photos": lambda root, name: _labeled_photos(root / name, PETS + PEOPLE, 1, 12),
    "test_images": lambda root, name: _labeled_photos(root / name, PETS + PEOPLE, 2, 13),
    "pets_photos": lambda root, name: _labeled_photos(root / name, PETS, 2, 18),
    "people_photos": lambda root, name: _labeled_photos(root / name, PEOPLE, 2, 19),
    "alien_bug_photos": lambda root, name: _labeled_photos(root / name, ["alien bug"], 3, 14),
    "new_classes": lambda root, name: _labeled_photos(root / name, ["alien bug"], 3, 15),
    "photo1.jpg": lambda root, name: _photos(root, 1, 16, name),
    "photo2.jpg": lambda root, name: _photos(root, 1, 17, name),
    "cats_dogs.keras": _write_keras,
    "multi.keras": _write_keras,
    "people.onnx": _write_onnx,
    "pets-and-people": lambda root, name: _write_model(root, name, "concat"),
    "other": lambda root, name: _write_model(root, name, "weight-norm"),
    "recipe.yaml": _write_meld_recipe,
    "hf/cats-dogs": _write_hf,
    "hf/men-women": _write_hf,
    "pets-people.yaml": _write_hf_recipe,
    "few_labeled_photos": lambda root, name: _labeled_photos(root / name, PETS + PEOPLE, 2, 22),
    "distill.yaml": _write_distill_recipe,
    "fusion.yaml": _write_train_recipe,
    "merge.yaml": _write_merge_recipe,
}


class Workspace:
    """Builds each stand-in file once and copies it into the folder a block runs in."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def provide(self, name: str, cwd: Path) -> None:
        key = name.rstrip("/")
        if key not in FILES or (cwd / key).exists():
            return
        built = self.cache / key.replace("/", "_")
        if not built.exists():
            built.mkdir()
            FILES[key](built, key)
        for item in built.iterdir():
            target = cwd / item.name
            if item.is_dir():  # merged: hf/cats-dogs and hf/men-women share hf/
                shutil.copytree(item, target, dirs_exist_ok=True)
            elif not target.exists():
                shutil.copy2(item, target)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme-stand-ins"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The stand-ins are tiny: a second intra-op thread only adds waiting (tenfold on a busy
    machine), so this module runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- running the blocks ------------------------------------------------------------------------


def _free_names(tree: ast.AST) -> set[str]:
    """The names a block reads without binding them (builtins aside)."""
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound - set(dir(builtins))


OUTPUT_CALLS = {"save", "export"}  # f(..., "PATH"): the block writes PATH, no stand-in


def _input_paths(tree: ast.AST) -> set[str]:
    """The strings of a block that may name a file it reads (what it writes left out)."""
    strings = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    written = {
        arg.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in OUTPUT_CALLS
        for arg in n.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    return strings - written


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_block_runs(block: Block, workspace: Workspace, tmp_path, monkeypatch):
    tree = ast.parse(block.code, filename=f"README.md, line {block.line}")
    free = _free_names(tree)
    missing = sorted(free - set(STAND_INS))
    assert not missing, (
        f"README.md line {block.line} uses {missing}, which tests/test_readme.py has no "
        "stand-in for: add one to STAND_INS"
    )
    monkeypatch.chdir(tmp_path)
    for s in _input_paths(tree):
        workspace.provide(s, tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    for name in sorted(free):
        namespace[name] = STAND_INS[name]()
    with warnings.catch_warnings():  # the README uses today's names, not renamed ones
        warnings.filterwarnings("error", r"netmeld\..* (is now|moved to) ", DeprecationWarning)
        exec(compile(tree, f"README.md, line {block.line}", "exec"), namespace)


def _shell_lines(code: str) -> list[str]:
    """The block's commands: comments and blank lines dropped, continuations joined."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def _skipped(line: str) -> str | None:
    for pattern, why in SKIPPED_LINES:
        if re.fullmatch(pattern, line):
            return why
    return None


@pytest.mark.parametrize("block", _blocks("bash", "sh", "shell"))
def test_shell_block_runs(block: Block, workspace: Workspace, tmp_path, monkeypatch):
    from netmeld.cli import main

    monkeypatch.chdir(tmp_path)
    for line in _shell_lines(block.code):
        if _skipped(line):
            continue
        for command in line.split(" && "):
            argv = shlex.split(command)
            assert argv[0] == "netmeld", (
                f"README.md line {block.line}: {command!r} is not a netmeld command; run it "
                "here or add an explicit rule to SKIPPED_LINES"
            )
            for arg in argv[1:]:
                workspace.provide(arg, tmp_path)
            assert main(argv[1:]) == 0, f"README.md line {block.line}: {command!r} failed"


def test_every_skip_rule_is_used():
    lines = [ln for b in BLOCKS if b.lang in ("bash", "sh", "shell") for ln in _shell_lines(b.code)]
    for pattern, why in SKIPPED_LINES:
        assert any(re.fullmatch(pattern, ln) for ln in lines), f"no README line is {why!r}"


def _read_recipe(path: Path) -> Any:
    from netmeld.cli.recipes import read_distill_recipe, read_recipe, read_train_recipe
    from netmeld.io.checkpoint_merge import read_merge_recipe

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict), "a recipe is a mapping"
    if "merge_method" in raw:
        return read_merge_recipe(path)[0]
    if "build" in raw:
        return read_train_recipe(path)[0]
    if "teachers" in raw or "teacher" in raw:
        return read_distill_recipe(path)[0]
    if "members" in raw:
        return read_recipe(path)[0]
    raise AssertionError(f"not a recipe of a kind netmeld reads: keys {sorted(raw)}")


@pytest.mark.parametrize("block", _blocks("yaml"))
def test_yaml_block_is_a_valid_recipe(block: Block, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(block.code, encoding="utf-8")
    _read_recipe(path)


def test_the_recipe_reference_is_the_generated_one():
    from netmeld.cli.recipes.reference import replace_section

    text = README.read_text(encoding="utf-8")
    assert replace_section(text) == text, (
        "README.md's recipe reference differs from the recipe schemas; regenerate it with "
        "`python -m netmeld.cli.recipes.reference --write README.md`"
    )


def test_the_recipe_reference_reads_the_registries():
    from netmeld.cli.recipes.reference import recipe_reference
    from netmeld.methods import list_methods
    from netmeld.methods.fusion.parts import FUSION_KINDS, FUSIONS, WEIGHTINGS
    from netmeld.ops.merge import KERNELS

    reference = recipe_reference()
    for name in [*list_methods(), *KERNELS, *FUSION_KINDS, *FUSIONS, *WEIGHTINGS]:
        assert f"`{name}`" in reference
