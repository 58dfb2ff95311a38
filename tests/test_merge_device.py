"""Weight merging on a chosen device: ``device="cpu"`` is today's result bit for bit, a GPU
asked for on a machine without one is a ``DataError`` naming it (and ``merge_weights`` then
writes nothing), and on a GPU the passes and kernels agree with the CPU's."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import netmeld
from netmeld.errors import DataError
from netmeld.io.checkpoint_merge import merge_weights

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
A, B = ["a0", "a1", "a2"], ["b0", "b1"]


def _member(kind: str, name: str, labels: list[str], seed: int, base=None) -> netmeld.Member:
    """A tiny seeded member: an MLP over 12 features, or a BatchNorm CNN over 1x8x8 images;
    with ``base``, its body is ``base``'s plus a small seeded change (fine-tuned from it)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        arch = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 12, "hidden": 16})
        shape: tuple[int, ...] = (12,)
    else:
        arch = netmeld.Architecture(
            "netmeld.zoo:small_cnn", {"in_channels": 1, "width": 4, "blocks": 2}
        )
        shape = (1, 8, 8)
    module = arch.build(num_classes=len(labels))
    if base is not None:
        body = {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in base.state_dict().items()
            if not k.startswith("fc.")
        }
        module.load_state_dict(body, strict=False)
    return netmeld.Member(
        module.eval(), labels, name=name, preprocessing={"input_shape": shape}, architecture=arch
    )


def _pair(kind: str, *, finetuned: bool) -> list[netmeld.Member]:
    base = _member(kind, "base", A, 0).module if finetuned else None
    return [_member(kind, "a", A, 1, base), _member(kind, "b", B, 2, base)]


def _data(kind: str, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, *((12,) if kind == "mlp" else (1, 8, 8)), generator=g)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device.type == b[k].device.type == "cpu", k
        assert torch.equal(a[k], b[k]), k


def _assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device.type == b[k].device.type == "cpu", k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# (kind, method, merge_members keywords): the passes over data each case runs
MERGES = {
    "fisher": ("mlp", "fisher", {"align": "none"}),  # Fisher gradients
    "regmean-cnn": ("cnn", "regmean", {"align": "none"}),  # conv Gram matrices, BatchNorm reset
    "activation-mlp": ("mlp", "linear", {"align": "activation"}),  # correlations, REPAIR
    "activation-cnn": ("cnn", "linear", {"align": "activation"}),  # correlations, reset
}


def _merge(case: str, **kwargs) -> tuple[list[netmeld.Member], netmeld.CombinedModel]:
    kind, method, extra = MERGES[case]
    members = _pair(kind, finetuned=extra["align"] == "none")
    return members, netmeld.merge_members(
        members, method, data=_data(kind), progress=False, **extra, **kwargs
    )


# -- (a) device="cpu" is the default's result -----------------------------------------------


@pytest.mark.parametrize("case", sorted(MERGES))
def test_merge_members_on_cpu_equals_the_default(case):
    members, default = _merge(case)
    before = [_state(m.module) for m in members]
    _, on_cpu = _merge(case, device="cpu")
    _assert_equal_states(_state(default), _state(on_cpu))
    for m, state in zip(members, before, strict=True):  # the members are left as they were
        _assert_equal_states(state, _state(m.module))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])  # REPAIR without BatchNorm; a reset with it
def test_zip_members_on_cpu_equals_the_default(kind):
    default = netmeld.zip_members(_pair(kind, finetuned=False), _data(kind), progress=False)
    on_cpu = netmeld.zip_members(
        _pair(kind, finetuned=False), _data(kind), device="cpu", progress=False
    )
    _assert_equal_states(_state(default), _state(on_cpu))


def _checkpoints(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    shapes = {"up.weight": (24, 8), "up.bias": (24,), "norm.weight": (8,)}
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(6)
    for name in ("a", "b"):
        model = {
            k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items() if k in shapes
        }
        save_file({**base, **model}, str(tmp_path / f"{name}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    recipe = {
        "merge_method": "dare-ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "a.safetensors", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "b.safetensors", "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"seed": 3},
        "out_dtype": "bfloat16",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_merge_weights_on_cpu_writes_the_default_bytes(tmp_path):
    recipe = _checkpoints(tmp_path)
    default = merge_weights(recipe, tmp_path / "default", progress=False)
    on_cpu = merge_weights(recipe, tmp_path / "cpu", device="cpu", progress=False)
    auto = merge_weights(recipe, tmp_path / "auto", device="auto", progress=False)
    assert _files(default)
    assert _files(on_cpu) == _files(default)
    if not torch.cuda.is_available():
        assert _files(auto) == _files(default)


# -- (b) a GPU asked for where there is none ------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_missing_gpu_is_a_data_error(no_gpu, tmp_path, device):
    kind, method, extra = MERGES["fisher"]
    with pytest.raises(DataError, match="cuda"):
        netmeld.merge_members(
            _pair(kind, finetuned=True), method, data=_data(kind), device=device, **extra
        )
    with pytest.raises(DataError, match="cuda"):
        netmeld.zip_members(_pair("mlp", finetuned=False), _data("mlp"), device=device)
    recipe = _checkpoints(tmp_path)
    with pytest.raises(DataError, match="cuda"):
        merge_weights(recipe, tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()


def test_a_device_that_is_not_one_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a device"):
        merge_weights(_checkpoints(tmp_path), tmp_path / "out", device="gpu please")
    assert not (tmp_path / "out").exists()


# -- (c) on a GPU: the same results, within rounding -----------------------------------------


@pytest.fixture
def exact_gpu(monkeypatch):
    """No TF32 on the GPU, so that its float32 results are comparable with the CPU's."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@GPU
@pytest.mark.parametrize("case", sorted(MERGES))
def test_merge_members_on_gpu_matches_cpu(exact_gpu, case):
    on_cpu = _state(_merge(case, device="cpu")[1])
    members, on_gpu = _merge(case, device="cuda")
    _assert_close_states(on_cpu, _state(on_gpu))
    for m in members:  # put back where they were
        assert all(p.device.type == "cpu" for p in m.module.state_dict().values())
    x = _data(MERGES[case][0], 4)
    torch.testing.assert_close(on_gpu(x), _merge(case, device="cpu")[1](x), atol=1e-4, rtol=1e-4)


@GPU
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zip_members_on_gpu_matches_cpu(exact_gpu, kind):
    on_cpu = netmeld.zip_members(_pair(kind, finetuned=False), _data(kind), device="cpu")
    on_gpu = netmeld.zip_members(_pair(kind, finetuned=False), _data(kind), device="cuda")
    _assert_close_states(_state(on_cpu), _state(on_gpu))


@GPU
def test_merge_weights_on_gpu_matches_cpu(exact_gpu, tmp_path):
    from netmeld.io.shards import CheckpointReader

    recipe = _checkpoints(tmp_path)
    on_cpu = CheckpointReader(merge_weights(recipe, tmp_path / "cpu", device="cpu"))
    on_gpu = CheckpointReader(merge_weights(recipe, tmp_path / "gpu", device="cuda"))
    assert list(on_gpu) == list(on_cpu)
    for name in on_cpu:
        a, b = on_cpu.get(name), on_gpu.get(name)
        assert a.dtype == b.dtype and b.device.type == "cpu"
        if a.is_floating_point():  # bfloat16 out: a rounding step apart at most
            torch.testing.assert_close(b.float(), a.float(), atol=1e-2, rtol=1e-2)
        else:
            assert torch.equal(a, b)
