"""The training loop that netmeld's training methods share, and the small fits beside it.

:func:`small_fit` is the one loop for the methods' small fits: a few hundred full-batch steps
of Adam (or one L-BFGS run) on a loss over cached features, with the parameters made
trainable for the fit only. :func:`train` is the one loop for epochs over data.

:func:`train` runs ``loss = step(model, batch)`` over epochs of seeded shuffled indices, on CPU
or GPU, in one process or in several under ``torch.distributed`` (DDP; launch with
``torchrun``), with mixed precision on GPU, a progress bar, and a checkpoint after every epoch
that ``resume=True`` continues from with nothing lost.

Determinism: an epoch's order of examples comes from ``(seed, epoch)``, and the random state
of the step (dropout, augmentation) is re-seeded from ``(seed, epoch, rank)`` at each epoch's
start; the learning rate is a function of the step number. A resumed run therefore repeats
exactly what the interrupted one would have done. With ``W`` processes, each global batch is
split in ``W`` near-equal shares and each share's loss is weighted by its size, so the
averaged gradient is the one-process gradient of the same global batch.

Checkpoints are a folder ``last/`` (``state.safetensors`` + ``state.json``: the model, the
optimizer's tensors and the epoch; no pickle), replaced atomically at the end of each epoch.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from netmeld._atomic import swap_in
from netmeld._progress import track
from netmeld.errors import DataError, ModelFileError

StepFn = Callable[[nn.Module, Any], torch.Tensor]
BatchFn = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains. ``batch_size`` is the global batch (split across processes)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool = True  # mixed precision, on GPU only
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise DataError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )


def resolve_config(
    config: TrainConfig | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    defaults: TrainConfig | None = None,
) -> TrainConfig:
    """``config`` with ``seed`` (the caller's seed wins), or ``defaults`` (a trainer's default
    schedule) with the keywords."""
    if config is None:
        base = defaults or TrainConfig()
        return replace(base, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    return config if config.seed == seed else replace(config, seed=seed)


@dataclass
class TrainResult:
    """What a run did: epochs run in this call, the epoch it started at, and mean losses."""

    start_epoch: int
    epochs_run: int
    losses: list[float] = field(default_factory=list)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate at ``step`` of ``total`` (linear warm-up, then cosine or constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, total - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# -- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
) -> Path:
    """Write ``folder/last`` atomically: model and optimizer tensors, the finished epoch."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {
        "epoch": epoch,
        "config": asdict(config),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
    }
    tmp = Path(tempfile.mkdtemp(prefix=".last.", suffix=".tmp", dir=folder))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        swap_in(tmp, folder / "last")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "last"


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore ``folder/last`` into ``model`` and ``optimizer``; return the finished epoch."""
    from safetensors.torch import load_file

    path = Path(folder) / "last"
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(model.state_dict()) - set(model_state)
    if missing:
        raise ModelFileError(
            f"checkpoint {str(path)!r} lacks tensor {sorted(missing)[0]!r} of the model"
        )
    model.load_state_dict(model_state)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optimizer_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["epoch"])


# -- the loop -------------------------------------------------------------------------------


def train(
    model: nn.Module,
    step: StepFn,
    n_examples: int,
    batch: BatchFn,
    config: TrainConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    description: str = "training",
) -> TrainResult:
    """Train ``model`` in place: ``step(model, batch(indices))`` returns the mean loss of a
    batch; ``batch`` builds the batch of example ``indices`` (a LongTensor) on ``device``.

    Under ``torch.distributed`` (initialised by the caller, e.g. via ``torchrun``) the model is
    wrapped in DDP and each process takes its share of every global batch; only rank 0 writes
    checkpoints and shows progress. ``on_epoch_end(epoch, mean_loss)`` runs after the epoch's
    checkpoint (raising there stops the run: what was saved stays)."""
    if n_examples < 1:
        raise DataError("training needs at least one example")
    rank, world = _dist()
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model.to(dev)
    optimizer = _optimizer(model, config)
    start = 0
    if config.resume:
        if config.checkpoint_dir is None:
            raise DataError("resume needs a checkpoint_dir")
        if (Path(config.checkpoint_dir) / "last" / "state.json").is_file():
            start = load_checkpoint(config.checkpoint_dir, model, optimizer) + 1
    runner: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    use_amp = config.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    steps_per_epoch = math.ceil(n_examples / config.batch_size)
    total = steps_per_epoch * config.epochs
    result = TrainResult(start_epoch=start, epochs_run=0)
    for epoch in range(start, config.epochs):
        order = torch.randperm(
            n_examples, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        )
        torch.manual_seed(config.seed * 1_000_003 + epoch * 7919 + rank)
        runner.train()
        losses = []
        for i in track(
            range(steps_per_epoch),
            f"{description} epoch {epoch + 1}/{config.epochs}",
            enabled=progress if rank == 0 else False,
        ):
            global_idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            share = torch.tensor_split(global_idx, world)[rank]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, total, config)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                loss = step(runner, batch(share))
            weighted = loss * (len(share) * world / len(global_idx))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(weighted).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        mean = sum(losses) / len(losses)
        result.losses.append(mean)
        result.epochs_run += 1
        if config.checkpoint_dir is not None and rank == 0:
            save_checkpoint(config.checkpoint_dir, model, optimizer, epoch, config)
        if world > 1:
            torch.distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean)
    model.eval()
    return result


Params = Sequence[torch.Tensor] | Sequence[dict[str, Any]]


def small_fit(
    parameters: Params,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    *,
    optimizer: Literal["adam", "adamw", "lbfgs"] = "adam",
    lr: float | None = None,
    weight_decay: float = 0.0,
    one_cycle: bool = False,
    before_step: Callable[[], object] | None = None,
    after_step: Callable[[], object] | None = None,
) -> None:
    """Minimise ``loss_fn()`` over ``parameters`` (tensors, or Adam parameter groups).

    Adam/AdamW: ``steps`` steps of ``loss_fn`` → backward → ``before_step`` (e.g. mask a
    gradient) → step → ``after_step`` (e.g. a projection, under ``no_grad``); ``one_cycle``
    follows a one-cycle learning-rate schedule peaking at ``lr``. L-BFGS: one run of at most
    ``steps`` iterations with a strong-Wolfe line search. ``lr`` defaults to 1e-2 for Adam and to
    0.5 for L-BFGS.
    The parameters are trainable during the fit; afterwards each has the ``requires_grad`` it
    had before, whatever happens.
    """
    tensors = [t for p in parameters for t in (p["params"] if isinstance(p, dict) else [p])]
    flags = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        if optimizer == "lbfgs":
            lbfgs = torch.optim.LBFGS(
                tensors, lr=lr or 0.5, max_iter=steps, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                lbfgs.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            lbfgs.step(closure)
            return
        kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        lr = 1e-2 if lr is None else lr
        opt = kind(parameters, lr=lr, weight_decay=weight_decay)
        schedule = (
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
            if one_cycle
            else None
        )
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
            if schedule is not None:
                schedule.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
    finally:
        for t, flag in zip(tensors, flags, strict=True):
            t.requires_grad_(flag)


def tensor_batches(*tensors: torch.Tensor, device: str | torch.device | None = None) -> BatchFn:
    """A ``batch`` function for :func:`train` that indexes in-memory tensors."""
    if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
        raise DataError("tensor_batches needs tensors of one length")

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[idx].to(device) if device is not None else t[idx] for t in tensors)

    return batch


def state_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
