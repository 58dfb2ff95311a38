"""Permutation symmetries of a network, read from its torch.fx graph, and what they are for:
aligning two networks trained from different initialisations (Git Re-Basin weight or
activation matching), interpolating between them, and repairing the merged network's
statistics (REPAIR; a BatchNorm reset).

:func:`permutation_spec` traces the module once with an example input and assigns every
hidden channel axis to a *group* of units that must be permuted together: a Linear or Conv
output starts a group; BatchNorm, LayerNorm over channels, activations, pooling and dropout
carry it on; a residual addition joins the groups it adds; flattening a ``(C, H, W)`` map
repeats each channel ``H*W`` times. The groups that reach the output are fixed (the logits'
order is the labels'). Anything else with a channel axis (a concatenation, an unknown layer)
is refused with an error naming the node, not silently mis-permuted.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netmeld.errors import IncompatibleMembersError, MemberError
from netmeld.ops.matching import (
    AxisDesc,
    CorrelationStats,
    activation_matching,
    permute_tensor,
    weight_matching,
)

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.leaky_relu,
    F.elu,
    F.hardswish,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.nn.functional.hardtanh,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
_RESHAPES_FN: set[Any] = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPES_METHODS = {"view", "reshape", "flatten", "squeeze"}
_BINARY: set[Any] = {
    operator.add,
    operator.iadd,
    torch.add,
    operator.sub,
    operator.mul,
    torch.mul,
    operator.truediv,
}
_REDUCE_METHODS = {"mean", "sum", "amax"}


@dataclass(frozen=True)
class _Space:
    group: int
    dim: int  # the channel dimension of the node's output
    repeat: int = 1


class _Groups:
    """Union-find over group ids, with each group's size."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise MemberError(
                f"node {where!r} joins channel groups of sizes {self.size[ra]} and {self.size[rb]}"
            )
        self.parent[rb] = ra


@dataclass
class PermutationSpec:
    """Which axis of which tensor each group of hidden units lives on.

    ``axes[name]`` has one entry per axis of the state-dict tensor ``name``: ``None`` or
    ``(group, repeat)``. ``sizes[group]`` is the number of units. ``nodes[group]`` are the fx
    nodes whose outputs feed a weighted layer in that group's space, with the channel
    dimension and repeat: the activations matched by :func:`activation_matching`.
    ``layers`` lists the weighted layers in execution order with the group of their output
    (``None`` for the output layer).
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[AxisDesc, ...]]
    nodes: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    layers: list[tuple[str, str | None]] = field(default_factory=list)

    def random_perms(self, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {name: torch.randperm(n, generator=g) for name, n in self.sizes.items()}


def _trace(module: nn.Module, example: torch.Tensor, what: str) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types on untraceable code
        raise MemberError(
            f"{what}: torch.fx cannot trace {type(module).__name__} ({exc}); permutation "
            "alignment needs a traceable module"
        ) from exc
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was_training)
    return gm


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(meta.shape)


def permutation_spec(
    module: nn.Module, example: torch.Tensor, *, what: str = "model"
) -> PermutationSpec:
    """The permutation groups of ``module`` (traced with the input ``example``, a batch)."""
    gm = _trace(module, example, what)
    modules = dict(gm.named_modules())
    groups = _Groups()
    space: dict[fx.Node, _Space | None] = {}
    axes_raw: dict[str, list[tuple[int, int] | None]] = {}  # name -> per axis (group, repeat)
    consumers: list[tuple[fx.Node, _Space]] = []  # inputs of weighted layers
    layers: list[tuple[str, int | None]] = []

    def fail(node: fx.Node, why: str) -> MemberError:
        return MemberError(f"{what}: node {node.name!r} ({node.format_node()}): {why}")

    def input_space(node: fx.Node) -> _Space | None:
        arg = node.args[0] if node.args else None
        return space.get(arg) if isinstance(arg, fx.Node) else None

    def set_axes(name: str, n_axes: int, entries: dict[int, _Space | None]) -> None:
        row: list[tuple[int, int] | None] = [None] * n_axes
        for axis, s in entries.items():
            if s is not None:
                row[axis] = (s.group, s.repeat)
        axes_raw[name] = row

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder" or node.op == "output":
            space[node] = None
            continue
        if shape is None:  # sizes, shapes and other non-tensors
            space[node] = None
            continue
        s_in = input_space(node)
        if node.op == "get_attr":
            space[node] = None
            continue
        if node.op == "call_module":
            mod = modules[str(node.target)]
            prefix = f"{node.target}."
            if isinstance(mod, _WEIGHTED):
                conv = not isinstance(mod, nn.Linear)
                if conv and getattr(mod, "groups", 1) != 1:
                    raise fail(node, f"grouped convolution (groups={mod.groups}) is not supported")
                in_dim = 1 if conv else len(_shape(node.args[0]) or ()) - 1
                if s_in is not None and s_in.dim != in_dim:
                    raise fail(node, f"its input's channels are on dim {s_in.dim}, not {in_dim}")
                if s_in is not None:
                    arg0 = node.args[0]
                    assert isinstance(arg0, fx.Node)
                    consumers.append((arg0, s_in))
                out_size = mod.weight.shape[0]
                g = groups.new(out_size)
                out = _Space(g, 1 if conv else len(shape) - 1)
                set_axes(prefix + "weight", mod.weight.dim(), {0: out, 1: s_in})
                if getattr(mod, "bias", None) is not None:
                    set_axes(prefix + "bias", 1, {0: out})
                layers.append((str(node.target), g))
                space[node] = out
            elif isinstance(mod, _NORMS) or (
                isinstance(mod, nn.GroupNorm) and mod.num_groups in (1, mod.num_channels)
            ):
                if s_in is not None and s_in.dim != 1:
                    raise fail(node, "normalisation over a dimension other than channels")
                for pname, t in list(mod.named_parameters(recurse=False)) + list(
                    mod.named_buffers(recurse=False)
                ):
                    set_axes(prefix + pname, t.dim(), {0: s_in} if t.dim() == 1 else {})
                space[node] = s_in
            elif isinstance(mod, nn.LayerNorm):
                if s_in is not None and (
                    len(mod.normalized_shape) != 1 or s_in.dim != len(shape) - 1
                ):
                    raise fail(node, "LayerNorm must normalise over the channel dimension only")
                for pname, t in mod.named_parameters(recurse=False):
                    set_axes(prefix + pname, t.dim(), {0: s_in})
                space[node] = s_in
            elif isinstance(mod, nn.Flatten):
                space[node] = _reshaped(node, s_in, fail)
            elif isinstance(mod, _CHANNELWISE_MODULES):
                space[node] = s_in
            else:
                raise fail(
                    node,
                    f"{type(mod).__name__} is not a layer netmeld knows how to permute "
                    "(supported: Linear, Conv, BatchNorm, LayerNorm, GroupNorm, activations, "
                    "pooling, dropout, Flatten)",
                )
            continue
        target = node.target
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
        if (node.op == "call_function" and target in _CHANNELWISE_FUNCTIONS) or (
            node.op == "call_method" and target in _CHANNELWISE_METHODS
        ):
            space[node] = s_in
        elif (node.op == "call_function" and target in _RESHAPES_FN) or (
            node.op == "call_method" and target in _RESHAPES_METHODS
        ):
            space[node] = _reshaped(node, s_in, fail)
        elif (node.op == "call_method" and target in _REDUCE_METHODS) or (
            node.op == "call_function" and target in (torch.mean, torch.sum)
        ):
            space[node] = _reduced(node, s_in, fail)
        elif node.op == "call_function" and target in _BINARY:
            spaces = [space.get(a) for a in tensor_args]
            known = [sp for sp in spaces if sp is not None]
            if (
                len(tensor_args) == 2
                and len(known) == 1
                and _shape(tensor_args[0]) == _shape(tensor_args[1])
            ):
                raise fail(node, "combines a hidden tensor with an input or a constant tensor")
            for other in known[1:]:
                if (other.dim, other.repeat) != (known[0].dim, known[0].repeat):
                    raise fail(node, "adds tensors whose channels are laid out differently")
                groups.union(known[0].group, other.group, node.name)
            space[node] = known[0] if known else None
        else:
            if any(space.get(a) is not None for a in _leaves((node.args, node.kwargs))):
                raise fail(node, "netmeld does not know how this operation moves channels")
            space[node] = None

    # the groups that reach the output are the logits' order: fixed
    output = next(n for n in gm.graph.nodes if n.op == "output")
    fixed = set()
    for arg in _leaves(output.args):
        s = space.get(arg)
        if s is not None:
            fixed.add(groups.find(s.group))

    def name_of(g: int) -> str | None:
        r = groups.find(g)
        return None if r in fixed else f"P{r}"

    axes: dict[str, tuple[AxisDesc, ...]] = {}
    sizes: dict[str, int] = {}
    for key, row in axes_raw.items():
        out_row: list[AxisDesc] = []
        for entry in row:
            if entry is None or name_of(entry[0]) is None:
                out_row.append(None)
            else:
                gname = name_of(entry[0])
                assert gname is not None
                sizes[gname] = groups.size[groups.find(entry[0])]
                out_row.append((gname, entry[1]))
        axes[key] = tuple(out_row)
    nodes: dict[str, list[tuple[str, int, int]]] = {g: [] for g in sizes}
    seen: set[str] = set()
    for n, s in consumers:
        gname = name_of(s.group)
        if gname is not None and n.name not in seen:
            seen.add(n.name)
            nodes[gname].append((n.name, s.dim, s.repeat))
    return PermutationSpec(
        sizes=sizes,
        axes=axes,
        nodes=nodes,
        layers=[(name, name_of(g) if g is not None else None) for name, g in layers],
    )


def _leaves(args: Any) -> Iterable[fx.Node]:
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _leaves(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _leaves(a)


def _reshaped(
    node: fx.Node, s_in: _Space | None, fail: Callable[[fx.Node, str], MemberError]
) -> _Space | None:
    if s_in is None:
        return None
    src = _shape(node.args[0])
    out = _shape(node)
    assert src is not None and out is not None
    if src == out:
        return s_in
    if s_in.dim == 1 and len(out) == 2 and out[0] == src[0]:
        rest = 1
        for d in src[2:]:
            rest *= d
        return _Space(s_in.group, 1, s_in.repeat * rest)
    raise fail(node, f"reshapes {src} to {out} in a way that moves the channels")


def _reduced(
    node: fx.Node, s_in: _Space | None, fail: Callable[[fx.Node, str], MemberError]
) -> _Space | None:
    if s_in is None:
        return None
    src = _shape(node.args[0])
    out = _shape(node)
    assert src is not None and out is not None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        raise fail(node, "reduces over every dimension, channels included")
    dims_t = (dims,) if isinstance(dims, int) else tuple(dims)  # type: ignore[arg-type]
    dims_t = tuple(d % len(src) for d in dims_t)
    if s_in.dim in dims_t:
        raise fail(node, "reduces over the channel dimension")
    keep = node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2])
    new_dim = s_in.dim if keep else s_in.dim - sum(1 for d in dims_t if d < s_in.dim)
    return _Space(s_in.group, new_dim, s_in.repeat)


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


def _batches(data: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, len(data), batch_size):
        yield data[i : i + batch_size]


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
) -> dict[str, CorrelationStats]:
    """Per group (all, or ``groups``), running correlation statistics between A's and B's
    activations on ``data``."""
    wanted = list(spec.sizes) if groups is None else list(groups)
    gms = [fx.symbolic_trace(m) for m in (model_a, model_b)]
    for gm in gms:
        gm.eval()
    names = {n for g in wanted for n, _, _ in spec.nodes[g]}
    stats = {g: CorrelationStats(spec.sizes[g], spec.sizes[g]) for g in wanted}
    for x in _batches(data, batch_size):
        recs = [_Recorder(gm, names) for gm in gms]
        for rec in recs:
            rec.run(x)
        for g in wanted:
            for name, dim, repeat in spec.nodes[g]:
                stats[g].update(
                    _as_units(recs[0].seen[name], dim, repeat),
                    _as_units(recs[1].seen[name], dim, repeat),
                )
    return stats


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
def reset_batchnorm(model: nn.Module, data: torch.Tensor, *, batch_size: int = 256) -> int:
    """Recompute every BatchNorm's running statistics on ``data`` (a cumulative average, the
    REPAIR paper's "reset"); returns how many layers were reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in _batches(data, batch_size):
        model(x)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
    return len(norms)


@torch.no_grad()
def channel_stats(
    model: nn.Module, layer: str, data: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each output channel of ``layer`` on ``data``."""
    mod = model.get_submodule(layer)
    sums: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        u = _as_units(out, out.dim() - 1 if isinstance(mod, nn.Linear) else 1, 1).double()
        sums.append(torch.stack([u.sum(0), (u * u).sum(0), torch.full_like(u[0], len(u))]))

    handle = mod.register_forward_hook(hook)
    try:
        model.eval()
        for x in _batches(data, batch_size):
            model(x)
    finally:
        handle.remove()
    total = torch.stack(sums).sum(0)
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
) -> None:
    """Scale and shift the output channels of ``layer`` (a Linear or Conv) so that, measured
    on ``data`` in ``models[0]``, they have mean ``t_mean`` and standard deviation ``t_std``;
    the same change is made in every model (they share that layer's weights). A layer without
    a bias gets its spread corrected, not its mean."""
    mean, std = channel_stats(models[0], layer, data, batch_size)
    scale = (t_std / std.clamp_min(1e-8)).float()
    for model in models:
        mod = model.get_submodule(layer)
        weight, bias = mod.weight, getattr(mod, "bias", None)
        assert isinstance(weight, torch.Tensor)
        weight.mul_(scale.reshape((-1,) + (1,) * (weight.dim() - 1)))
        if isinstance(bias, torch.Tensor):
            bias.mul_(scale).add_((t_mean - mean * scale.double()).float())


@torch.no_grad()
def repair(
    merged: nn.Module,
    endpoints: list[nn.Module],
    spec: PermutationSpec,
    data: torch.Tensor,
    *,
    weights: list[float] | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """REPAIR (Jordan et al. 2023): rescale each hidden layer's output channels so their mean
    and standard deviation on ``data`` are the weighted average of the (aligned) endpoints',
    undoing the variance collapse of interpolated networks; then reset BatchNorm statistics.
    Layers are corrected in execution order, each measured after the previous fix.

    A network with BatchNorm only gets the reset (the paper's RESET: the norms rescale their
    inputs anyway); a layer without a bias gets its scale corrected but not its mean."""
    weights = weights or [1.0 / len(endpoints)] * len(endpoints)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    for layer, group in spec.layers:
        if group is None or has_bn:
            continue
        targets = [channel_stats(m, layer, data, batch_size) for m in endpoints]
        t_mean = torch.stack([w * s[0] for w, s in zip(weights, targets, strict=True)]).sum(0)
        t_std = torch.stack([w * s[1] for w, s in zip(weights, targets, strict=True)]).sum(0)
        rescale_outputs([merged], layer, t_mean, t_std, data, batch_size=batch_size)
    reset_batchnorm(merged, data, batch_size=batch_size)
    return merged
