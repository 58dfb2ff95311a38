"""YAML recipes for ``netmeld distill`` (teachers, union, student, data, schedule) and
``netmeld train`` (a fusion architecture, its parts, labeled data, schedule). A schedule's
defaults are the trainer's own, so a recipe without ``schedule:`` trains as the Python call
does."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from netmeld.cli.recipes.meld import (
    MemberSpec,
    PreprocessingSpec,
    Recipe,
    load_member,
    recipe_members,
    resolve_path,
)
from netmeld.errors import MethodError, RecipeError
from netmeld.io.recipe_file import read_yaml
from netmeld.members.member import Member, Preprocessing
from netmeld.methods import get_method
from netmeld.methods.distill import SCHEDULE as DISTILL_SCHEDULE
from netmeld.methods.fusion.parts import FUSION_KINDS, FUSIONS, WEIGHTINGS
from netmeld.methods.fusion.training import SCHEDULE as TRAIN_SCHEDULE


class StudentSpec(BaseModel):
    """The student of a distillation recipe: an architecture with one output per union label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    preprocessing: PreprocessingSpec | None = None  # default: the first teacher's


class ScheduleSpec(BaseModel):
    """A recipe's ``schedule:``; its defaults are the trainer's own (:data:`TRAIN_SCHEDULE`
    for ``netmeld train``, :data:`DISTILL_SCHEDULE` for ``netmeld distill``), so a recipe and
    the Python call train the same way by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
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


class DistillSchedule(ScheduleSpec):
    """``netmeld distill``'s schedule, defaulting to :data:`netmeld.methods.distill.SCHEDULE`."""

    epochs: int = DISTILL_SCHEDULE.epochs
    batch_size: int = DISTILL_SCHEDULE.batch_size
    lr: float = DISTILL_SCHEDULE.lr
    weight_decay: float = DISTILL_SCHEDULE.weight_decay


class TrainSchedule(ScheduleSpec):
    """``netmeld train``'s schedule, defaulting to the fusion trainer's (``netmeld.train``)."""

    epochs: int = TRAIN_SCHEDULE.epochs
    batch_size: int = TRAIN_SCHEDULE.batch_size
    lr: float = TRAIN_SCHEDULE.lr
    weight_decay: float = TRAIN_SCHEDULE.weight_decay


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
    schedule: DistillSchedule = Field(default_factory=DistillSchedule)
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
    return read_yaml(path, DistillRecipe, "'teachers' (or 'teacher') and 'data'")


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
    data = None if recipe.data is None else resolve_path(base, recipe.data)
    if recipe.teacher is not None:
        teacher = load(resolve_path(base, recipe.teacher))
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
            None if info.data == "none" or union_data is None else resolve_path(base, union_data),
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

    build: str  # one of FUSION_KINDS
    branches: list[PartSpec] | None = None
    first: PartSpec | None = None
    second: PartSpec | None = None
    trunk: PartSpec | None = None
    labels: list[str] | str | None = None
    fuse: str = FUSIONS[0]  # one of FUSIONS
    dim: int | None = None
    inputs: dict[str, list[int]] | None = None
    cut: str | None = None
    second_input_shape: tuple[int, ...] | None = None
    adapt: Literal["auto", "none"] = "auto"
    tasks: dict[str, list[str]] | None = None
    weighting: str = WEIGHTINGS[0]  # one of WEIGHTINGS
    loss_weights: dict[str, float] | None = None
    alpha: float = 1.5
    input_shape: tuple[int, ...] | None = None
    freeze: list[str] = Field(default_factory=list)
    data: str | dict[str, str]
    schedule: TrainSchedule = Field(default_factory=TrainSchedule)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainRecipe:
        for key, choices in (("build", FUSION_KINDS), ("fuse", FUSIONS), ("weighting", WEIGHTINGS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} {getattr(self, key)!r}: expected one of {list(choices)}")
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
    return read_yaml(path, TrainRecipe, "'build', its parts and 'data'")


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

        labels = list(read_labels(resolve_path(base, labels)))
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
            fuse=cast(Any, recipe.fuse),
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
            weighting=cast(Any, recipe.weighting),
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
                resolve_path(base, source), model.input_shape, require_labels=True, what=task
            )
            assert part_data.labels is not None
            xs.append(part_data.inputs)
            ys.extend(f"{task}/{label}" for label in part_data.labels)
        import torch

        data: Any = Data(torch.cat(xs), ys, "tasks")
    else:
        data = resolve_path(base, recipe.data)
    config = recipe.schedule.config(recipe.seed, checkpoint_dir, resume)
    return fusion_train(model, data, config=config, seed=recipe.seed, progress=progress)
