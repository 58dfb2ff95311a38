"""Out-of-core checkpoint merging: the streamed result equals the in-memory merge bit for bit,
shards and indexes round-trip, and bad recipes and mismatched checkpoints are named."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from netmeld.cli import main
from netmeld.errors import IncompatibleMembersError, RecipeError
from netmeld.io.checkpoint_merge import merge_state_dicts, merge_weights, read_merge_recipe
from netmeld.io.shards import CheckpointReader, ShardedWriter
from netmeld.ops.merge import KERNELS


def _state(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (50, 16),
        "mlp.up.weight": (32, 16),
        "mlp.up.bias": (32,),
        "attn.q.weight": (16, 16),
        "norm.weight": (16,),
    }
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(*shape, generator=g)
        out[name] = t if base is None else base[name] + 0.05 * t
    out["position_ids"] = torch.arange(8)
    return out


def _save_sharded(state: dict[str, torch.Tensor], folder, shard_size: int) -> None:
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    with ShardedWriter(folder, layout, shard_size=shard_size) as w:
        for k, v in state.items():
            w.write(k, v)


@pytest.fixture
def checkpoints(tmp_path):
    base = _state(0)
    a, b = _state(1, base), _state(2, base)
    save_file(base, str(tmp_path / "base.safetensors"))
    _save_sharded(a, tmp_path / "a", shard_size=3000)  # several shards with an index
    (tmp_path / "b").mkdir()
    save_file(b, str(tmp_path / "b" / "model.safetensors"))
    return tmp_path, base, a, b


def _recipe(tmp_path, **fields) -> str:
    recipe = {
        "merge_method": "ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.3, "density": 0.4}},
        ],
        "parameters": {"normalize": True},
        "shard_size": 4000,
    }
    recipe.update(fields)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_sharded_writer_round_trips(checkpoints):
    tmp_path, _, a, _ = checkpoints
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = CheckpointReader(tmp_path / "a")
    assert list(reader) == list(a)
    for k, v in a.items():
        assert torch.equal(reader.get(k), v)


GLOBAL = {
    "linear": {"normalize": True},
    "task-arithmetic": {"lambda": 0.8},
    "ties": {"normalize": True},
    "dare-ties": {"seed": 3},
    "breadcrumbs": {"gamma": 0.05},
}


@pytest.mark.parametrize("method", sorted(k for k, v in KERNELS.items() if v.needs == "none"))
def test_streaming_merge_equals_in_memory_merge(checkpoints, method):
    tmp_path, base, a, b = checkpoints
    sparse = "density" in KERNELS[method].defaults
    models = [
        {"model": name, "parameters": {"weight": w, **({"density": d} if sparse else {})}}
        for name, w, d in (("a", 0.7, 0.5), ("b", 0.3, 0.4))
    ]
    recipe = _recipe(
        tmp_path,
        merge_method=method,
        models=models,
        parameters=GLOBAL.get(method, {}),
        base_model="base.safetensors" if KERNELS[method].needs_base else None,
    )
    out = merge_weights(recipe, tmp_path / "out")
    streamed = {k: CheckpointReader(out).get(k) for k in CheckpointReader(out)}
    expected = merge_state_dicts(
        method,
        [a, b],
        base=base if KERNELS[method].needs_base else None,
        weights=[0.7, 0.3],
        params={**GLOBAL.get(method, {}), **({"density": [0.5, 0.4]} if sparse else {})},
    )
    assert streamed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(streamed[k], expected[k]), k
    assert not torch.equal(streamed["mlp.up.weight"], a["mlp.up.weight"])
    assert torch.equal(streamed["position_ids"], base["position_ids"])


def test_per_tensor_filters_and_dtype(checkpoints):
    tmp_path, _, a, b = checkpoints
    recipe = _recipe(
        tmp_path,
        merge_method="linear",
        base_model=None,
        models=[
            {
                "model": "a",
                "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]},
            },
            {
                "model": "b",
                "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]},
            },
        ],
        parameters={},
        out_dtype="bfloat16",
    )
    out = merge_weights(recipe, tmp_path / "out")
    merged: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        merged |= load_file(str(shard))
    assert merged["mlp.up.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["mlp.up.weight"], a["mlp.up.weight"].bfloat16())
    assert torch.equal(merged["attn.q.weight"], b["attn.q.weight"].bfloat16())


def test_cli_merge_weights(checkpoints, capsys):
    tmp_path, *_ = checkpoints
    assert main(["merge-weights", _recipe(tmp_path), "-o", str(tmp_path / "cli")]) == 0
    assert "merged 2 models with 'ties'" in capsys.readouterr().out
    assert len(CheckpointReader(tmp_path / "cli")) == 6
    # no overwrite unless asked, and the old output is intact
    before = CheckpointReader(tmp_path / "cli").get("mlp.up.weight")
    assert main(["merge-weights", _recipe(tmp_path), "-o", str(tmp_path / "cli")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert torch.equal(CheckpointReader(tmp_path / "cli").get("mlp.up.weight"), before)


def test_mismatched_checkpoints_name_tensor_and_shapes(checkpoints):
    tmp_path, base, _, b = checkpoints
    bad = dict(b)
    bad["mlp.up.weight"] = torch.zeros(33, 16)
    (tmp_path / "b" / "model.safetensors").unlink()
    save_file(bad, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(
        IncompatibleMembersError,
        match=r"tensor 'mlp.up.weight' has shape \(32, 16\) in 'base.safetensors' and "
        r"\(33, 16\) in 'b'",
    ):
        merge_weights(_recipe(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IncompatibleMembersError, match=r"'mlp.up.weight' has shape \(32, 16\)"):
        merge_state_dicts("linear", [base, bad])


def test_recipe_errors_list_the_valid_choices(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown merge method 'tie'; valid methods: .*ties"):
        read_merge_recipe(_recipe(tmp_path, merge_method="tie"))
    with pytest.raises(RecipeError, match=r"'ties' needs base_model"):
        read_merge_recipe(_recipe(tmp_path, base_model=None))
    with pytest.raises(RecipeError, match=r"no parameter 'densty'"):
        read_merge_recipe(_recipe(tmp_path, parameters={"densty": 0.3}))
    with pytest.raises(RecipeError, match=r"'lambda' is not a per-model parameter"):
        read_merge_recipe(_recipe(tmp_path, models=[{"model": "a", "parameters": {"lambda": 1}}]))
    with pytest.raises(RecipeError, match=r"needs data"):
        read_merge_recipe(_recipe(tmp_path, merge_method="fisher"))


def test_a_crash_mid_merge_leaves_nothing(checkpoints, monkeypatch):
    tmp_path, *_ = checkpoints
    import netmeld.io.checkpoint_merge as mw

    calls = {"n": 0}
    real = mw.merge_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(mw, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="killed"):
        merge_weights(_recipe(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_mixed_dtypes_need_a_recipe_dtype(checkpoints):
    tmp_path, _, _, b = checkpoints
    (tmp_path / "b" / "model.safetensors").unlink()
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in b.items()},
        str(tmp_path / "b" / "model.safetensors"),
    )
    with pytest.raises(
        RecipeError,
        match=r"tensor 'attn.q.weight' has different dtypes "
        r"\(torch.float32 in '.*base.safetensors', torch.float32 in '.*a', "
        r"torch.float16 in '.*b'\); set 'dtype:'",
    ):
        merge_weights(_recipe(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = merge_weights(_recipe(tmp_path, dtype="float32"), tmp_path / "out")
    assert CheckpointReader(out).get("embed.weight").dtype == torch.float32


def test_merge_weights_is_the_public_name_and_the_old_one_warns():
    import netmeld
    import netmeld.io.checkpoint_merge as cm

    assert netmeld.merge_weights is merge_weights
    with pytest.warns(DeprecationWarning, match="netmeld.merge_weights"):
        assert cm.merge_checkpoints is merge_weights
