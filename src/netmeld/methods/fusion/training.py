from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netmeld.data import open_data
from netmeld.engine import TrainConfig, resolve_config
from netmeld.engine import train as run_epochs
from netmeld.errors import LabelError, MemberError
from netmeld.members.member import Member
from netmeld.methods.fusion.parts import FUSION_KINDS, TASK_SEPARATOR, FusedNet, MultiTaskNet
from netmeld.model.combined import CombinedModel

# -- training ---------------------------------------------------------------------------------


def task_slices(model: CombinedModel) -> dict[str, slice]:
    """Where each task's logits sit in a multi-task model's output."""
    tasks = model.method.get("params", {}).get("tasks")
    if model.method.get("name") != "multitask" or not tasks:
        raise MemberError(f"not a multi-task model (method {model.method.get('name')!r})")
    slices, start = {}, 0
    for task, labels in tasks.items():
        slices[task] = slice(start, start + len(labels))
        start += len(labels)
    return slices


def task_targets(model: CombinedModel, labels: Sequence[str]) -> torch.Tensor:
    """``(N, tasks)`` class indices for ``"task/label"`` labels; -1 where a task is unlabeled."""
    tasks = model.method["params"]["tasks"]
    names = list(tasks)
    index = {t: {label: i for i, label in enumerate(v)} for t, v in tasks.items()}
    out = torch.full((len(labels), len(names)), -1, dtype=torch.long)
    for row, label in enumerate(labels):
        task, sep, name = str(label).partition(TASK_SEPARATOR)
        if not sep or task not in index or name not in index[task]:
            raise LabelError(
                f"label {label!r}: expected 'task/label' with a task in {names} and one of its "
                "labels"
            )
        out[row, names.index(task)] = index[task][name]
    return out


def task_accuracy(model: CombinedModel, data: Any) -> dict[str, float]:
    """Accuracy per task of a multi-task model, each over the examples labeled for it."""
    stream = open_data(data, model.input_shape, require_labels=True, what="evaluation data")
    model.eval()
    parts, labels = [], []
    with torch.no_grad():
        for batch in stream.batches(512, description="evaluating tasks"):
            parts.append(model(batch.inputs))
            labels.extend(batch.labels or [])
    logits = torch.cat(parts)
    targets = task_targets(model, labels)
    result = {}
    for k, (task, sl) in enumerate(task_slices(model).items()):
        mask = targets[:, k] >= 0
        if mask.any():
            pred = logits[mask][:, sl].argmax(1)
            result[task] = float((pred == targets[mask, k]).float().mean())
    return result


class _TaskLoss(nn.Module):
    """The network and the learned loss weights, trained together (checkpointed together)."""

    fixed: torch.Tensor
    initial: torch.Tensor
    net: MultiTaskNet

    def __init__(self, net: MultiTaskNet, slices: Sequence[slice], params: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.slices = list(slices)
        self.weighting = params["weighting"]
        n = len(self.slices)
        fixed = [float(w) for w in params["loss_weights"].values()]
        self.register_buffer("fixed", torch.tensor(fixed))
        self.alpha = float(params.get("alpha", 1.5))
        if self.weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(n))
        if self.weighting == "gradnorm":
            self.task_weights = nn.Parameter(torch.ones(n))
            self.register_buffer("initial", torch.full((n,), float("nan")))
            shared = [p for p in net.trunk.parameters() if p.requires_grad and p.dim() >= 2]
            if not shared:
                raise MemberError("gradnorm needs a trainable trunk layer with weights")
            self._shared = [shared[-1]]  # a list: not registered twice as a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def effective_weights(self) -> list[float]:
        if self.weighting == "uncertainty":
            return torch.exp(-self.log_vars.detach()).tolist()
        if self.weighting == "gradnorm":
            return self.task_weights.detach().tolist()
        return self.fixed.tolist()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses, present = [], []
        for k, sl in enumerate(self.slices):
            mask = targets[:, k] >= 0
            if mask.any():
                losses.append(F.cross_entropy(logits[mask][:, sl], targets[mask, k]))
                present.append(k)
            else:
                losses.append(logits.sum() * 0.0)
        task = torch.stack(losses)
        on = torch.zeros(len(self.slices), dtype=torch.bool, device=logits.device)
        on[present] = True
        if self.weighting == "fixed":
            return (self.fixed * task * on).sum()
        if self.weighting == "uncertainty":
            return ((torch.exp(-self.log_vars) * task + 0.5 * self.log_vars) * on).sum()
        return self._gradnorm(task, on)

    def _gradnorm(self, task: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        n = len(self.slices)
        with torch.no_grad():  # keep the weights positive and summing to the number of tasks
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(n / self.task_weights.sum())
            if torch.isnan(self.initial).any() and bool(on.all()):
                self.initial.copy_(task.detach())
        w = self.task_weights
        total = (w.detach() * task * on).sum()
        if torch.isnan(self.initial).any() or not bool(on.all()):
            return total + 0.0 * w.sum()
        norms = torch.stack(
            [
                torch.autograd.grad(task[k], self._shared[0], retain_graph=True)[0].norm()
                for k in range(n)
            ]
        )
        g = w * norms
        ratio = task.detach() / self.initial
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        return total + (g - target).abs().sum()


# How a fused model trains unless told otherwise: ``netmeld.train`` and ``netmeld train``
# recipes both read these.
SCHEDULE = TrainConfig(epochs=10, batch_size=64, lr=1e-3, weight_decay=1e-4)


def train(
    model: CombinedModel,
    data: Any,
    *,
    epochs: int = SCHEDULE.epochs,
    batch_size: int = SCHEDULE.batch_size,
    lr: float = SCHEDULE.lr,
    config: TrainConfig | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> CombinedModel:
    """Train a fused model (from :func:`parallel`, :func:`hierarchical` or :func:`multitask`)
    on labeled ``data`` through the shared engine; returns the trained model, the one passed in
    is left as it was. Multi-task labels are ``"task/label"``: an example labeled for one task
    counts for that task's loss only (under DDP each process averages a task's loss over its
    own share of the batch, so a run matches one process only where the tasks are spread
    evenly)."""
    kind = model.method.get("name")
    if kind not in FUSION_KINDS or len(model.members) != 1:
        raise MemberError(
            f"train trains the models of {', '.join(f'{k}()' for k in FUSION_KINDS)}; this "
            f"one's method is {kind!r}"
        )
    member = model.members[0]
    net = copy.deepcopy(member.module)
    assert isinstance(net, FusedNet)
    net.refreeze()
    stream = open_data(data, model.input_shape, require_labels=True, what="training data")
    labels = stream.all_labels(progress)
    cfg = resolve_config(
        config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, defaults=SCHEDULE
    )
    params = dict(model.method.get("params", {}))
    trained: nn.Module
    if kind == "multitask":
        targets = task_targets(model, labels)
        assert isinstance(net, MultiTaskNet)
        wrapper = _TaskLoss(net, list(task_slices(model).values()), params)
        trained = wrapper

        def step(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            inner = m.module if hasattr(m, "module") else m
            assert isinstance(inner, _TaskLoss)
            return inner.loss(m(batch[0]), batch[1])

    else:
        index = {label: i for i, label in enumerate(model.labels)}
        missing = sorted({label for label in labels if label not in index})
        if missing:
            raise LabelError(
                f"training data has labels the model does not know: {missing[:5]}; its labels "
                f"are {list(model.labels)[:10]}"
            )
        targets = torch.tensor([index[label] for label in labels])
        trained = net

        def step(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return F.cross_entropy(m(batch[0]), batch[1])

    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    result = run_epochs(
        trained,
        step,
        len(stream),
        lambda idx: (stream.gather(idx), targets[idx]),  # read when drawn: not all in memory
        cfg,
        device=device,
        progress=progress,
        description=f"training {kind}",
    )
    net.cpu().eval()
    for n, p in net.named_parameters():
        if n in frozen and not torch.equal(frozen[n], p.detach()):
            raise RuntimeError(f"frozen parameter {n!r} changed during training")  # a netmeld bug
    out = CombinedModel(
        [
            Member(
                net,
                member.labels,
                name=member.name,
                preprocessing=member.preprocessing,
                architecture=member.architecture,
                head=model.head_names[member.name],
            )
        ],
        input_shape=model.input_shape,
    )
    params["epochs"] = cfg.epochs
    params["final_loss"] = result.losses[-1] if result.losses else None
    if kind == "multitask":
        params["learned_weights"] = dict(
            zip(params["tasks"], wrapper.effective_weights(), strict=True)
        )
    out.method = {"name": kind, "params": params}
    return out
