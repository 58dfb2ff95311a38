"""YAML recipes for ``netmeld meld``: members, a method, its parameters and data.

.. code-block:: yaml

    members:
      - name: pets
        checkpoint: pets.safetensors          # or .pt/.pth (read with weights_only=True)
        architecture: torchvision:resnet18    # timm:NAME, or package.module:callable
        labels: [cat, dog]                    # or a file: one label per line
        preprocessing: {input_shape: [3, 224, 224], mean: [0.485, 0.456, 0.406],
                        std: [0.229, 0.224, 0.225]}
      - name: people
        checkpoint: people.safetensors
        architecture: torchvision:resnet18
        labels: [man, woman]
        preprocessing: {input_shape: [3, 224, 224], mean: [0.485, 0.456, 0.406],
                        std: [0.229, 0.224, 0.225]}
    method: infomax
    params: {steps: 300}
    data: unlabeled_images/                   # a folder; paths are relative to the recipe

The recipe is checked whole when it is read (method name, parameters, whether the method
needs data), before any checkpoint is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from netmeld.errors import MethodError, RecipeError, validation_problems
from netmeld.members.member import Member, Preprocessing
from netmeld.methods import get_method


class PreprocessingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    columns: tuple[int | str, ...] | None = None


_BRIDGED = (".keras", ".h5", ".hdf5", ".onnx")


class MemberSpec(BaseModel):
    """One member: a checkpoint, the architecture that reads it, its labels, its input.

    A Keras (``.keras``, ``.h5``) or ONNX (``.onnx``) file needs no architecture (and its input
    shape comes from the file unless ``preprocessing`` is given); ``output`` picks one output of
    a multi-output Keras model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    checkpoint: str
    architecture: str | None = None
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] | str
    preprocessing: PreprocessingSpec | None = None
    head: str | None = None
    output: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MemberSpec:
        bridged = self.checkpoint.lower().endswith(_BRIDGED)
        if not bridged and (self.architecture is None or self.preprocessing is None):
            raise ValueError(
                f"member {self.checkpoint!r}: a checkpoint needs 'architecture' and "
                "'preprocessing' (Keras and ONNX files carry them)"
            )
        if self.output is not None and not self.checkpoint.lower().endswith(_BRIDGED[:3]):
            raise ValueError(f"member {self.checkpoint!r}: 'output' is for Keras models")
        return self


class MergeSpec(BaseModel):
    """Merge the members' bodies in weight space before the union method combines their heads
    (:func:`netmeld.merge_members`; ``method: zipit`` is :func:`netmeld.zip_members`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    base: str | None = None  # checkpoint of the common base (task-vector kernels)
    weights: list[float] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    align: Literal["auto", "weight", "activation", "none"] = "auto"
    layers: int | None = None  # zipit: zip the first n weighted layers only
    alpha: float = 0.5  # zipit: share of within-model pairs

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        from netmeld.ops.merge import check_params, get_kernel

        if self.method == "zipit":
            if self.params or self.base or self.weights:
                raise ValueError(
                    "merge method 'zipit' takes layers and alpha, not params, base or weights"
                )
            return self
        try:
            kernel = get_kernel(self.method)
        except MethodError as exc:
            raise ValueError(f"{exc}, or zipit") from exc
        check_params(self.method, self.params)
        if kernel.needs_base and self.base is None:
            raise ValueError(f"merge method {self.method!r} needs base: a checkpoint")
        return self


class Recipe(BaseModel):
    """A whole ``netmeld meld`` recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: list[MemberSpec] = Field(min_length=1)
    method: str = "concat"
    params: dict[str, Any] = Field(default_factory=dict)
    data: str | None = None
    input_shape: tuple[int, ...] | None = None
    feature_names: list[str] | None = None
    seed: int = 0
    merge: MergeSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        info = get_method(self.method)
        info.validate_params(self.params)
        if self.merge is not None and self.data is None:
            needs = self.merge.method in ("zipit", "fisher", "regmean") or (
                self.merge.align == "activation"
            )
            if needs:
                raise MethodError(
                    f"merge {self.merge.method!r} (align {self.merge.align!r}) needs data: add "
                    "'data: FOLDER' to the recipe"
                )
        if info.data != "none" and self.data is None:
            raise MethodError(
                f"method {self.method!r} needs {info.data} data: add 'data: FOLDER' to the recipe"
            )
        names = [m.name or Path(m.checkpoint).stem for m in self.members]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"two members are named {name!r}; member names must be unique")
        return self


_Spec = TypeVar("_Spec", bound=BaseModel)


def _read_yaml(path: str | Path, spec: type[_Spec], expected: str) -> tuple[_Spec, Path]:
    """Parse and validate a YAML recipe as ``spec``; returns it and the folder its paths are
    relative to. Every problem is a :class:`RecipeError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping with {expected}")
    try:
        return spec.model_validate(raw), path.parent
    except MethodError as exc:
        raise RecipeError(f"recipe {str(path)!r}: {exc}") from exc
    except ValidationError as exc:
        raise RecipeError(f"recipe {str(path)!r}: {validation_problems(exc)}") from exc


def read_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse and validate a recipe file; returns it and the folder its paths are relative to."""
    return _read_yaml(path, Recipe, "'members' and 'method'")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_member(spec: MemberSpec, base: Path) -> Member:
    """Load one member of a recipe: a checkpoint, a Keras file or an ONNX file."""
    labels: Any = spec.labels
    if isinstance(labels, str):
        labels = _resolve(base, labels)
    path = _resolve(base, spec.checkpoint)
    pre = None if spec.preprocessing is None else Preprocessing(**spec.preprocessing.model_dump())
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return Member.from_keras(
            path, labels, name=spec.name, output=spec.output, preprocessing=pre
        )
    if suffix == ".onnx":
        return Member.from_onnx(path, labels, name=spec.name, preprocessing=pre)
    assert spec.architecture is not None and pre is not None
    return Member.from_checkpoint(
        path,
        spec.architecture,
        labels,
        name=spec.name,
        preprocessing=pre,
        architecture_kwargs=spec.architecture_kwargs,
        head=spec.head,
    )


def recipe_members(recipe: Recipe, base: Path) -> list[Member]:
    """Load the recipe's members from their checkpoints."""
    return [load_member(spec, base) for spec in recipe.members]


def run_recipe(path: str | Path, *, progress: bool | None = None) -> Any:
    """Read a recipe, load its members and data, and return the combined model."""
    from netmeld.methods.meld import meld

    recipe, base = read_recipe(path)
    members = recipe_members(recipe, base)
    data = None if recipe.data is None else _resolve(base, recipe.data)
    if recipe.merge is not None:
        from netmeld.methods.merge import merge_members, zip_members

        spec = recipe.merge
        if spec.method == "zipit":
            return zip_members(
                members,
                data,
                layers=spec.layers,
                alpha=spec.alpha,
                union=recipe.method,
                union_params=recipe.params,
                seed=recipe.seed,
                progress=progress,
            )
        return merge_members(
            members,
            spec.method,
            base=None if spec.base is None else _resolve(base, spec.base),
            weights=spec.weights,
            params=spec.params,
            data=data,
            align=spec.align,
            union=recipe.method,
            union_params=recipe.params,
            seed=recipe.seed,
            progress=progress,
        )
    return meld(
        members,
        recipe.method,
        data,
        params=recipe.params,
        input_shape=recipe.input_shape,
        feature_names=recipe.feature_names,
        seed=recipe.seed,
        progress=progress,
    )


class StudentSpec(BaseModel):
    """The student of a distillation recipe: an architecture with one output per union label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    preprocessing: PreprocessingSpec | None = None  # default: the first teacher's


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = 50
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0

    def config(self, seed: int, checkpoint_dir: str | None, resume: bool) -> Any:
        """The engine's :class:`~netmeld.engine.TrainConfig` for this schedule."""
        from netmeld.engine import TrainConfig

        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )


class DistillRecipe(BaseModel):
    """A ``netmeld distill`` recipe: teachers (members, or a saved combined model), how they
    are combined, the student, the unlabeled data (or a data-free budget) and the schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: list[MemberSpec] | None = None
    teacher: str | None = None  # a saved combined model instead of teachers
    union: str = "concat"
    union_params: dict[str, Any] = Field(default_factory=dict)
    union_data: str | None = None  # data for a union method that needs labels
    student: StudentSpec | None = None
    init: Literal["member", "merge", "scratch"] = "member"
    data: str | None = None
    data_free: int | None = None
    synthesis: dict[str, Any] = Field(default_factory=dict)
    temperature: float = 4.0
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DistillRecipe:
        if (self.teachers is None) == (self.teacher is None):
            raise ValueError("give either teachers (members) or teacher (a saved model folder)")
        if self.data is None and not self.data_free:
            raise ValueError(
                "distillation needs 'data: FOLDER' (unlabeled or proxy images) or "
                "'data_free: N' (inputs synthesized from the teachers)"
            )
        if self.teachers is not None:
            info = get_method(self.union)
            info.validate_params(self.union_params)
            if info.data == "labeled" and self.union_data is None:
                raise MethodError(
                    f"union method {self.union!r} needs labeled data: add 'union_data: FOLDER'"
                )
        unknown = set(self.synthesis) - {
            "steps",
            "lr",
            "batch_size",
            "bn_weight",
            "tv_weight",
            "l2_weight",
        }
        if unknown:
            raise ValueError(f"synthesis has no option {sorted(unknown)[0]!r}")
        return self


def read_distill_recipe(path: str | Path) -> tuple[DistillRecipe, Path]:
    """Parse and validate a distillation recipe (paths relative to its folder)."""
    return _read_yaml(path, DistillRecipe, "'teachers' (or 'teacher') and 'data'")


def run_distill_recipe(
    path: str | Path,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> Any:
    """Read a distillation recipe and return the distilled one-member combined model."""
    from netmeld.methods.distill import distill
    from netmeld.methods.meld import meld
    from netmeld.model.artifact import load

    recipe, base = read_distill_recipe(path)
    data = None if recipe.data is None else _resolve(base, recipe.data)
    if recipe.teacher is not None:
        teacher = load(_resolve(base, recipe.teacher))
    else:
        assert recipe.teachers is not None
        as_meld = Recipe(
            members=recipe.teachers,
            method=recipe.union,
            params=recipe.union_params,
            data=recipe.union_data or recipe.data,
        )
        members = recipe_members(as_meld, base)
        union_data = recipe.union_data or recipe.data
        info = get_method(recipe.union)
        teacher = meld(
            members,
            recipe.union,
            None if info.data == "none" or union_data is None else _resolve(base, union_data),
            params=recipe.union_params,
            seed=recipe.seed,
            progress=progress,
        )
    student = None
    if recipe.student is not None:
        from netmeld.members.member import Architecture, Member

        arch = Architecture.parse(recipe.student.architecture, recipe.student.architecture_kwargs)
        pre = (
            Preprocessing(**recipe.student.preprocessing.model_dump())
            if recipe.student.preprocessing is not None
            else teacher.members[0].preprocessing
        )
        student = Member(
            arch.build(num_classes=len(teacher.labels)),
            list(teacher.labels),
            name="student",
            preprocessing=pre,
            architecture=arch,
        )
    config = recipe.schedule.config(recipe.seed, checkpoint_dir, resume)
    return distill(
        teacher,
        data,
        student=student,
        init=recipe.init,
        temperature=recipe.temperature,
        config=config,
        data_free=recipe.data_free,
        synthesis=recipe.synthesis or None,
        seed=recipe.seed,
        progress=progress,
    )


# -- netmeld train ----------------------------------------------------------------------------


class PartSpec(BaseModel):
    """A part of a fused network: a trained member, or a fresh architecture (head dropped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    member: MemberSpec | None = None
    architecture: str | None = None
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PartSpec:
        if (self.member is None) == (self.architecture is None):
            raise ValueError("a part is either 'member: {...}' or 'architecture: SPEC'")
        return self


class TrainRecipe(BaseModel):
    """A ``netmeld train`` recipe: a fusion architecture, its parts, labeled data, a schedule.

    ``build: parallel`` takes ``branches`` (and ``fuse``, ``dim``, ``inputs``);
    ``hierarchical`` takes ``first`` and ``second`` (and ``cut``, ``second_input_shape``,
    ``adapt``); ``multitask`` takes ``trunk`` and ``tasks`` (and ``weighting``,
    ``loss_weights``, ``alpha``); its ``data`` maps each task to a folder or CSV.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    build: Literal["parallel", "hierarchical", "multitask"]
    branches: list[PartSpec] | None = None
    first: PartSpec | None = None
    second: PartSpec | None = None
    trunk: PartSpec | None = None
    labels: list[str] | str | None = None
    fuse: Literal["concat", "sum", "attention", "gating"] = "concat"
    dim: int | None = None
    inputs: dict[str, list[int]] | None = None
    cut: str | None = None
    second_input_shape: tuple[int, ...] | None = None
    adapt: Literal["auto", "none"] = "auto"
    tasks: dict[str, list[str]] | None = None
    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    loss_weights: dict[str, float] | None = None
    alpha: float = 1.5
    input_shape: tuple[int, ...] | None = None
    freeze: list[str] = Field(default_factory=list)
    data: str | dict[str, str]
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainRecipe:
        needs = {
            "parallel": ("branches",),
            "hierarchical": ("first", "second"),
            "multitask": ("trunk", "tasks"),
        }[self.build]
        for key in needs:
            if getattr(self, key) is None:
                raise ValueError(f"build {self.build!r} needs '{key}'")
        others = {"branches", "first", "second", "trunk", "tasks"} - set(needs)
        for key in sorted(others):
            if getattr(self, key) is not None:
                raise ValueError(f"build {self.build!r} takes no '{key}'")
        if self.build == "multitask" and not isinstance(self.data, dict):
            raise ValueError("multitask 'data' maps each task to a folder or CSV")
        if self.build != "multitask" and isinstance(self.data, dict):
            raise ValueError(f"build {self.build!r}: 'data' is one folder or CSV")
        if isinstance(self.data, dict) and self.tasks is not None:
            unknown = sorted(set(self.data) - set(self.tasks))
            if unknown:
                raise ValueError(f"data names unknown tasks {unknown}; tasks: {list(self.tasks)}")
        return self


def read_train_recipe(path: str | Path) -> tuple[TrainRecipe, Path]:
    """Parse and validate a ``netmeld train`` recipe (paths relative to its folder)."""
    return _read_yaml(path, TrainRecipe, "'build', its parts and 'data'")


def _part(spec: PartSpec, base: Path) -> Any:
    from netmeld.members.member import Architecture

    if spec.member is not None:
        return load_member(spec.member, base)
    assert spec.architecture is not None
    return Architecture.parse(spec.architecture, spec.architecture_kwargs)


def run_train_recipe(
    path: str | Path,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> Any:
    """Read a ``netmeld train`` recipe, build the fused model and train it."""
    from netmeld.data import Data, load_data
    from netmeld.methods import fusion
    from netmeld.methods.fusion.training import train as fusion_train

    recipe, base = read_train_recipe(path)
    labels: Any = recipe.labels
    if isinstance(labels, str):
        from netmeld.members.member import read_labels

        labels = list(read_labels(_resolve(base, labels)))
    if recipe.build == "parallel":
        assert recipe.branches is not None
        named = {}
        for i, b in enumerate(recipe.branches):
            part = _part(b, base)
            name = b.name or (part.name if isinstance(part, Member) else f"b{i}")
            if name in named:
                raise RecipeError(f"recipe {str(path)!r}: two branches are named {name!r}")
            named[name] = part
        model = fusion.parallel(
            named,
            labels,
            fuse=recipe.fuse,
            dim=recipe.dim,
            inputs=recipe.inputs,
            input_shape=recipe.input_shape,
            freeze=recipe.freeze,
        )
    elif recipe.build == "hierarchical":
        assert recipe.first is not None and recipe.second is not None
        model = fusion.hierarchical(
            _part(recipe.first, base),
            _part(recipe.second, base),
            labels,
            cut=recipe.cut,
            second_input_shape=recipe.second_input_shape,
            adapt=recipe.adapt,
            input_shape=recipe.input_shape,
            freeze=recipe.freeze,
        )
    else:
        assert recipe.trunk is not None and recipe.tasks is not None
        model = fusion.multitask(
            _part(recipe.trunk, base),
            recipe.tasks,
            weighting=recipe.weighting,
            loss_weights=recipe.loss_weights,
            alpha=recipe.alpha,
            input_shape=recipe.input_shape,
            freeze=recipe.freeze,
        )
    if isinstance(recipe.data, dict):
        xs: list[Any] = []
        ys: list[str] = []
        for task, source in recipe.data.items():
            part_data = load_data(
                _resolve(base, source), model.input_shape, require_labels=True, what=task
            )
            assert part_data.labels is not None
            xs.append(part_data.inputs)
            ys.extend(f"{task}/{label}" for label in part_data.labels)
        import torch

        data: Any = Data(torch.cat(xs), ys, "tasks")
    else:
        data = _resolve(base, recipe.data)
    config = recipe.schedule.config(recipe.seed, checkpoint_dir, resume)
    return fusion_train(model, data, config=config, seed=recipe.seed, progress=progress)
