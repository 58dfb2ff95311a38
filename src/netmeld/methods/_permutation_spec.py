"""The permutation symmetries of a network, read from its torch.fx graph.

:func:`permutation_spec` traces the module once with an example input and assigns every
hidden channel axis to a *group* of units that must be permuted together: a Linear or Conv
output starts a group; BatchNorm, LayerNorm over channels, activations, pooling and dropout
carry it on; a residual addition joins the groups it adds; flattening a ``(C, H, W)`` map
repeats each channel ``H*W`` times. The groups that reach the output are fixed (the logits'
order is the labels'). Anything else with a channel axis (a concatenation, an unknown layer)
is refused with an error naming the node, not silently mis-permuted.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netmeld.errors import MemberError
from netmeld.ops.matching import AxisDesc

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


def _leaves(args: Any) -> Iterable[fx.Node]:
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _leaves(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _leaves(a)


def _in_out_shapes(node: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    src = _shape(node.args[0])
    out = _shape(node)
    assert src is not None and out is not None
    return src, out


class _SpecBuilder:
    """One pass over a traced graph, in execution order: each node's channel space, the
    state-dict tensors' axes, the weighted layers and the activations they read."""

    def __init__(self, gm: fx.GraphModule, what: str) -> None:
        self.gm = gm
        self.what = what
        self.modules = dict(gm.named_modules())
        self.groups = _Groups()
        self.space: dict[fx.Node, _Space | None] = {}
        self.axes_raw: dict[str, list[tuple[int, int] | None]] = {}  # per axis (group, repeat)
        self.consumers: list[tuple[fx.Node, _Space]] = []  # inputs of weighted layers
        self.layers: list[tuple[str, int | None]] = []

    def fail(self, node: fx.Node, why: str) -> MemberError:
        return MemberError(f"{self.what}: node {node.name!r} ({node.format_node()}): {why}")

    def input_space(self, node: fx.Node) -> _Space | None:
        arg = node.args[0] if node.args else None
        return self.space.get(arg) if isinstance(arg, fx.Node) else None

    def set_axes(self, name: str, n_axes: int, entries: dict[int, _Space | None]) -> None:
        row: list[tuple[int, int] | None] = [None] * n_axes
        for axis, s in entries.items():
            if s is not None:
                row[axis] = (s.group, s.repeat)
        self.axes_raw[name] = row

    def run(self) -> PermutationSpec:
        for node in self.gm.graph.nodes:
            self.space[node] = self.visit(node)
        return self.finish()

    def visit(self, node: fx.Node) -> _Space | None:
        """The channel space of ``node``'s output (``None``: no hidden channels)."""
        shape = _shape(node)
        if node.op in ("placeholder", "output", "get_attr") or shape is None:
            return None  # inputs, constants, and sizes, shapes and other non-tensors
        if node.op == "call_module":
            return self.call_module(node, self.modules[str(node.target)], shape)
        return self.call_operation(node)

    # -- layers ---------------------------------------------------------------------------

    def call_module(self, node: fx.Node, mod: nn.Module, shape: tuple[int, ...]) -> _Space | None:
        s_in = self.input_space(node)
        prefix = f"{node.target}."
        if isinstance(mod, _WEIGHTED):
            return self.weighted(node, mod, shape, s_in)
        if isinstance(mod, _NORMS) or (
            isinstance(mod, nn.GroupNorm) and mod.num_groups in (1, mod.num_channels)
        ):
            if s_in is not None and s_in.dim != 1:
                raise self.fail(node, "normalisation over a dimension other than channels")
            for pname, t in list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)
            ):
                self.set_axes(prefix + pname, t.dim(), {0: s_in} if t.dim() == 1 else {})
            return s_in
        if isinstance(mod, nn.LayerNorm):
            if s_in is not None and (len(mod.normalized_shape) != 1 or s_in.dim != len(shape) - 1):
                raise self.fail(node, "LayerNorm must normalise over the channel dimension only")
            for pname, t in mod.named_parameters(recurse=False):
                self.set_axes(prefix + pname, t.dim(), {0: s_in})
            return s_in
        if isinstance(mod, nn.Flatten):
            return self.reshaped(node, s_in)
        if isinstance(mod, _CHANNELWISE_MODULES):
            return s_in
        raise self.fail(
            node,
            f"{type(mod).__name__} is not a layer netmeld knows how to permute "
            "(supported: Linear, Conv, BatchNorm, LayerNorm, GroupNorm, activations, "
            "pooling, dropout, Flatten)",
        )

    def weighted(
        self, node: fx.Node, mod: nn.Module, shape: tuple[int, ...], s_in: _Space | None
    ) -> _Space:
        """A Linear or Conv layer: its output channels start a new group."""
        conv = not isinstance(mod, nn.Linear)
        if conv and getattr(mod, "groups", 1) != 1:
            raise self.fail(node, f"grouped convolution (groups={mod.groups}) is not supported")
        in_dim = 1 if conv else len(_shape(node.args[0]) or ()) - 1
        if s_in is not None and s_in.dim != in_dim:
            raise self.fail(node, f"its input's channels are on dim {s_in.dim}, not {in_dim}")
        if s_in is not None:
            arg0 = node.args[0]
            assert isinstance(arg0, fx.Node)
            self.consumers.append((arg0, s_in))
        weight = mod.weight
        assert isinstance(weight, torch.Tensor)
        g = self.groups.new(weight.shape[0])
        out = _Space(g, 1 if conv else len(shape) - 1)
        self.set_axes(f"{node.target}.weight", weight.dim(), {0: out, 1: s_in})
        if getattr(mod, "bias", None) is not None:
            self.set_axes(f"{node.target}.bias", 1, {0: out})
        self.layers.append((str(node.target), g))
        return out

    # -- functions and methods ------------------------------------------------------------

    def call_operation(self, node: fx.Node) -> _Space | None:
        s_in = self.input_space(node)
        target = node.target
        function, method = node.op == "call_function", node.op == "call_method"
        if (function and target in _CHANNELWISE_FUNCTIONS) or (
            method and target in _CHANNELWISE_METHODS
        ):
            return s_in
        if (function and target in _RESHAPES_FN) or (method and target in _RESHAPES_METHODS):
            return self.reshaped(node, s_in)
        if (method and target in _REDUCE_METHODS) or (
            function and target in (torch.mean, torch.sum)
        ):
            return self.reduced(node, s_in)
        if function and target in _BINARY:
            return self.binary(node)
        if any(self.space.get(a) is not None for a in _leaves((node.args, node.kwargs))):
            raise self.fail(node, "netmeld does not know how this operation moves channels")
        return None

    def binary(self, node: fx.Node) -> _Space | None:
        """An elementwise operation of two tensors (a residual addition): joins their groups."""
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
        known = [sp for a in tensor_args if (sp := self.space.get(a)) is not None]
        if (
            len(tensor_args) == 2
            and len(known) == 1
            and _shape(tensor_args[0]) == _shape(tensor_args[1])
        ):
            raise self.fail(node, "combines a hidden tensor with an input or a constant tensor")
        for other in known[1:]:
            if (other.dim, other.repeat) != (known[0].dim, known[0].repeat):
                raise self.fail(node, "adds tensors whose channels are laid out differently")
            self.groups.union(known[0].group, other.group, node.name)
        return known[0] if known else None

    def reshaped(self, node: fx.Node, s_in: _Space | None) -> _Space | None:
        if s_in is None:
            return None
        src, out = _in_out_shapes(node)
        if src == out:
            return s_in
        if s_in.dim == 1 and len(out) == 2 and out[0] == src[0]:
            rest = 1
            for d in src[2:]:
                rest *= d
            return _Space(s_in.group, 1, s_in.repeat * rest)
        raise self.fail(node, f"reshapes {src} to {out} in a way that moves the channels")

    def reduced(self, node: fx.Node, s_in: _Space | None) -> _Space | None:
        if s_in is None:
            return None
        src, _ = _in_out_shapes(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise self.fail(node, "reduces over every dimension, channels included")
        dims_t = (dims,) if isinstance(dims, int) else tuple(dims)  # type: ignore[arg-type]
        dims_t = tuple(d % len(src) for d in dims_t)
        if s_in.dim in dims_t:
            raise self.fail(node, "reduces over the channel dimension")
        keep = node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2])
        new_dim = s_in.dim if keep else s_in.dim - sum(1 for d in dims_t if d < s_in.dim)
        return _Space(s_in.group, new_dim, s_in.repeat)

    # -- the spec -------------------------------------------------------------------------

    def finish(self) -> PermutationSpec:
        """Groups named ``P<root>``; those that reach the output (the logits' order) fixed."""
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        fixed = set()
        for arg in _leaves(output.args):
            s = self.space.get(arg)
            if s is not None:
                fixed.add(self.groups.find(s.group))

        def name_of(g: int) -> str | None:
            r = self.groups.find(g)
            return None if r in fixed else f"P{r}"

        axes: dict[str, tuple[AxisDesc, ...]] = {}
        sizes: dict[str, int] = {}
        for key, row in self.axes_raw.items():
            out_row: list[AxisDesc] = []
            for entry in row:
                gname = None if entry is None else name_of(entry[0])
                if entry is None or gname is None:
                    out_row.append(None)
                else:
                    sizes[gname] = self.groups.size[self.groups.find(entry[0])]
                    out_row.append((gname, entry[1]))
            axes[key] = tuple(out_row)
        nodes: dict[str, list[tuple[str, int, int]]] = {g: [] for g in sizes}
        seen: set[str] = set()
        for n, s in self.consumers:
            gname = name_of(s.group)
            if gname is not None and n.name not in seen:
                seen.add(n.name)
                nodes[gname].append((n.name, s.dim, s.repeat))
        return PermutationSpec(
            sizes=sizes,
            axes=axes,
            nodes=nodes,
            layers=[(name, name_of(g) if g is not None else None) for name, g in self.layers],
        )


def permutation_spec(
    module: nn.Module, example: torch.Tensor, *, what: str = "model"
) -> PermutationSpec:
    """The permutation groups of ``module`` (traced with the input ``example``, a batch)."""
    return _SpecBuilder(_trace(module, example, what), what).run()
