"""Permutation symmetries of a network and what they are for: aligning two networks trained
from different initialisations (Git Re-Basin weight or activation matching), interpolating
between them, and repairing the merged network's statistics (REPAIR; a BatchNorm reset).

The symmetries themselves, :func:`permutation_spec` and :class:`PermutationSpec`, are read from
the network's torch.fx graph in :mod:`netmeld.methods._permutation_spec` (re-exported here).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from netmeld.errors import IncompatibleMembersError
from netmeld.methods._permutation_spec import PermutationSpec, permutation_spec
from netmeld.ops.matching import (
    CorrelationStats,
    activation_matching,
    permute_tensor,
    weight_matching,
)
from netmeld.runtime import on_device, resolve_device

__all__ = [
    "Alignment",
    "PermutationSpec",
    "align",
    "channel_stats",
    "correlation_stats",
    "interpolate",
    "permutation_spec",
    "permute_state",
    "permuted",
    "repair",
    "rescale_outputs",
    "reset_batchnorm",
]

# -- applying permutations ------------------------------------------------------------------


def permute_state(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state dict with every described axis permuted (other tensors unchanged)."""
    out = {}
    for key, value in state.items():
        desc = spec.axes.get(key)
        out[key] = value if desc is None else permute_tensor(value, desc, perms)
    return out


def permuted(
    module: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A copy of ``module`` with its units permuted: the same function, other weights."""
    out = copy.deepcopy(module)
    out.load_state_dict(permute_state(module.state_dict(), spec, perms))
    return out


def _check_same(a: nn.Module, b: nn.Module, what_a: str, what_b: str) -> None:
    from netmeld.io.checkpoint_merge import check_same_tensors, shapes_of

    check_same_tensors([(what_a, shapes_of(a.state_dict())), (what_b, shapes_of(b.state_dict()))])


# -- activations ----------------------------------------------------------------------------


def _batches(
    data: torch.Tensor, batch_size: int, dev: torch.device | None = None
) -> Iterable[torch.Tensor]:
    """``data`` in batches, each moved to ``dev`` (``None``: left where it is)."""
    for i in range(0, len(data), batch_size):
        x = data[i : i + batch_size]
        yield x if dev is None else x.to(dev)


Device = str | torch.device | None


def _device(model: nn.Module, device: Device) -> torch.device:
    """Where ``model`` runs over data: ``device`` resolved (see
    :func:`netmeld.runtime.resolve_device`), or ``None``: where its tensors already are."""
    if device is not None:
        return resolve_device(device)
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return torch.device("cpu") if first is None else first.device


def _stats_to(stats: CorrelationStats, dev: torch.device) -> CorrelationStats:
    """``stats`` with its running sums moved to ``dev`` (in place; their dtype kept)."""
    for name, value in vars(stats).items():
        if isinstance(value, torch.Tensor):
            setattr(stats, name, value.to(dev))
    return stats


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


def _as_units(t: torch.Tensor, dim: int, repeat: int) -> torch.Tensor:
    """Activations as ``(samples, units)``: every other dimension (and the repeat) is a sample."""
    t = t.movedim(dim, -1)
    t = t.reshape(-1, t.shape[-1])
    if repeat > 1:
        t = t.reshape(t.shape[0], -1, repeat).transpose(1, 2).reshape(-1, t.shape[1] // repeat)
    return t


@torch.no_grad()
def correlation_stats(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    data: torch.Tensor,
    *,
    groups: Iterable[str] | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> dict[str, CorrelationStats]:
    """Per group (all, or ``groups``), running correlation statistics between A's and B's
    activations on ``data``.

    Both models run on ``device`` (``None``: where model A is; ``auto``: the GPU when there
    is one), batch by batch, and are put back afterwards; the sums (float64) are
    accumulated there and returned on the CPU."""
    dev = _device(model_a, device)
    wanted = list(spec.sizes) if groups is None else list(groups)
    names = {n for g in wanted for n, _, _ in spec.nodes[g]}
    stats = {g: _stats_to(CorrelationStats(spec.sizes[g], spec.sizes[g]), dev) for g in wanted}
    with on_device(model_a, dev), on_device(model_b, dev):
        gms = [fx.symbolic_trace(m) for m in (model_a, model_b)]
        for gm in gms:
            gm.eval()
        for x in _batches(data, batch_size, dev):
            recs = [_Recorder(gm, names) for gm in gms]
            for rec in recs:
                rec.run(x)
            for g in wanted:
                for name, dim, repeat in spec.nodes[g]:
                    stats[g].update(
                        _as_units(recs[0].seen[name], dim, repeat),
                        _as_units(recs[1].seen[name], dim, repeat),
                    )
    return {g: _stats_to(s, torch.device("cpu")) for g, s in stats.items()}


# -- alignment ------------------------------------------------------------------------------

AlignMethod = Literal["weight", "activation"]


@dataclass
class Alignment:
    """B permuted onto A: the permuted module, the permutations and the spec they act on."""

    model: nn.Module
    perms: dict[str, torch.Tensor]
    spec: PermutationSpec


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: AlignMethod = "weight",
    example: torch.Tensor | None = None,
    data: torch.Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Alignment:
    """Permute ``model_b``'s hidden units to match ``model_a``'s (same architecture, different
    initialisations). ``method='weight'`` needs no data (Git Re-Basin weight matching);
    ``'activation'`` matches activations on ``data``. ``example`` is one input batch for tracing
    (default: the first rows of ``data``)."""
    _check_same(model_a, model_b, "model A", "model B")
    if example is None:
        if data is None:
            raise IncompatibleMembersError(
                "align needs an example input (example=) or data to trace the models with"
            )
        example = data[:2]
    spec = permutation_spec(model_a, example, what="model A")
    if method == "weight":
        perms = weight_matching(
            spec.axes,
            spec.sizes,
            model_a.state_dict(),
            model_b.state_dict(),
            max_iter=max_iter,
            seed=seed,
        )
    elif method == "activation":
        if data is None:
            raise IncompatibleMembersError("activation matching needs data (inputs, no labels)")
        stats = correlation_stats(model_a, model_b, spec, data)
        perms = {g: activation_matching(s.correlation()) for g, s in stats.items()}
    else:
        raise IncompatibleMembersError(
            f"unknown alignment method {method!r}; valid: 'weight', 'activation'"
        )
    return Alignment(permuted(model_b, spec, perms), perms, spec)


def interpolate(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    """``(1 - t) * a + t * b`` for every floating tensor (integer buffers from ``a``)."""
    _check_same(a, b, "model A", "model B")
    out = copy.deepcopy(a)
    sb = b.state_dict()
    state = {
        k: (1 - t) * v + t * sb[k] if v.is_floating_point() else v
        for k, v in a.state_dict().items()
    }
    out.load_state_dict(state)
    return out


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module, data: torch.Tensor, *, batch_size: int = 256, device: Device = None
) -> int:
    """Recompute every BatchNorm's running statistics on ``data`` (a cumulative average, the
    REPAIR paper's "reset"); returns how many layers were reset. The model runs on ``device``
    (``None``: where it is), batch by batch, and is put back with its new statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    dev = _device(model, device)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with on_device(model, dev):
        for x in _batches(data, batch_size, dev):
            model(x)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
    return len(norms)


@torch.no_grad()
def channel_stats(
    model: nn.Module, layer: str, data: torch.Tensor, batch_size: int, device: Device = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (float64, on the CPU) of each output channel of ``layer``
    on ``data``, the model run on ``device`` (``None``: where it is) batch by batch."""
    dev = _device(model, device)
    mod = model.get_submodule(layer)
    sums: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        u = _as_units(out, out.dim() - 1 if isinstance(mod, nn.Linear) else 1, 1).double()
        sums.append(torch.stack([u.sum(0), (u * u).sum(0), torch.full_like(u[0], len(u))]))

    handle = mod.register_forward_hook(hook)
    try:
        model.eval()
        with on_device(model, dev):
            for x in _batches(data, batch_size, dev):
                model(x)
    finally:
        handle.remove()
    total = torch.stack(sums).sum(0).cpu()
    mean = total[0] / total[2]
    std = (total[1] / total[2] - mean * mean).clamp_min(0).sqrt()
    return mean, std


@torch.no_grad()
def rescale_outputs(
    models: list[nn.Module],
    layer: str,
    t_mean: torch.Tensor,
    t_std: torch.Tensor,
    data: torch.Tensor,
    *,
    batch_size: int = 256,
    device: Device = None,
) -> None:
    """Scale and shift the output channels of ``layer`` (a Linear or Conv) so that, measured
    on ``data`` in ``models[0]`` (run on ``device``; ``None``: where it is), they have mean
    ``t_mean`` and standard deviation ``t_std``; the same change is made in every model (they
    share that layer's weights). A layer without a bias gets its spread corrected, not its
    mean."""
    mean, std = channel_stats(models[0], layer, data, batch_size, device)
    scale = (t_std / std.clamp_min(1e-8)).float()
    shift = (t_mean - mean * scale.double()).float()
    for model in models:
        mod = model.get_submodule(layer)
        weight, bias = mod.weight, getattr(mod, "bias", None)
        assert isinstance(weight, torch.Tensor)
        weight.mul_(scale.to(weight.device).reshape((-1,) + (1,) * (weight.dim() - 1)))
        if isinstance(bias, torch.Tensor):
            bias.mul_(scale.to(bias.device)).add_(shift.to(bias.device))


@torch.no_grad()
def repair(
    merged: nn.Module,
    endpoints: list[nn.Module],
    spec: PermutationSpec,
    data: torch.Tensor,
    *,
    weights: list[float] | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> nn.Module:
    """REPAIR (Jordan et al. 2023): rescale each hidden layer's output channels so their mean
    and standard deviation on ``data`` are the weighted average of the (aligned) endpoints',
    undoing the variance collapse of interpolated networks; then reset BatchNorm statistics.
    Layers are corrected in execution order, each measured after the previous fix.

    A network with BatchNorm only gets the reset (the paper's RESET: the norms rescale their
    inputs anyway); a layer without a bias gets its scale corrected but not its mean. The
    networks run over ``data`` on ``device`` (``None``: each where it is), batch by batch;
    the merged one stays where it was."""
    weights = weights or [1.0 / len(endpoints)] * len(endpoints)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    for layer, group in spec.layers:
        if group is None or has_bn:
            continue
        targets = [channel_stats(m, layer, data, batch_size, device) for m in endpoints]
        t_mean = torch.stack([w * s[0] for w, s in zip(weights, targets, strict=True)]).sum(0)
        t_std = torch.stack([w * s[1] for w, s in zip(weights, targets, strict=True)]).sum(0)
        rescale_outputs([merged], layer, t_mean, t_std, data, batch_size=batch_size, device=device)
    reset_batchnorm(merged, data, batch_size=batch_size, device=device)
    return merged
