"""Members merged in weight space into one body, with their heads kept and unioned.

:func:`merge_members` merges the bodies of members of one architecture with a kernel of
:mod:`netmeld.ops.merge` (members fine-tuned from a common base directly; members from
different initialisations after permutation alignment). Each member keeps its own head over its
own labels, the merged members share their merged layers, and the result is the usual
:class:`~netmeld.model.combined.CombinedModel`, with the heads combined by any union-head method
(``union=``). Tensors every member has bit for bit (a frozen part of a common base) are kept as
they are. ZipIt!, for members trained on disjoint tasks, is :mod:`netmeld.methods.zipit`
(:func:`zip_members` is re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netmeld._progress import track
from netmeld.errors import DataError, IncompatibleMembersError, MethodError
from netmeld.io.checkpoint_merge import merge_state_dicts
from netmeld.members.checkpoint import read_state_dict
from netmeld.members.member import Member
from netmeld.methods._bodies import body_states, check_members, prepared, rebuild, union_of
from netmeld.methods.permutation import (
    PermutationSpec,
    _device,
    correlation_stats,
    permutation_spec,
    permute_state,
    repair,
    reset_batchnorm,
)
from netmeld.methods.zipit import zip_layers, zip_members
from netmeld.model.combined import CombinedModel
from netmeld.ops.matching import activation_matching, weight_matching
from netmeld.ops.merge import Kernel, get_kernel
from netmeld.runtime import on_device, resolve_device

__all__ = [
    "body_similarity",
    "count_macs",
    "fisher_diagonal",
    "input_grams",
    "merge_members",
    "zip_layers",
    "zip_members",
]

AlignChoice = Literal["auto", "weight", "activation", "none"]


def _load_base(base: Any, like: Member) -> dict[str, torch.Tensor]:
    if isinstance(base, Member):
        return dict(base.module.state_dict())
    if isinstance(base, nn.Module):
        return dict(base.state_dict())
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, (str, Path)):
        return read_state_dict(base)
    raise MethodError(
        f"base: expected a Member, nn.Module, state dict or checkpoint path, got "
        f"{type(base).__name__} (merging member {like.name!r})"
    )


def _base_state(base: Any, like: Member, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The base model's tensors of the members' bodies."""
    full = _load_base(base, like)
    missing = [k for k in keys if k not in full]
    if missing:
        raise IncompatibleMembersError(
            f"tensor {missing[0]!r} of the members' bodies is not in the base model"
        )
    return {k: full[k] for k in keys}


def body_similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of two bodies' weights (BatchNorm statistics left out): near 1 for
    models fine-tuned from one base, near 0 for independent initialisations."""
    keys = [
        k
        for k, v in a.items()
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))
    ]
    va = torch.cat([a[k].double().flatten() for k in keys])
    vb = torch.cat([b[k].double().flatten() for k in keys])
    return float((va @ vb) / (va.norm() * vb.norm()).clamp_min(1e-12))


# -- data statistics for Fisher and RegMean ------------------------------------------------


def fisher_diagonal(
    member: Member,
    inputs: torch.Tensor,
    *,
    keys: Sequence[str],
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``member``'s parameters ``keys`` on preprocessed
    ``inputs``: the mean squared per-example gradient of ``log p(y|x)`` with ``y`` drawn from
    the model's own prediction (no labels needed).

    The gradients run on ``device`` (``None``: where the member is; ``auto``: the GPU when
    there is one), batch by batch; the labels are drawn on the CPU (the same draws on any
    device) and the result is on the CPU."""
    from torch.func import functional_call, grad, vmap

    module = member.module
    dev = _device(module, device)
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(seed)
    try:
        with on_device(module, dev):
            params = {k: v.detach() for k, v in module.named_parameters()}
            buffers = {k: v.detach() for k, v in module.named_buffers()}
            wanted = [k for k in keys if k in params]
            fisher = {k: torch.zeros_like(params[k]) for k in wanted}

            def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out = functional_call(module, (p, buffers), (x.unsqueeze(0),))
                return F.cross_entropy(out, y.unsqueeze(0))

            per_example = vmap(grad(loss), in_dims=(None, 0, 0))
            for start in range(0, len(inputs), batch_size):
                x = inputs[start : start + batch_size].to(dev)
                with torch.no_grad():
                    probs = module(x).softmax(1)
                y = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(dev)
                grads = per_example(params, x, y)
                for k in wanted:
                    fisher[k] += (grads[k] ** 2).sum(0)
    finally:
        module.train(was_training)
    return {k: (v / len(inputs)).cpu() for k, v in fisher.items()}


def _add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


@torch.no_grad()
def input_grams(
    member: Member,
    inputs: torch.Tensor,
    *,
    keys: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``X^T X`` of the inputs of every Linear and (ungrouped) Conv2d layer whose weight is in
    ``keys``: what RegMean needs. A convolution's inputs are its unfolded patches.

    The member runs on ``device`` (``None``: where it is; ``auto``: the GPU when there is
    one), batch by batch; the matrices are summed there in float64 and returned on the CPU."""
    module = member.module
    dev = _device(module, device)
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, sub in module.named_modules():
        key = f"{name}.weight"
        if key not in keys:
            continue
        if isinstance(sub, nn.Linear):

            def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, key: str = key) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                _add(grams, key, x.T @ x)

        elif isinstance(sub, nn.Conv2d) and sub.groups == 1 and isinstance(sub.padding, tuple):

            def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, key: str = key) -> None:
                assert isinstance(_m, nn.Conv2d) and isinstance(_m.padding, tuple)
                patches = F.unfold(args[0], _m.kernel_size, _m.dilation, _m.padding, _m.stride)
                x = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
                _add(grams, key, x.T @ x)

        else:
            continue
        handles.append(sub.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        with on_device(module, dev):
            for start in range(0, len(inputs), batch_size):
                module(inputs[start : start + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {k: v.cpu() for k, v in grams.items()}


# -- merging members that share an architecture -------------------------------------------


def _align_to_first(
    members: Sequence[Member],
    states: list[dict[str, torch.Tensor]],
    method: Literal["weight", "activation"],
    prepared: torch.Tensor | None,
    seed: int,
    dev: torch.device,
) -> tuple[list[Member], PermutationSpec]:
    first = members[0]
    example = (
        prepared[:2] if prepared is not None else torch.zeros(2, *first.preprocessing.input_shape)
    )
    spec = permutation_spec(first.module, example, what=f"member {first.name!r}")
    body_axes = {k: v for k, v in spec.axes.items() if k in states[0]}
    out = [first]
    for m, state in zip(members[1:], states[1:], strict=True):
        if method == "weight":
            perms = weight_matching(body_axes, spec.sizes, states[0], state, seed=seed)
        else:
            if prepared is None:
                raise DataError("activation matching needs data (inputs, no labels)")
            stats = correlation_stats(first.module, m.module, spec, prepared, device=dev)
            perms = {g: activation_matching(s.correlation()) for g, s in stats.items()}
        out.append(rebuild(m, permute_state(m.module.state_dict(), spec, perms)))
    return out, spec


def _alignment(align: AlignChoice, similarity: float, base: Any) -> AlignChoice:
    """``align`` checked, with ``auto`` resolved: weight matching when the bodies look
    independently initialised (cosine similarity below 0.5) and no base is given."""
    if align == "auto":
        return "weight" if similarity < 0.5 and base is None else "none"
    if align in ("weight", "activation"):
        if base is not None:
            raise MethodError(
                "align: members fine-tuned from a common base are already aligned; "
                "pass align='none' with base="
            )
    elif align != "none":
        raise MethodError(f"align must be 'auto', 'weight', 'activation' or 'none', got {align!r}")
    return align


def _merged_tensors(
    method: str,
    kernel: Kernel,
    members: Sequence[Member],
    states: list[dict[str, torch.Tensor]],
    differing: list[str],
    *,
    base_state: dict[str, torch.Tensor] | None,
    weights: Sequence[float] | None,
    params: Mapping[str, Any] | None,
    inputs: torch.Tensor | None,
    seed: int,
    progress: bool | None,
    dev: torch.device,
) -> dict[str, torch.Tensor]:
    """The ``differing`` tensors merged with ``method``. A kernel that reads statistics of the
    data (Fisher, RegMean) merges the tensors it has them for; the others are averaged. A
    seeded kernel (DARE) draws from ``seed`` unless ``params`` gives its own. The statistics
    are computed on ``dev`` (and returned on the CPU); the kernels run on the CPU."""
    if "seed" in kernel.defaults and "seed" not in (params or {}):
        params = {**(params or {}), "seed": seed}
    if kernel.needs == "none":
        return merge_state_dicts(
            method, states, base=base_state, weights=weights, params=params, names=differing
        )
    if inputs is None:
        raise DataError(f"merge method {method!r} needs data (inputs; labels are not needed)")
    extras = [
        fisher_diagonal(m, inputs, keys=differing, seed=seed, device=dev)
        if kernel.needs == "fisher"
        else input_grams(m, inputs, keys=differing, device=dev)
        for m in track(members, f"{kernel.needs} statistics", enabled=progress)
    ]
    with_extra = [k for k in differing if all(k in e for e in extras)]
    merged = merge_state_dicts(
        method,
        states,
        weights=weights,
        params=params,
        extra={k: [e[k] for e in extras] for k in with_extra},
        names=with_extra,
    )
    rest = [k for k in differing if k not in with_extra]
    plain = merge_state_dicts("linear", states, weights=weights, names=rest)
    return merged | {k: plain[k] for k in rest}


def _restore_statistics(
    rebuilt: list[Member],
    members: Sequence[Member],
    spec: PermutationSpec | None,
    inputs: torch.Tensor,
    weights: Sequence[float] | None,
    keys: Sequence[str],
    dev: torch.device,
) -> None:
    """The merged body's statistics on ``inputs``: REPAIR (a BatchNorm reset where there is
    one) after alignment, a BatchNorm reset otherwise; the result shared by every member. The
    networks run on ``dev`` batch by batch and stay where they were."""
    if spec is not None:
        repair(
            rebuilt[0].module,
            [m.module for m in members],
            spec,
            inputs,
            weights=None if weights is None else [w / sum(weights) for w in weights],
            device=dev,
        )
    else:
        reset_batchnorm(rebuilt[0].module, inputs, device=dev)
    stats = {k: v for k, v in rebuilt[0].module.state_dict().items() if k in keys}
    for m in rebuilt[1:]:
        m.module.load_state_dict({**m.module.state_dict(), **stats})


def merge_members(
    members: Sequence[Member],
    method: str = "linear",
    *,
    base: Any = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    data: Any = None,
    align: AlignChoice = "auto",
    union: str = "concat",
    union_params: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    progress: bool | None = None,
) -> CombinedModel:
    """Merge the members' bodies with the kernel ``method`` into one body; keep each member's
    head and combine the heads with the union-head method ``union``.

    Args:
        members: members of one architecture (their heads may differ: other label sets).
        method: a kernel of :data:`netmeld.ops.merge.KERNELS` (``linear``, ``slerp``,
            ``task-arithmetic``, ``ties``, ``dare``, ``dare-ties``, ``breadcrumbs``,
            ``fisher``, ``regmean``).
        base: the common base the members were fine-tuned from (a Member, module, state dict
            or checkpoint path); needed by the task-vector kernels.
        weights, params: the kernel's per-model weights and parameters.
        data: inputs (labels optional) for ``fisher``/``regmean``, activation matching, the
            BatchNorm reset after merging, and a union method that needs data.
        align: permute members 2.. onto member 1 first: ``weight`` (no data), ``activation``
            (data), ``none``, or ``auto``: weight matching when the bodies look independently
            initialised (cosine similarity below 0.5) and no base is given.
        union, union_params: how the kept heads are combined (any registered union method).
        seed: seeds weight matching's order, DARE's drop masks (unless ``params`` gives a
            ``seed``), the labels Fisher samples and the union method's fit.
        device: where the members run over ``data`` (Fisher gradients, RegMean Gram matrices,
            activation matching, REPAIR and the BatchNorm reset, the union method's data pass),
            batch by batch: ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``,
            ``cuda`` or ``cuda:N``; a GPU asked for on a machine without one is a
            :class:`~netmeld.errors.DataError`. The kernels merge on the CPU (in float64 for
            RegMean's solve), the members are put back where they were and the merged model
            is on the CPU.
    """
    dev = resolve_device(device)
    members = list(members)
    check_members(members)
    kernel = get_kernel(method)
    states, keys = body_states(members)
    inputs = prepared(members[0], data, device=dev) if data is not None else None
    similarity = body_similarity(states[0], states[1])
    align = _alignment(align, similarity, base)
    spec = None
    if align in ("weight", "activation"):
        members, spec = _align_to_first(members, states, align, inputs, seed, dev)
        states, keys = body_states(members)
    base_state = None if base is None else _base_state(base, members[0], keys)
    shared = [k for k in keys if all(torch.equal(s[k], states[0][k]) for s in states[1:])]
    differing = [k for k in keys if k not in shared]
    merged = _merged_tensors(
        method,
        kernel,
        members,
        states,
        differing,
        base_state=base_state,
        weights=weights,
        params=params,
        inputs=inputs,
        seed=seed,
        progress=progress,
        dev=dev,
    )
    body = {k: states[0][k] if k in shared else merged[k] for k in keys}
    rebuilt = [rebuild(m, {**m.module.state_dict(), **body}) for m in members]
    if inputs is not None:
        _restore_statistics(rebuilt, members, spec, inputs, weights, keys, dev)
    model = union_of(rebuilt, union, union_params, data, seed, progress, device=dev)
    model.method["merge"] = {
        "method": method,
        "params": dict(params or {}),
        "weights": None if weights is None else list(weights),
        "aligned": align,
        "similarity": round(similarity, 4),
        "merged_tensors": len(differing),
        "shared_tensors": len(shared),
    }
    return model


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` (batch 1) through the Linear
    and Conv layers that run (a shared trunk counts once)."""
    total = 0

    def hook(mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += out.numel() // out.shape[0] * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = mod.weight[0].numel()
            total += out.numel() // out.shape[0] * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total
