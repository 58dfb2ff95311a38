"""What a member's BatchNorm says about its head input, without data: the mean and variance of
the features its head reads (``bn-standardize`` scales each member's logits by the spread they
predict)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from netmeld.errors import MethodError
from netmeld.members.graph import trace_member
from netmeld.members.member import Member

_ACTIVATIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: F.relu,
    nn.ReLU6: F.relu6,
    nn.SiLU: F.silu,
    nn.GELU: F.gelu,
    nn.Hardswish: F.hardswish,
    nn.LeakyReLU: F.leaky_relu,
    nn.ELU: F.elu,
}
_FUNCTIONAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}
_SHAPE_ONLY = {
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "contiguous",
    "dropout",
    "mean",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool1d",
    "avg_pool2d",
}
_SHAPE_ONLY_MODULES = (
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AvgPool2d,
)


def _gaussian_moments(
    fn: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    points: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``fn(X)`` for ``X ~ N(mean, std^2)`` by Gauss-Hermite quadrature."""
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    z = torch.tensor(nodes, dtype=torch.float64)
    w = torch.tensor(weights / math.sqrt(2 * math.pi), dtype=torch.float64)
    x = mean.double()[:, None] + std.double()[:, None] * z[None, :]
    y = fn(x)
    m1 = (y * w).sum(1)
    m2 = (y * y * w).sum(1)
    return m1.float(), (m2 - m1 * m1).clamp_min(1e-12).float()


def bn_feature_moments(member: Member) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a member's head input, from the BatchNorm that feeds it.

    Walks back from the head through flatten/pool/dropout and one elementwise activation to a
    BatchNorm layer, whose affine output is taken as ``N(beta, gamma^2)`` per channel. Spatial
    pooling is taken to keep the variance (a factor shared by every member sharing the features,
    so it cancels when members are compared).
    """
    t = trace_member(member)
    name = t.member.name
    if not t.traced or t.graph_module is None:  # timm's and others' untraceable forwards
        found = _moments_by_hooks(member)
        if found is None:
            raise MethodError(
                f"bn-standardize: member {name!r} cannot be traced with torch.fx, and running "
                "it did not show a BatchNorm whose output (through one activation and "
                "pooling) is its head input; use a zero-data method such as 'weight-norm'"
            )
        return found
    gm = t.graph_module
    node = t.body[-1]
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    for _ in range(32):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                return _bn_moments(mod, activation)
            if type(mod) in _ACTIVATIONS and activation is None:
                activation = _ACTIVATIONS[type(mod)]
            elif not isinstance(mod, _SHAPE_ONLY_MODULES):
                break
        elif node.op in ("call_function", "call_method"):
            target = node.target if isinstance(node.target, str) else node.target.__name__
            if target in _FUNCTIONAL_ACTIVATIONS and activation is None:
                activation = _FUNCTIONAL_ACTIVATIONS[target]
            elif target not in _SHAPE_ONLY:
                break
        else:
            break
        nxt = node.args[0] if node.args else None
        if not isinstance(nxt, fx.Node):
            break
        node = nxt
    found = _moments_by_hooks(member)
    if found is not None:
        return found
    raise MethodError(
        f"bn-standardize: member {name!r}: its head input does not come from a BatchNorm "
        f"through pooling and one activation (stopped at {node.format_node()}); use a "
        "zero-data method such as 'weight-norm' instead"
    )


def _bn_moments(
    bn: nn.BatchNorm1d | nn.BatchNorm2d,
    activation: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(bn.num_features)
    gamma = torch.ones(n) if bn.weight is None else bn.weight.detach()
    beta = torch.zeros(n) if bn.bias is None else bn.bias.detach()
    std = gamma.abs().clamp_min(1e-6)
    if activation is None:
        return beta.clone(), std.pow(2)
    return _gaussian_moments(activation, beta, std)


@torch.no_grad()
def _moments_by_hooks(member: Member) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where the graph cannot be read: run the member on a probe batch with hooks, take the
    last BatchNorm that ran before the head, and find the one activation (or none) that,
    followed by spatial averaging, turns its output into the head's input. ``None`` when no
    such BatchNorm exists."""
    from netmeld.members.graph import find_head

    module = member.module
    head = module.get_submodule(find_head(member))
    calls: list[tuple[nn.BatchNorm1d | nn.BatchNorm2d, torch.Tensor]] = []
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, _i, out, m=m: calls.append((m, out)))
        for m in module.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    ]
    handles.append(
        head.register_forward_pre_hook(
            lambda _m, args: seen.setdefault("input", args[0]) if not seen else None
        )
    )
    was_training = module.training
    module.eval()
    try:
        probe = torch.randn(
            4, *member.preprocessing.input_shape, generator=torch.Generator().manual_seed(0)
        )
        module(probe)
    except Exception:  # a module that cannot run on a random probe
        return None
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if not calls or "input" not in seen:
        return None
    bn, out = calls[-1]
    target = seen["input"].reshape(len(probe), -1)
    candidates: list[Callable[[torch.Tensor], torch.Tensor] | None] = [
        None,
        *_ACTIVATIONS.values(),
    ]
    for activation in candidates:
        y = out if activation is None else activation(out)
        pooled = y.flatten(2).mean(2) if y.dim() > 2 else y
        if pooled.shape == target.shape and torch.allclose(pooled, target, rtol=1e-3, atol=1e-4):
            return _bn_moments(bn, activation)
    return None
