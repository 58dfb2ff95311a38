"""Many-to-one transfer (A, B -> Z): the members as frozen feature extractors, a new head.

The members' penultimate features (their heads' inputs, found automatically) are fused by
concatenation, a sum of projections or attention (:class:`~netmeld.combiners.FeatureHead`),
and a new head is trained on the user's labeled set. Z's labels are the labels of that set:
they may include labels no member knows. ``unfreeze=n`` also trains the last ``n`` blocks of
every member's body (BatchNorm statistics stay frozen).
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netmeld.engine import small_fit
from netmeld.errors import MethodError
from netmeld.methods._registry import MethodParams, register_method
from netmeld.model.heads import FeatureHead

if TYPE_CHECKING:
    from netmeld.methods._extract import Extracted
    from netmeld.model.combined import CombinedModel


class TransferParams(MethodParams):
    fusion: Literal["concat", "sum", "attention"] = Field(
        "concat", description="how the members' features are fused"
    )
    dim: int = Field(128, ge=1, description="projection width for 'sum' and 'attention'")
    unfreeze: int = Field(
        0, ge=0, description="also train the last n blocks of each member's body (0: frozen)"
    )
    steps: int = Field(300, ge=1, description="Adam steps (full batch when frozen)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the new head")
    body_lr: float = Field(1e-4, gt=0, description="learning rate of unfrozen blocks")
    weight_decay: float = Field(
        1e-3, ge=0, description="L2 pull of the new head's weights towards their start"
    )
    init: Literal["members", "zero"] = Field(
        "members",
        description="start the concat head from the members' heads (a label's row is the mean "
        "of the rows of the members that know it; new labels start at zero), or from zero",
    )
    batch_size: int = Field(64, ge=1, description="batch size when blocks are unfrozen")


_INDEX = re.compile(r"^\d+$")


def block_key(name: str) -> str:
    """The block a parameter belongs to: its module path up to the first run of indices
    (``layer4.1.conv1.weight`` -> ``layer4.1``, ``blocks.6.0.conv.weight`` -> ``blocks.6.0``,
    ``conv1.weight`` -> ``conv1``)."""
    parts = name.split(".")[:-1] or name.split(".")
    out: list[str] = []
    seen_index = False
    for part in parts:
        if _INDEX.match(part):
            seen_index = True
            out.append(part)
        elif seen_index:
            break
        else:
            out.append(part)
    return ".".join(out)


def last_blocks(model: CombinedModel, n: int) -> list[nn.Parameter]:
    """Parameters of the last ``n`` parameterised blocks of each member's trunk and neck.

    Blocks follow :func:`block_key`; a block holding only 1-D parameters (a normalisation
    layer) joins the block before it, so a flat ``Sequential`` of conv, BatchNorm, ReLU counts
    conv + BatchNorm as one block.
    """
    chosen: dict[int, nn.Parameter] = {}
    for name in model.member_names:
        body: list[tuple[str, nn.Parameter]] = []
        for prefix, module in (
            ("trunk", model.trunks[str(model.group_of[name])]),
            ("neck", model.necks[name]),
        ):
            body.extend((f"{prefix}.{k}", p) for k, p in module.named_parameters())
        head = model.head_names[name]
        body = [(k, p) for k, p in body if not k.split(".", 1)[1].startswith(head + ".")]
        blocks: dict[str, list[nn.Parameter]] = {}
        for k, p in body:
            key = k.split(".", 1)[0] + "." + block_key(k.split(".", 1)[1])
            blocks.setdefault(key, []).append(p)
        merged: list[list[nn.Parameter]] = []
        for params_ in blocks.values():
            if merged and all(p.dim() <= 1 for p in params_):
                merged[-1].extend(params_)
            else:
                merged.append(list(params_))
        for params_ in merged[-n:]:
            for p in params_:
                chosen[id(p)] = p
    return list(chosen.values())


def own_body(model: CombinedModel) -> None:
    """Give the combined model its own copy of every trunk and neck (they share the members'
    parameters until then), so training them never changes the members."""
    for key in list(model.trunks.keys()):
        model.trunks[key] = copy.deepcopy(model.trunks[key])
    for key in list(model.necks.keys()):
        model.necks[key] = copy.deepcopy(model.necks[key])


@torch.no_grad()
def init_from_members(model: CombinedModel, head: FeatureHead, labels: list[str]) -> None:
    """Start a concat head where the members' heads are: on standardised features a member's
    logit ``w . f + b`` is ``(w * std) . z + (b + w . mean)``; a label several members know gets
    the mean of their logits, a label none knows a zero row."""
    weight = torch.zeros_like(head.head.weight)
    bias = torch.zeros_like(head.head.bias)
    start = 0
    owners = [0] * len(labels)
    row_of = {label: i for i, label in enumerate(labels)}
    for name, member, dim in zip(model.member_names, model.members, head.dims, strict=True):
        member_head = model.heads[name]
        assert isinstance(member_head, nn.Linear)
        cols = slice(start, start + dim)
        mean, std = head.mean[cols], head.std[cols]
        for j, label in enumerate(member.labels):
            if label not in row_of:
                continue
            i = row_of[label]
            w = member_head.weight[j]
            weight[i, cols] += w * std
            bias[i] += w @ mean + (member_head.bias[j] if member_head.bias is not None else 0)
            owners[i] += 1
        start += dim
    count = torch.tensor(owners, dtype=weight.dtype).clamp_min(1)
    head.head.weight.copy_(weight / count[:, None])
    head.head.bias.copy_(bias / count)


@register_method(
    "transfer",
    data="labeled",
    params=TransferParams,
    open_labels=True,
    reference="transfer learning from several frozen feature extractors with a new head "
    "(feature concatenation; attention fusion as in Ilse et al., ICML 2018)",
)
def fit_transfer(
    model: CombinedModel,
    extracted: Extracted | None,
    targets: torch.Tensor | None,
    params: TransferParams,
) -> None:
    """A new head over the members' fused features, for the labels of the data (new ones too)."""
    assert extracted is not None and targets is not None
    labels = extracted.label_space or model.union_labels
    dims = [f.shape[1] for f in extracted.features]
    head = FeatureHead(dims, labels, params.fusion, params.dim)
    feats = torch.cat(extracted.features, dim=1)
    with torch.no_grad():
        head.mean.copy_(feats.mean(0))
        head.std.copy_(feats.std(0).clamp_min(1e-6) if len(feats) > 1 else torch.ones(sum(dims)))
    model.set_combiner(head)
    if params.fusion == "concat" and params.init == "members":
        init_from_members(model, head, labels)
    else:
        with torch.no_grad():
            head.head.weight.zero_()
            head.head.bias.zero_()
    head_params = list(head.parameters())
    decay = [p for n, p in head.named_parameters() if n.endswith("weight")]
    start = [p.detach().clone() for p in decay]

    def penalty() -> torch.Tensor:
        return (
            params.weight_decay
            * torch.stack([(w - w0).pow(2).sum() for w, w0 in zip(decay, start, strict=True)]).sum()
        )

    if params.unfreeze == 0:

        def on_features() -> torch.Tensor:
            out = head.head(head.fuse(extracted.features))
            return F.cross_entropy(out, targets) + penalty()

        small_fit(
            head_params,
            on_features,
            params.steps,
            lr=params.lr,
            examples=len(targets),
            penalty=params.weight_decay,
            what="transfer",
        )
    else:
        inputs = extracted.inputs
        if inputs is None:
            raise MethodError("transfer: unfreeze > 0 needs the raw inputs")
        own_body(model)
        body = last_blocks(model, params.unfreeze)
        if not body:
            raise MethodError("transfer: the members have no parameterised blocks to unfreeze")
        model.eval()  # BatchNorm keeps its running statistics
        n = len(targets)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        batch = min(params.batch_size, n)

        def on_batches() -> torch.Tensor:
            rows = torch.randperm(n, generator=generator)[:batch]
            x = inputs[rows]
            return F.cross_entropy(head(model.run_members(x), x), targets[rows]) + penalty()

        groups = [{"params": head_params, "lr": params.lr}, {"params": body, "lr": params.body_lr}]
        small_fit(
            groups,
            on_batches,
            params.steps,
            examples=len(targets),
            penalty=params.weight_decay,
            what="transfer",
        )
        model.method["fitted"] = {"unfrozen_parameters": sum(p.numel() for p in body)}
