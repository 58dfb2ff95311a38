"""The YAML recipes of the CLI, one module per kind: :mod:`.meld` (members, a method, its
parameters and data; also the member entries every recipe shares) and :mod:`.training`
(``netmeld distill`` and ``netmeld train``). ``merge-weights`` recipes are a file format of
their own, in :mod:`netmeld.io.checkpoint_merge`. Every recipe is checked whole when it is
read, before any checkpoint is loaded."""

from netmeld.cli.recipes.meld import (
    MemberSpec,
    MergeSpec,
    PreprocessingSpec,
    Recipe,
    load_member,
    pick_member,
    read_recipe,
    recipe_member,
    recipe_members,
    run_recipe,
)
from netmeld.cli.recipes.training import (
    DistillRecipe,
    DistillSchedule,
    PartSpec,
    ScheduleSpec,
    StudentSpec,
    TrainRecipe,
    TrainSchedule,
    read_distill_recipe,
    read_train_recipe,
    run_distill_recipe,
    run_train_recipe,
)

__all__ = [
    "DistillRecipe",
    "DistillSchedule",
    "MemberSpec",
    "MergeSpec",
    "PartSpec",
    "PreprocessingSpec",
    "Recipe",
    "ScheduleSpec",
    "StudentSpec",
    "TrainRecipe",
    "TrainSchedule",
    "load_member",
    "pick_member",
    "read_distill_recipe",
    "read_recipe",
    "read_train_recipe",
    "recipe_member",
    "recipe_members",
    "run_distill_recipe",
    "run_recipe",
    "run_train_recipe",
]
