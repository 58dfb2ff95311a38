"""YAML recipes for ``netmeld distill`` (teachers, union, student, data, schedule) and
``netmeld train`` (a fusion architecture, its parts, labeled data, schedule). A schedule's
defaults are the trainer's own, so a recipe without ``schedule:`` trains as the Python call
does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field, create_model, model_validator

from netmeld.cli.recipes.meld import (
    MemberSpec,
    PreprocessingSpec,
    Recipe,
    load_member,
    recipe_members,
    resolve_path,
)
from netmeld.errors import MethodError, RecipeError
from netmeld.io.recipe_file import StrictSpec, read_yaml
from netmeld.members.member import Member, Preprocessing
from netmeld.members.trust import reading_files
from netmeld.methods import get_method
from netmeld.methods.distill import SCHEDULE as DISTILL_SCHEDULE
from netmeld.methods.fusion.parts import FUSION_KINDS, FUSIONS, WEIGHTINGS
from netmeld.methods.fusion.training import SCHEDULE as TRAIN_SCHEDULE


class StudentSpec(StrictSpec):
    """The student of a distillation recipe: an architecture with one output per union label."""

    architecture: str = Field(
        description="the student's builder, as a member's `architecture`; built with one "
        "output per union label"
    )
    architecture_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the builder"
    )
    preprocessing: PreprocessingSpec | None = Field(
        default=None, description="the student's input; null: the first teacher's"
    )


class ScheduleSpec(StrictSpec):
    """A recipe's ``schedule:``; its defaults are the trainer's own (:data:`TRAIN_SCHEDULE`
    for ``netmeld train``, :data:`DISTILL_SCHEDULE` for ``netmeld distill``), so a recipe and
    the Python call train the same way by default."""

    epochs: int = Field(description="passes over the data")
    batch_size: int = Field(description="examples per step (the global batch under DDP)")
    lr: float = Field(description="the peak learning rate (AdamW, cosine decay)")
    weight_decay: float = Field(description="AdamW's weight decay")
    warmup_steps: int = Field(default=0, description="steps of linear warm-up to `lr`")

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


def _schedule(name: str, defaults: Any, doc: str) -> type[ScheduleSpec]:
    """A :class:`ScheduleSpec` whose defaults are a trainer's ``SCHEDULE`` (the descriptions
    stay ScheduleSpec's)."""
    fields = {
        key: (
            ScheduleSpec.model_fields[key].annotation,
            Field(
                default=getattr(defaults, key),
                description=ScheduleSpec.model_fields[key].description,
            ),
        )
        for key in ("epochs", "batch_size", "lr", "weight_decay")
    }
    return create_model(name, __base__=ScheduleSpec, __doc__=doc, **fields)  # type: ignore[call-overload]


if TYPE_CHECKING:
    DistillSchedule = ScheduleSpec
    TrainSchedule = ScheduleSpec
else:
    DistillSchedule = _schedule(
        "DistillSchedule",
        DISTILL_SCHEDULE,
        "``netmeld distill``'s schedule, defaulting to :data:`netmeld.methods.distill.SCHEDULE`.",
    )
    TrainSchedule = _schedule(
        "TrainSchedule",
        TRAIN_SCHEDULE,
        "``netmeld train``'s schedule, defaulting to the fusion trainer's (``netmeld.train``).",
    )


class DistillRecipe(StrictSpec):
    """A ``netmeld distill`` recipe: teachers (members, or a saved combined model), how they
    are combined, the student, the unlabeled data (or a data-free budget) and the schedule."""

    teachers: list[MemberSpec] | None = Field(
        default=None, description="the teachers, as a meld recipe's members (or give `teacher`)"
    )
    teacher: str | None = Field(
        default=None, description="a saved combined-model folder to distil instead of `teachers`"
    )
    union: str = Field(default="concat", description="how `teachers` are combined into the teacher")
    union_params: dict[str, Any] = Field(
        default_factory=dict, description="the union method's parameters"
    )
    union_data: str | None = Field(
        default=None,
        description="data for the union method (labeled, for a method that needs labels); "
        "null: `data`",
    )
    student: StudentSpec | None = Field(
        default=None,
        description="the student; null: the first teacher's architecture with a new head over "
        "the union",
    )
    init: Literal["member", "merge", "scratch"] = Field(
        default="member",
        description="the default student's start: the first teacher's weights, the teachers' "
        "bodies merged in weight space, or fresh",
    )
    data: str | None = Field(
        default=None,
        description="unlabeled (or proxy) images the student learns the teacher's outputs on",
    )
    data_free: int | None = Field(
        default=None,
        description="without `data`: synthesize this many inputs from the teachers' BatchNorm "
        "statistics (DeepInversion)",
    )
    synthesis: dict[str, Any] = Field(
        default_factory=dict, description="options of the data-free synthesis"
    )
    temperature: float = Field(
        default=4.0,
        description="softens both distributions; the loss is T² · KL(teacher ‖ student)",
    )
    schedule: DistillSchedule = Field(
        default_factory=cast(Any, DistillSchedule), description="the training schedule"
    )
    seed: int = Field(default=0, description="random seed")

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


def _seeded_build(arch: Any, num_classes: int, seed: int) -> Any:
    """A fresh student from ``seed``: two runs of one recipe start from the same weights."""
    from netmeld.runtime import seeded

    with seeded(seed):
        return arch.build(num_classes=num_classes)


def _run_distill_recipe(
    path: str | Path,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
    device: str | None = "auto",
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
            device=device,
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
            _seeded_build(arch, len(teacher.labels), recipe.seed),
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
        device=None if device == "auto" else device,
        progress=progress,
    )


# -- netmeld train ----------------------------------------------------------------------------


class PartSpec(StrictSpec):
    """A part of a fused network: a trained member, or a fresh architecture (head dropped)."""

    name: str | None = Field(
        default=None,
        description="the branch's name (for `freeze` and `inputs`); null: the member's name, "
        "else `b0`, `b1`, ...",
    )
    member: MemberSpec | None = Field(
        default=None, description="a trained member (its body, with its own preprocessing)"
    )
    architecture: str | None = Field(
        default=None,
        description="or a fresh architecture, as a member's `architecture` (head dropped)",
    )
    architecture_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the architecture's builder"
    )

    @model_validator(mode="after")
    def _check(self) -> PartSpec:
        if (self.member is None) == (self.architecture is None):
            raise ValueError("a part is either 'member: {...}' or 'architecture: SPEC'")
        return self


class TrainRecipe(StrictSpec):
    """A ``netmeld train`` recipe: a fusion architecture, its parts, labeled data, a schedule.

    ``build: parallel`` takes ``branches`` (and ``fuse``, ``dim``, ``inputs``);
    ``hierarchical`` takes ``first`` and ``second`` (and ``cut``, ``second_input_shape``,
    ``adapt``); ``multitask`` takes ``trunk`` and ``tasks`` (and ``weighting``,
    ``loss_weights``, ``alpha``); its ``data`` maps each task to a folder or CSV.
    """

    build: str = Field(description="the fusion architecture")
    branches: list[PartSpec] | None = Field(
        default=None, description="parallel: the branches, run side by side and fused"
    )
    first: PartSpec | None = Field(
        default=None, description="hierarchical: the network whose features feed `second`"
    )
    second: PartSpec | None = Field(
        default=None, description="hierarchical: the network that classifies `first`'s features"
    )
    trunk: PartSpec | None = Field(default=None, description="multitask: the shared trunk")
    labels: list[str] | str | None = Field(
        default=None,
        description="parallel and hierarchical: the output labels, or a file with one per "
        "line; null: the members' labels",
    )
    fuse: str = Field(
        default=FUSIONS[0], description="parallel: how the branches' features are combined"
    )
    dim: int | None = Field(
        default=None,
        description="parallel: the width branches are projected to (sum, attention, gating); "
        "null: the narrowest branch's",
    )
    inputs: dict[str, list[int]] | None = Field(
        default=None,
        description="parallel: per branch, the positions of the input's dimension 1 it reads "
        "(table columns, image channels); null: all of it",
    )
    cut: str | None = Field(
        default=None,
        description="hierarchical: the submodule of `first` whose output feeds `second` (a "
        "module torch.fx calls, e.g. `features.3`); null: the features feeding its head",
    )
    second_input_shape: tuple[int, ...] | None = Field(
        default=None, description="hierarchical: what `second` reads; null: a member's input shape"
    )
    adapt: Literal["auto", "none"] = Field(
        default="auto",
        description="hierarchical: insert a 1x1 conv, a resize or a projection where the shapes "
        "differ, or raise an error naming both",
    )
    tasks: dict[str, list[str]] | None = Field(
        default=None, description="multitask: each task's labels (model labels are `task/label`)"
    )
    weighting: str = Field(
        default=WEIGHTINGS[0], description="multitask: how the tasks' losses are weighted"
    )
    loss_weights: dict[str, float] | None = Field(
        default=None,
        description="multitask, fixed weighting: each task's weight; a task not named: 1",
    )
    alpha: float = Field(default=1.5, description="multitask, gradnorm: the restoring force α")
    input_shape: tuple[int, ...] | None = Field(
        default=None, description="the fused model's input shape; null: the members' common shape"
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parts (`a`, `first`, `trunk`) or blocks (`a.layer1`) not to train",
    )
    data: str | dict[str, str] = Field(
        description="labeled data: a folder (one subfolder per label) or a `.csv`; multitask: a "
        "mapping of each task to its own"
    )
    schedule: TrainSchedule = Field(
        default_factory=cast(Any, TrainSchedule), description="the training schedule"
    )
    seed: int = Field(default=0, description="random seed")

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


def _run_train_recipe(
    path: str | Path,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
    device: str | None = "auto",
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
            seed=recipe.seed,
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
            seed=recipe.seed,
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
            seed=recipe.seed,
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
    return fusion_train(
        model,
        data,
        config=config,
        seed=recipe.seed,
        device=None if device == "auto" else device,
        progress=progress,
    )


def _trusted(run: Any, doc: str) -> Any:
    """``run`` (a recipe runner) reading under the builder allowlist, with ``trust_code=``."""

    def runner(
        path: str | Path,
        *,
        checkpoint_dir: str | None = None,
        resume: bool = False,
        progress: bool | None = None,
        trust_code: bool = False,
        device: str | None = "auto",
    ) -> Any:
        with reading_files(f"recipe {str(path)!r}", trust_code=trust_code):
            return run(
                path,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                progress=progress,
                device=device,
            )

    runner.__name__ = runner.__qualname__ = run.__name__.lstrip("_")
    runner.__doc__ = (
        f"{doc} Only trusted architecture builders run (see :func:`netmeld.trust_builder`) "
        "unless ``trust_code=True``."
    )
    return runner


run_distill_recipe = _trusted(
    _run_distill_recipe,
    "Read a distillation recipe and return the distilled one-member combined model.",
)
run_train_recipe = _trusted(
    _run_train_recipe, "Read a ``netmeld train`` recipe, build the fused model and train it."
)
