"""Permutation groups read from the fx graph: permuting a network by them keeps its function;
alignment brings two differently initialised networks closer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from netmeld.errors import IncompatibleMembersError, MemberError
from netmeld.methods.permutation import align, interpolate, permutation_spec, permuted
from netmeld.zoo import mlp, resnet20, small_cnn, vgg


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


NETS = {
    "mlp": (lambda: mlp(12, 5, hidden=16, depth=3), (4, 12)),
    "vgg": (lambda: vgg(7, widths=(8, 12, 16), image_size=16, hidden=20), (3, 3, 16, 16)),
    "resnet20": (lambda: resnet20(6, width=1), (2, 3, 16, 16)),
    "small_cnn": (lambda: small_cnn(4, in_channels=3, width=8), (2, 3, 12, 12)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_permuting_by_the_spec_keeps_the_function(name):
    torch.manual_seed(0)
    build, shape = NETS[name]
    model = _randomise_bn(build(), 1)
    x = torch.randn(*shape)
    spec = permutation_spec(model, x)
    assert spec.sizes, "found no permutable group"
    perms = spec.random_perms(seed=3)
    other = permuted(model, spec, perms)
    assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)
    # the weights did move: every group's permutation was applied somewhere
    changed = [
        k for k, v in other.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert len(changed) >= len(spec.sizes)


def test_resnet_groups_follow_the_residual_stream():
    model = resnet20(6)
    spec = permutation_spec(model, torch.randn(2, 3, 16, 16))
    # one group per residual stage + one per block's inner conv: 3 + 9
    assert len(spec.sizes) == 12
    stem = spec.axes["conv1.weight"][0]
    assert spec.axes["layer1.2.bn2.weight"][0] == stem  # same stream as the stem
    assert spec.axes["layer2.0.shortcut.0.weight"][1] == stem
    assert spec.axes["fc.weight"][0] is None  # the logits stay in label order


def test_flatten_repeats_each_channel_over_the_spatial_positions():
    model = vgg(7, widths=(8, 12, 16), image_size=16, hidden=20)
    spec = permutation_spec(model, torch.randn(2, 3, 16, 16))
    group, repeat = spec.axes["classifier.1.weight"][1]
    assert repeat == 4 and spec.sizes[group] == 16  # 16 channels of 2x2


def test_unsupported_operations_are_named():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(torch.cat([self.a(x), self.b(x)], 1))

    with pytest.raises(MemberError, match=r"node 'cat'.*does not know how this operation"):
        permutation_spec(Cat(), torch.randn(2, 4))


def test_weight_matching_recovers_a_hidden_permutation():
    torch.manual_seed(0)
    model = _randomise_bn(resnet20(6), 2)
    x = torch.randn(2, 3, 16, 16)
    spec = permutation_spec(model, x)
    scrambled = permuted(model, spec, spec.random_perms(seed=5))
    aligned = align(model, scrambled, method="weight", example=x).model
    for key, value in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key


def test_activation_matching_recovers_a_hidden_permutation():
    torch.manual_seed(0)
    model = mlp(10, 3, hidden=24, depth=2).eval()
    data = torch.randn(300, 10)
    spec = permutation_spec(model, data[:2])
    scrambled = permuted(model, spec, spec.random_perms(seed=1))
    aligned = align(model, scrambled, method="activation", data=data).model
    for key, value in model.state_dict().items():
        assert_close(aligned.state_dict()[key], value)


def test_mismatched_architectures_name_the_tensor_and_both_shapes():
    with pytest.raises(
        IncompatibleMembersError,
        match=r"'features.0.weight' has shape \(16, 12\)"
        r" in model A and \(32, 12\) in model B",
    ):
        align(mlp(12, 5, hidden=16), mlp(12, 5, hidden=32), example=torch.randn(2, 12))
    with pytest.raises(IncompatibleMembersError, match=r"'features.0.weight'"):
        interpolate(mlp(12, 5, hidden=16), mlp(12, 5, hidden=32), 0.5)
