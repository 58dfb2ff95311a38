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

from pydantic import BaseModel, Field, model_validator

from netmeld.errors import MethodError, RecipeError
from netmeld.io.recipe_file import StrictSpec, read_yaml
from netmeld.members.member import Member, Preprocessing
from netmeld.members.trust import reading_files
from netmeld.methods import get_method


class PreprocessingSpec(StrictSpec):
    """How a member wants its input (:class:`netmeld.Preprocessing`)."""

    input_shape: tuple[int, ...] = Field(
        description="the shape of one input: `[C, H, W]` for images, `[F]` for vectors"
    )
    mean: tuple[float, ...] | None = Field(
        default=None,
        description="per-channel mean subtracted from inputs in [0, 1] (one value per channel, "
        "or one for all); null: no normalisation",
    )
    std: tuple[float, ...] | None = Field(
        default=None,
        description="per-channel standard deviation the inputs are divided by, as `mean`",
    )
    columns: tuple[int | str, ...] | None = Field(
        default=None,
        description="a table member's columns of the combined input, in its own order: names "
        "or positions; null: the whole input",
    )


_BRIDGED = (".keras", ".h5", ".hdf5", ".onnx")


class MemberSpec(StrictSpec):
    """One member: a checkpoint, the architecture that reads it, its labels, its input.

    A Keras (``.keras``, ``.h5``) or ONNX (``.onnx``) file needs no architecture (and its input
    shape comes from the file unless ``preprocessing`` is given); ``output`` picks one output of
    a multi-output Keras model."""

    name: str | None = Field(
        default=None, description="the member's name (unique in the recipe); null: the file's stem"
    )
    checkpoint: str | None = Field(
        default=None,
        description="safetensors or `.pt`/`.pth` weights (read with `weights_only=True`), or a "
        "Keras (`.keras`, `.h5`) or ONNX (`.onnx`) file; relative to the recipe",
    )
    hf: str | None = Field(
        default=None,
        description="instead of `checkpoint`: a Hugging Face transformers classifier folder "
        "(`save_pretrained`: config.json, model.safetensors, preprocessor or tokenizer "
        "files), read offline; labels from its id2label unless `labels` is given",
    )
    architecture: str | None = Field(
        default=None,
        description="what reads the checkpoint: `torchvision:NAME` (or just NAME), `timm:NAME` "
        "or `package.module:callable`; required unless Keras or ONNX",
    )
    architecture_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the architecture's builder"
    )
    labels: list[str] | str | None = Field(
        default=None,
        description="the label names in output order, or a file with one label per line; "
        "required unless `hf`",
    )
    preprocessing: PreprocessingSpec | None = Field(
        default=None,
        description="the member's input; required unless Keras or ONNX (whose file gives the "
        "input shape)",
    )
    head: str | None = Field(
        default=None,
        description="the qualified name of the classification head (an `nn.Linear`); null: "
        "found from the graph",
    )
    output: str | None = Field(
        default=None, description="the output of a multi-output Keras model this member is"
    )
    statistics: str | None = Field(
        default=None,
        description="the member's statistics file (`netmeld stats`), for the methods computed "
        "from statistics (`ridge`, `lda`); relative to the recipe",
    )

    @property
    def display_name(self) -> str:
        """The member's name: ``name``, else the file's stem or the folder's name."""
        return self.name or Path(self.checkpoint or self.hf or "member").stem

    @model_validator(mode="after")
    def _check(self) -> MemberSpec:
        if (self.checkpoint is None) == (self.hf is None):
            raise ValueError("a member needs exactly one of 'checkpoint' and 'hf'")
        if self.hf is not None:
            if self.architecture is not None or self.output is not None or self.head is not None:
                raise ValueError(
                    f"member {self.hf!r}: an 'hf' folder carries its architecture and head"
                )
            return self
        assert self.checkpoint is not None
        if self.labels is None:
            raise ValueError(f"member {self.checkpoint!r}: 'labels' is required")
        bridged = self.checkpoint.lower().endswith(_BRIDGED)
        if not bridged and (self.architecture is None or self.preprocessing is None):
            raise ValueError(
                f"member {self.checkpoint!r}: a checkpoint needs 'architecture' and "
                "'preprocessing' (Keras and ONNX files carry them)"
            )
        if self.output is not None and not self.checkpoint.lower().endswith(_BRIDGED[:3]):
            raise ValueError(f"member {self.checkpoint!r}: 'output' is for Keras models")
        return self


class MergeSpec(StrictSpec):
    """Merge the members' bodies in weight space before the union method combines their heads
    (:func:`netmeld.merge_members`; ``method: zipit`` is :func:`netmeld.zip_members`)."""

    method: str = Field(description="the weight-merging kernel, or `zipit` (ZipIt!)")
    base: str | None = Field(
        default=None,
        description="checkpoint of the common base the members were fine-tuned from (needed "
        "by the task-vector kernels)",
    )
    weights: list[float] | None = Field(
        default=None, description="one weight per member; null: equal weights"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the kernel's parameters (`density`, `lambda`, ...: `netmeld methods` "
        "lists them with their defaults)",
    )
    align: Literal["auto", "weight", "activation", "none"] = Field(
        default="auto",
        description="permute members onto the first before merging: weight matching (no "
        "data), activation matching (data), none, or auto (weight matching when the bodies "
        "look independently initialised and no base is given)",
    )
    layers: int | None = Field(
        default=None,
        description="zipit: zip only the first n weighted layers, run the rest per member; "
        "null: all but the heads",
    )
    alpha: float = Field(
        default=0.5,
        description="zipit: the share of a layer's units that may pair within one model",
    )

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


class Recipe(StrictSpec):
    """A whole ``netmeld meld`` recipe."""

    members: list[MemberSpec] = Field(min_length=1, description="the members to combine")
    method: str = Field(default="concat", description="how the members are combined")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's parameters (`netmeld methods` lists them with their defaults)",
    )
    data: str | None = Field(
        default=None,
        description="a folder of images (one subfolder per label, or unlabeled images) or a "
        "`.csv` table with a `label` column; required by methods that need data",
    )
    unlabeled: str | None = Field(
        default=None,
        description="a folder of unlabeled images or a `.csv` table, read beside `data` by the "
        "semi-supervised methods (`semi`)",
    )
    input_shape: tuple[int, ...] | None = Field(
        default=None,
        description="the combined model's input shape; each member's input is resized to its "
        "own; null: the members' common shape",
    )
    feature_names: list[str] | None = Field(
        default=None,
        description="the order of the combined input's columns (members that read table "
        "columns); null: the members' columns in order of appearance",
    )
    seed: int = Field(default=0, description="random seed of the fit")
    merge: MergeSpec | None = Field(
        default=None,
        description="merge the members' bodies in weight space first; `method` then combines "
        "the kept heads",
    )

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
        if info.data == "statistics":
            lacking = [m.display_name for m in self.members if not m.statistics]
            if lacking:
                raise MethodError(
                    f"method {self.method!r} computes the head from member statistics: give "
                    f"member {lacking[0]!r} 'statistics: FILE' (made by netmeld stats)"
                )
        elif info.data != "none" and self.data is None:
            raise MethodError(
                f"method {self.method!r} needs {info.data} data: add 'data: FOLDER' to the recipe"
            )
        if self.unlabeled is not None and not info.unlabeled:
            raise MethodError(
                f"method {self.method!r} reads no 'unlabeled' data; remove it or use a "
                "semi-supervised method"
            )
        names = [m.display_name for m in self.members]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"two members are named {name!r}; member names must be unique")
        return self


_Spec = TypeVar("_Spec", bound=BaseModel)


def read_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse and validate a recipe file; returns it and the folder its paths are relative to."""
    return read_yaml(path, Recipe, "'members' and 'method'")


def resolve_path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_member(spec: MemberSpec, base: Path) -> Member:
    """Load one member of a recipe: a checkpoint, a Keras or ONNX file, or a transformers
    folder."""
    labels: Any = spec.labels
    if isinstance(labels, str):
        labels = resolve_path(base, labels)
    pre = None if spec.preprocessing is None else Preprocessing(**spec.preprocessing.model_dump())
    if spec.hf is not None:
        return Member.from_pretrained(
            resolve_path(base, spec.hf), labels, name=spec.name, preprocessing=pre
        )
    assert spec.checkpoint is not None and labels is not None
    path = resolve_path(base, spec.checkpoint)
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


def run_recipe(
    path: str | Path,
    *,
    progress: bool | None = None,
    trust_code: bool = False,
    **runtime: Any,
) -> Any:
    """Read a recipe, load its members and data, and return the combined model. Only trusted
    architecture builders run (see :func:`netmeld.trust_builder`) unless ``trust_code=True``.
    ``runtime``: where and how the members run (``device``, ``precision``, ``cache``,
    ``workers``, as :func:`netmeld.meld` takes them)."""
    with reading_files(f"recipe {str(path)!r}", trust_code=trust_code):
        return _run_recipe(path, progress=progress, runtime=runtime)


def pick_member(names: list[str], name: str | None, where: str) -> int:
    """The position of member ``name`` among ``names`` (the only one when ``name`` is
    ``None``); several to choose from, or an unknown name, is an error naming them."""
    if name is None and len(names) > 1:
        raise RecipeError(f"{where} has members {names}; pick one with --member")
    if name is not None and name not in names:
        raise RecipeError(f"{where} has no member {name!r}; it has {names}")
    return names.index(name) if name else 0


def recipe_member(path: str | Path, name: str | None, *, trust_code: bool = False) -> Member:
    """One member of a recipe (by ``name``; the only one when ``name`` is ``None``); only that
    member's checkpoint is read."""
    with reading_files(f"recipe {str(path)!r}", trust_code=trust_code):
        recipe, base = read_recipe(path)
        names = [m.display_name for m in recipe.members]
        at = pick_member(names, name, f"recipe {str(path)!r}")
        return load_member(recipe.members[at], base)


def _run_recipe(
    path: str | Path, *, progress: bool | None = None, runtime: dict[str, Any] | None = None
) -> Any:
    runtime = dict(runtime or {})
    from netmeld.methods.meld import meld

    recipe, base = read_recipe(path)
    members = recipe_members(recipe, base)
    data = None if recipe.data is None else resolve_path(base, recipe.data)
    if recipe.merge is not None:
        from netmeld.methods.merge import merge_members, zip_members

        spec = recipe.merge
        union: dict[str, Any] = {
            "union": recipe.method,
            "union_params": recipe.params,
            "seed": recipe.seed,
            "progress": progress,
        }
        if "device" in runtime:
            union["device"] = runtime["device"]
        if spec.method == "zipit":
            return zip_members(members, data, layers=spec.layers, alpha=spec.alpha, **union)
        return merge_members(
            members,
            spec.method,
            base=None if spec.base is None else resolve_path(base, spec.base),
            weights=spec.weights,
            params=spec.params,
            data=data,
            align=spec.align,
            **union,
        )
    statistics = None
    if get_method(recipe.method).data == "statistics":
        statistics = [resolve_path(base, m.statistics) for m in recipe.members if m.statistics]
    unlabeled = None if recipe.unlabeled is None else resolve_path(base, recipe.unlabeled)
    return meld(
        members,
        recipe.method,
        data,
        statistics=statistics,
        unlabeled=unlabeled,
        params=recipe.params,
        input_shape=recipe.input_shape,
        feature_names=recipe.feature_names,
        seed=recipe.seed,
        progress=progress,
        **runtime,
    )
