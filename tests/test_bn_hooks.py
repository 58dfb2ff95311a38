"""bn-standardize reads what it needs by hooks where torch.fx cannot trace a member (timm's and
many others' forwards), and says which method to use instead when there is nothing to read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netmeld
from netmeld.members.moments import bn_feature_moments


class Net(nn.Module):
    """conv → BatchNorm → activation → pool → linear; ``branchy`` adds control flow on the
    input's values, which torch.fx cannot trace."""

    def __init__(self, classes: int, branchy: bool, act: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)
        self.branchy, self.act = branchy, act
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branchy and x.sum() > -1e9:  # data-dependent control flow
            x = x * 1.0
        z = self.bn(self.conv(x))
        z = F.relu(z) if self.act == "relu" else F.silu(z)
        return self.fc(z.mean((2, 3)))


def _member(branchy: bool, act: str = "relu", seed: int = 0) -> netmeld.Member:
    torch.manual_seed(seed)
    return netmeld.Member(
        Net(3, branchy, act).eval(),
        ["a", "b", "c"] if seed == 0 else ["d", "e", "f"],
        name=f"m{seed}",
        preprocessing={"input_shape": (1, 8, 8)},
    )


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_an_untraceable_member_gets_the_moments_a_traceable_twin_gets(act):
    traced_mean, traced_var = bn_feature_moments(_member(False, act))
    hooked_mean, hooked_var = bn_feature_moments(_member(True, act))
    torch.testing.assert_close(hooked_mean, traced_mean)
    torch.testing.assert_close(hooked_var, traced_var)
    model = netmeld.meld([_member(True, act), _member(True, act, seed=1)], "bn-standardize")
    assert model.method["name"] == "bn-standardize"


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = x * 1.0
        return self.fc(x.flatten(1))


def test_a_member_with_nothing_to_read_names_the_method_to_use():
    member = netmeld.Member(
        NoBatchNorm(), ["a", "b", "c"], name="plain", preprocessing={"input_shape": (1, 8, 8)}
    )
    with pytest.raises(netmeld.MethodError, match="use a zero-data method such as 'weight-norm'"):
        bn_feature_moments(member)
