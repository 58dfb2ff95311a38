"""Property-based: a saved folder's netmeld.json or a recipe, mutated anywhere into any JSON
value, loads or fails with a NetmeldError; no other exception, and no code runs (issue 13,
item 9). Bounded so the file runs in well under a minute."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import netmeld
from netmeld.cli.recipes import read_recipe, recipe_members
from netmeld.errors import NetmeldError
from netmeld.members.trust import reading_files

from ._members import mlp_member

HOSTILE_SPECS = ["os:system", "subprocess:run", "builtins:exec", "torch:load", "runpy:run_path"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_SPECS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def _member(name: str, labels: list[str], seed: int) -> netmeld.Member:
    return mlp_member(name, labels, seed, features=4, hidden=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "model"
    netmeld.meld(
        [_member("a", ["x", "y"], 0), _member("b", ["z"], 1)],
        "calibrate",
        (torch.randn(20, 4), ["x", "y", "z", "x"] * 5),
    ).save(path)
    return path


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_mutated_netmeld_json_loads_or_is_a_netmeld_error(folder, tmp_path_factory, data):
    config = json.loads((folder / "netmeld.json").read_text())
    path = data.draw(st.sampled_from(_paths(config)))
    mutated = _set(config, path, data.draw(values))
    copy_ = Path(tmp_path_factory.mktemp("m")) / "m"
    shutil.copytree(folder, copy_)
    (copy_ / "netmeld.json").write_text(json.dumps(mutated))
    try:
        model = netmeld.load(copy_)
    except NetmeldError:
        return
    with torch.no_grad():
        out = model(torch.randn(3, *model.input_shape))
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    members = []
    for m in (_member("a", ["x", "y"], 0), _member("b", ["z", "w"], 1)):
        save_file(m.module.state_dict(), str(root / f"{m.name}.safetensors"))
        members.append(
            {
                "name": m.name,
                "checkpoint": f"{m.name}.safetensors",
                "architecture": "netmeld.zoo:mlp",
                "architecture_kwargs": {"in_features": 4, "hidden": 4},
                "labels": list(m.labels),
                "preprocessing": {"input_shape": [4]},
            }
        )
    (root / "recipe.yaml").write_text(yaml.safe_dump({"members": members, "method": "concat"}))
    return root


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_mutated_recipe_reads_or_is_a_netmeld_error(recipe_dir, data):
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    path = data.draw(st.sampled_from(_paths(recipe)))
    mutated = _set(recipe, path, data.draw(values))
    target = recipe_dir / "mutated.yaml"
    target.write_text(yaml.safe_dump(mutated))
    try:
        with reading_files(f"recipe {str(target)!r}"):
            spec, base = read_recipe(target)
            recipe_members(spec, base)
    except NetmeldError:
        return


@pytest.mark.parametrize("hidden", [10**9, -1])
def test_a_recipe_width_that_does_not_fit_its_checkpoint_is_refused_unbuilt(recipe_dir, hidden):
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    recipe["members"][1]["architecture_kwargs"]["hidden"] = hidden
    target = recipe_dir / "wide.yaml"
    target.write_text(yaml.safe_dump(recipe))
    spec, base = read_recipe(target)
    message = "refusing to build it" if hidden > 0 else "negative dimension"
    with pytest.raises(netmeld.MemberError, match=rf"member 'b'.*{message}"):
        recipe_members(spec, base)


def test_a_checkpoint_with_integer_weights_is_refused_naming_the_tensor(recipe_dir, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(recipe_dir / "a.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("weight"))
    tensors[key] = tensors[key].long()
    save_file(tensors, str(tmp_path / "a.safetensors"))
    arch = "netmeld.zoo:mlp"
    with pytest.raises(netmeld.CheckpointError, match=rf"{key!r} is int64.*expects float32"):
        netmeld.Member.from_checkpoint(
            tmp_path / "a.safetensors",
            arch,
            ["x", "y"],
            preprocessing={"input_shape": (4,)},
            architecture_kwargs={"in_features": 4, "hidden": 4},
        )
