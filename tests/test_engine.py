"""The shared training engine: deterministic, resumable after a kill, and the same under
2-process DDP (gloo, CPU) as in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from netmeld.engine import TrainConfig, state_equal, tensor_batches, train
from netmeld.errors import DataError
from netmeld.zoo import mlp

from ._ddp import two_process_run


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _model(dropout: bool = True):
    torch.manual_seed(0)
    model = mlp(12, 3, hidden=16)
    if dropout:
        model.features.insert(1, torch.nn.Dropout(0.2))  # random state inside the step
    return model


def _step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _run(config, on_epoch_end=None, dropout=True):
    x, y = _data()
    model = _model(dropout)
    train(
        model,
        _step,
        len(x),
        tensor_batches(x, y),
        config,
        device="cpu",
        progress=False,
        on_epoch_end=on_epoch_end,
    )
    return model.state_dict()


def test_same_seed_same_weights_and_training_helps():
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    a, b = _run(config), _run(config)
    assert state_equal(a, b)
    assert not state_equal(a, _model().state_dict())


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    full = _run(TrainConfig(epochs=3, batch_size=32, lr=1e-2, checkpoint_dir=str(tmp_path / "a")))

    def killed(epoch, _loss):
        if epoch == 0:
            raise KeyboardInterrupt

    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        _run(config, on_epoch_end=killed)
    assert (tmp_path / "b" / "last" / "state.safetensors").is_file()
    resumed = _run(TrainConfig(**{**config.__dict__, "resume": True}))
    assert state_equal(resumed, full)


def _ddp_run() -> dict[str, torch.Tensor]:
    return _run(TrainConfig(epochs=2, batch_size=30, lr=1e-2), dropout=False)


def test_two_process_ddp_matches_one_process(tmp_path):
    ddp = two_process_run(_ddp_run, tmp_path)
    # each process draws its own dropout masks, so the comparison is without dropout
    single = _run(TrainConfig(epochs=2, batch_size=30, lr=1e-2), dropout=False)
    start = _model(dropout=False).state_dict()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
    assert not state_equal(single, start)


def test_no_examples_is_an_error():
    with pytest.raises(DataError, match="at least one example"):
        train(
            _model(),
            _step,
            0,
            tensor_batches(torch.zeros(1, 12), torch.zeros(1).long()),
            TrainConfig(epochs=1),
        )
