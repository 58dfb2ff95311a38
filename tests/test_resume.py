"""Resume is explicit: no checkpoint, or one another run wrote (other settings, model or data),
is an error naming what differs; what a crash in the atomic swap leaves behind is restored by
the next write or resume, never deleted unseen; temporary folders of dead processes are
removed by the next write beside them."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import netmeld
from netmeld import _atomic
from netmeld.engine import TrainConfig, state_equal, tensor_batches, train
from netmeld.errors import CheckpointError, ModelFileError
from netmeld.zoo import mlp


def _data(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _run(config: TrainConfig, *, hidden: int = 16, data=None, stop_after: int | None = None):
    x, y = data if data is not None else _data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = mlp(12, 2, hidden=hidden)

    def stop(epoch: int, _loss: float) -> None:
        if epoch == stop_after:
            raise KeyboardInterrupt

    def step(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    train(
        model,
        step,
        len(x),
        tensor_batches(x, y),
        config,
        device="cpu",
        progress=False,
        on_epoch_end=stop,
    )
    return model.state_dict()


def _config(folder: Path, **changes) -> TrainConfig:
    base = TrainConfig(epochs=3, batch_size=32, lr=1e-2, checkpoint_dir=str(folder))
    return replace(base, **changes)


def _killed(folder: Path) -> None:
    """A run killed after its first epoch's checkpoint."""
    with pytest.raises(KeyboardInterrupt):
        _run(_config(folder), stop_after=0)
    assert (folder / "last" / "state.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    for folder in (tmp_path / "typo", tmp_path):  # missing, and a folder with no checkpoint
        with pytest.raises(CheckpointError, match=r"resume: no checkpoint in .*last/state\.json"):
            _run(_config(folder, resume=True))
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed 0 (this run: 1)"),
        ({"lr": 3e-3}, "lr 0.01 (this run: 0.003)"),
        ({"epochs": 4}, "epochs 3 (this run: 4)"),
        ({"batch_size": 16}, "batch_size 32 (this run: 16)"),
        ({"schedule": "constant"}, "schedule 'cosine' (this run: 'constant')"),
        ({"warmup_steps": 2}, "warmup_steps 0 (this run: 2)"),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused(tmp_path, change, named):
    _killed(tmp_path)
    with pytest.raises(CheckpointError, match="written by another run") as info:
        _run(_config(tmp_path, resume=True, **change))
    assert named in str(info.value)


def test_a_checkpoint_of_another_model_or_other_data_is_refused(tmp_path):
    _killed(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor 'features.0.weight' of shape \(16, 12\)"):
        _run(_config(tmp_path, resume=True), hidden=17)
    with pytest.raises(CheckpointError, match=r"120 examples \(this run: 100\)"):
        _run(_config(tmp_path, resume=True), data=_data(100))
    with pytest.raises(CheckpointError, match=r"other data .* other contents"):
        _run(_config(tmp_path, resume=True), data=_data(120, seed=1))
    full = _run(_config(tmp_path / "whole"))
    assert state_equal(_run(_config(tmp_path, resume=True)), full)  # the same run resumes


def test_a_checkpoint_whose_steps_ran_in_another_precision_is_refused(tmp_path):
    """A run with mixed precision on a GPU resumed on a CPU (or the other way) computes other
    steps: the precision is part of what a resume must share."""
    import json

    _killed(tmp_path)
    state = tmp_path / "last" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["precision"] == "float32"
    meta["precision"] = "bfloat16"
    state.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"steps in bfloat16 \(this run: float32\)"):
        _run(_config(tmp_path, resume=True))


def test_a_kill_between_the_two_renames_is_restored_on_resume(tmp_path):
    """The checkpoint moved aside (``.last.old-PID``) and the new one not yet in place."""
    full = _run(_config(tmp_path / "whole"))
    _killed(tmp_path)
    pid = _dead_pid()
    os.replace(tmp_path / "last", tmp_path / f".last.old-{pid}")
    stale = tmp_path / f".last.tmp-{pid}-abcdefgh"
    stale.mkdir()
    with pytest.warns(UserWarning, match=f"restored it from '.last.old-{pid}'"):
        resumed = _run(_config(tmp_path, resume=True))
    assert state_equal(resumed, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "whole"]


def test_a_kill_after_the_second_rename_leaves_an_old_copy_the_next_write_removes(tmp_path):
    _killed(tmp_path)
    old = tmp_path / f".last.old-{_dead_pid()}"
    (old).mkdir()
    (old / "state.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # superseded: removed without a word
        _run(_config(tmp_path, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def _model() -> netmeld.CombinedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = mlp(4, 2, hidden=3)
    arch = netmeld.Architecture("netmeld.zoo:mlp", {"in_features": 4, "hidden": 3})
    member = netmeld.Member(
        module, ["a", "b"], name="m", preprocessing={"input_shape": (4,)}, architecture=arch
    )
    return netmeld.CombinedModel([member])


def _probe(path: Path) -> torch.Tensor:
    return netmeld.load(path)(torch.ones(1, 4))


def test_a_save_killed_between_the_renames_is_restored_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "model"
    first = _model()
    first.save(path)
    second = _model()
    with torch.no_grad():
        second.members[0].module.features[0].weight.add_(1.0)
    real = os.replace
    calls = []

    def crash_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) > 1:  # a kill: nothing after the first rename happens
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", crash_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        second.save(path, overwrite=True)
    monkeypatch.setattr(_atomic.os, "replace", real)
    assert not path.exists() and (tmp_path / f".model.old-{os.getpid()}").is_dir()
    with (
        pytest.warns(UserWarning, match="restored it from"),
        pytest.raises(ModelFileError, match=r"was restored .* not replaced"),
    ):
        second.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    torch.testing.assert_close(_probe(path), first(torch.ones(1, 4)))  # the old copy, whole
    second.save(path, overwrite=True)  # now seen: replaced
    torch.testing.assert_close(_probe(path), second(torch.ones(1, 4)))


def test_a_failed_second_rename_moves_the_old_folder_back(tmp_path, monkeypatch):
    path = tmp_path / "model"
    _model().save(path)
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"):
        _model().save(path, overwrite=True)
    monkeypatch.setattr(_atomic.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    torch.testing.assert_close(_probe(path), _model()(torch.ones(1, 4)))


def test_stale_temp_folders_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = [
        f".other.tmp-{dead}-abcdefgh",  # dead: removed
        f".other.tmp-{alive}-abcdefgh",  # a running process: kept
        f".other.tmp-{os.getpid()}-abcdefgh",  # this process (maybe writing now): kept
        f".other.old-{alive}",  # a running swap's old copy: kept
        "notes.tmp-1-abcdefgh",  # not a netmeld temporary folder: kept
    ]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".file.tmp-{dead}-abcdefgh").write_text("a file, not a folder: kept")
    tmp = _atomic.make_temp(tmp_path / "model")
    assert tmp.name.startswith(f".model.tmp-{os.getpid()}-")
    _atomic.swap_in(tmp, tmp_path / "model")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model", *names[1:], f".file.tmp-{dead}-abcdefgh"}
    (tmp_path / "model" / "x").write_text("")
    _run(TrainConfig(epochs=1, batch_size=64, checkpoint_dir=str(tmp_path)))  # the engine too
    assert not any(name.startswith(".last.tmp") for name in os.listdir(tmp_path))


def test_the_cli_refuses_a_mistyped_checkpoint_dir(tmp_path, capsys):
    from netmeld.cli import main

    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 4, generator=g)
    rows = ["a,b,c,d,label"] + [
        ",".join(f"{v:.3f}" for v in r) + f",{'xy'[i % 2]}" for i, r in enumerate(x.tolist())
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    recipe = {
        "build": "parallel",
        "branches": [
            {
                "architecture": "netmeld.zoo:mlp",
                "architecture_kwargs": {"in_features": 4, "hidden": 3},
            }
        ],
        "labels": ["x", "y"],
        "input_shape": [4],
        "data": "train.csv",
        "schedule": {"epochs": 1, "batch_size": 4},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = ["train", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]
    code = main([*args, "--checkpoint-dir", str(tmp_path / "ckpt-typo"), "--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "no checkpoint in" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
