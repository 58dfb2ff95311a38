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
exactly what the interrupted one would have done. The caller's random state is left as it was
(:func:`netmeld.runtime.seeded`: what netmeld builds or draws under a seed never moves the
global generator).
With ``W`` processes, each global batch is split in ``W`` near-equal shares and each share's
loss is weighted by its size, so the averaged gradient is the one-process gradient of the same
global batch.

Checkpoints are a folder ``last/`` (``state.safetensors`` + ``state.json``: the model, the
optimizer's tensors and the epoch, the run's settings, its trainable parameters and a
fingerprint of its data; no pickle), replaced atomically at the end of each epoch. Resuming is
explicit: ``resume=True`` with no checkpoint is an error, and so is a checkpoint that a run
with other settings (:data:`RESUME_FIELDS`), another model or other data wrote. What a crash
during the swap left is put right first (:mod:`netmeld._atomic`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from netmeld._atomic import make_temp, recover, swap_in
from netmeld._progress import track
from netmeld.errors import CheckpointError, DataError, UnderdeterminedFitWarning
from netmeld.runtime import distributed_world, resolve_device, seed_now, seeded

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

# What a resumed run must share with the run that wrote the checkpoint (the other settings say
# where to write and how to compute, not what is computed).
RESUME_FIELDS = (
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "schedule",
    "warmup_steps",
    "grad_clip",
)


def _hash_into(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.is_floating_point():  # recomputed targets may differ in their last bits
            t = t.to(torch.bfloat16)
        t = t.contiguous()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (tuple, list)):
        digest.update(b"(")
        for item in obj:
            _hash_into(digest, item)
        digest.update(b")")
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            digest.update(str(key).encode())
            _hash_into(digest, obj[key])
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(repr(obj).encode())
    else:
        digest.update(type(obj).__name__.encode())


def data_fingerprint(n_examples: int, batch: BatchFn) -> dict[str, Any]:
    """What tells a run's data from other data cheaply: the number of examples and a hash of
    the batch of (at most) 16 examples spread over them, built under a fixed seed (so random
    augmentation draws the same each time); floating-point values count to bfloat16 precision,
    so targets recomputed with other rounding (another thread count) still match."""
    k = min(n_examples, 16)
    idx = torch.linspace(0, n_examples - 1, k).round().long().unique()
    with seeded(0):
        sample = batch(idx)
    digest = hashlib.sha256()
    _hash_into(digest, sample)
    return {"examples": n_examples, "sample_sha256": digest.hexdigest()}


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
    data: Mapping[str, Any] | None = None,
    precision: str | None = None,
) -> Path:
    """Write ``folder/last`` atomically: model and optimizer tensors, the finished epoch, the
    run's configuration, the trainable parameters, the ``data`` fingerprint and the
    ``precision`` the steps computed in (see :func:`step_precision`)."""
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
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "data": None if data is None else dict(data),
        "precision": precision,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
    }
    tmp = make_temp(folder / "last")
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        swap_in(tmp, folder / "last")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "last"


def _first(names: Sequence[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _differences(
    meta: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    model: nn.Module,
    config: TrainConfig,
    data: Mapping[str, Any] | None,
    precision: str | None = None,
) -> list[str]:
    """How the run that wrote a checkpoint differs from this one, in words."""
    problems = []
    recorded, now = meta.get("config") or {}, asdict(config)
    for key in RESUME_FIELDS:
        if key in recorded and recorded[key] != now[key]:
            problems.append(f"{key} {recorded[key]!r} (this run: {now[key]!r})")
    before_precision = meta.get("precision")
    if before_precision is not None and precision is not None and before_precision != precision:
        problems.append(f"steps in {before_precision} (this run: {precision})")
    mine = model.state_dict()
    extra = sorted(set(model_state) - set(mine))
    missing = sorted(set(mine) - set(model_state))
    if missing:
        problems.append(f"no tensor {_first(missing)} of this model")
    if extra:
        problems.append(f"tensor {_first(extra)} this model lacks")
    for k in mine:
        if k in model_state and tuple(model_state[k].shape) != tuple(mine[k].shape):
            problems.append(
                f"tensor {k!r} of shape {tuple(model_state[k].shape)} (this model: "
                f"{tuple(mine[k].shape)})"
            )
            break
    trainable = meta.get("trainable")
    now_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable is not None and list(trainable) != now_trainable:
        changed = sorted(set(trainable) ^ set(now_trainable)) or ["(their order)"]
        problems.append(f"other trainable parameters: {_first(changed)}")
    before = meta.get("data")
    if before is not None and data is not None and dict(before) != dict(data):
        if before.get("examples") != data["examples"]:
            problems.append(f"{before.get('examples')} examples (this run: {data['examples']})")
        else:
            problems.append(f"other data (as many examples, {data['examples']}, other contents)")
    return problems


def load_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig | None = None,
    data: Mapping[str, Any] | None = None,
    precision: str | None = None,
) -> int:
    """Restore ``folder/last`` into ``model`` and ``optimizer``; return the finished epoch.

    With ``config`` (and ``data``, a :func:`data_fingerprint`, and ``precision``), a checkpoint
    written by a run with other settings (:data:`RESUME_FIELDS`, the steps' precision), another
    model (tensor names and shapes, trainable parameters) or other data is refused, naming what
    differs."""
    from safetensors.torch import load_file

    path = Path(folder) / "last"
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        epoch = int(meta["epoch"])
        groups, optimizer_scalars = meta["param_groups"], dict(meta["optimizer_scalars"])
    except Exception as exc:  # unreadable, not JSON, not safetensors, keys missing
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    problems = _differences(meta, model_state, model, config or TrainConfig(), data, precision)
    if config is None:
        problems = [p for p in problems if p.startswith(("no tensor", "tensor"))]
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by another run: {'; '.join(problems)}; "
            "resume with that run's settings, model and data, or train into another "
            "checkpoint_dir"
        )
    model.load_state_dict(model_state)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in optimizer_scalars.items():
        state.setdefault(int(idx), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its optimizer state does not fit this run's ({exc})"
        ) from exc
    return epoch


def _start_epoch(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Mapping[str, Any] | None,
    precision: str | None = None,
) -> int:
    """The epoch a run starts at: after the checkpoint's with ``resume``, else 0. What an
    interrupted checkpoint write left is put right first."""
    if config.checkpoint_dir is not None:
        recover(Path(config.checkpoint_dir) / "last")
    if not config.resume:
        return 0
    if config.checkpoint_dir is None:
        raise DataError("resume needs a checkpoint_dir")
    if not (Path(config.checkpoint_dir) / "last" / "state.json").is_file():
        raise CheckpointError(
            f"resume: no checkpoint in {config.checkpoint_dir!r} (expected "
            f"{str(Path(config.checkpoint_dir) / 'last' / 'state.json')!r}); check the "
            "checkpoint folder, or start without resume"
        )
    return load_checkpoint(config.checkpoint_dir, model, optimizer, config, data, precision) + 1


# -- the loop -------------------------------------------------------------------------------


def _to(obj: Any, dev: torch.device) -> Any:
    """``obj``'s tensors (in tuples, lists and dicts too) on ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, dev) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj


def step_precision(config: TrainConfig, dev: torch.device) -> str:
    """What the training steps compute in: ``float32``, or with ``amp`` on a GPU ``bfloat16``
    (where supported) or ``float16`` (with gradient scaling)."""
    if not (config.amp and dev.type == "cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@dataclass
class _Loop:
    """One run's fixed parts: what the epochs of :func:`train` share."""

    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    step: StepFn
    n_examples: int
    batch: BatchFn
    config: TrainConfig
    dev: torch.device
    rank: int
    world: int

    def __post_init__(self) -> None:
        precision = step_precision(self.config, self.dev)
        self.use_amp = precision != "float32"
        self.amp_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "float16")

    def epoch(self, epoch: int, progress: bool | None, description: str) -> float:
        """Run ``epoch`` (its order and random state from the seed) and return its mean loss."""
        config, world, scaler = self.config, self.world, self.scaler
        steps = math.ceil(self.n_examples / config.batch_size)
        order = torch.randperm(
            self.n_examples,
            generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch),
        )
        seed_now(config.seed * 1_000_003 + epoch * 7919 + self.rank, self.dev)
        self.runner.train()
        losses = []
        for i in track(
            range(steps),
            f"{description} epoch {epoch + 1}/{config.epochs}",
            enabled=progress if self.rank == 0 else False,
        ):
            global_idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            share = torch.tensor_split(global_idx, world)[self.rank]
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + i, steps * config.epochs, config)
            with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss = self.step(self.runner, _to(self.batch(share), self.dev))
            weighted = loss * (len(share) * world / len(global_idx))
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(weighted).backward()
            if config.grad_clip is not None:
                scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)


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
    batch; ``batch`` builds the batch of example ``indices`` (a LongTensor; its tensors are
    moved to ``device``).

    Under ``torch.distributed`` (initialised by the caller, e.g. via ``torchrun``) the model is
    wrapped in DDP and each process takes its share of every global batch; only rank 0 writes
    checkpoints and shows progress. ``on_epoch_end(epoch, mean_loss)`` runs after the epoch's
    checkpoint (raising there stops the run: what was saved stays). ``resume`` continues from
    the checkpoint in ``checkpoint_dir``; none there, or one a run with other settings, another
    model or other data wrote, is an error. The caller's random state is left as it was."""
    if n_examples < 1:
        raise DataError("training needs at least one example")
    rank, world = distributed_world()
    dev = resolve_device(device)
    model.to(dev)
    optimizer = _optimizer(model, config)
    data = data_fingerprint(n_examples, batch) if config.checkpoint_dir is not None else None
    precision = step_precision(config, dev)
    start = _start_epoch(config, model, optimizer, data, precision)
    runner: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    loop = _Loop(model, runner, optimizer, step, n_examples, batch, config, dev, rank, world)
    result = TrainResult(start_epoch=start, epochs_run=0)
    with seeded(config.seed, dev):  # the epochs re-seed; the caller's state comes back after
        for epoch in range(start, config.epochs):
            mean = loop.epoch(epoch, progress, description)
            result.losses.append(mean)
            result.epochs_run += 1
            if config.checkpoint_dir is not None and rank == 0:
                save_checkpoint(
                    config.checkpoint_dir, model, optimizer, epoch, config, data, precision
                )
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
    examples: int | None = None,
    penalty: float = 0.0,
    what: str = "the fit",
    progress: bool | None = None,
) -> None:
    """Minimise ``loss_fn()`` over ``parameters`` (tensors, or Adam parameter groups).

    Adam/AdamW: ``steps`` steps of ``loss_fn`` → backward → ``before_step`` (e.g. mask a
    gradient) → step → ``after_step`` (e.g. a projection, under ``no_grad``); ``one_cycle``
    follows a one-cycle learning-rate schedule peaking at ``lr``. L-BFGS: one run of at most
    ``steps`` iterations with a strong-Wolfe line search. ``lr`` defaults to 1e-2 for Adam and to
    0.5 for L-BFGS.
    The parameters are trainable during the fit; afterwards each has the ``requires_grad`` it
    had before, whatever happens.

    ``examples`` (the number of examples the loss reads) and ``penalty`` (the strength
    of a regulariser inside ``loss_fn``, or ``weight_decay``) check that the data determine the
    answer: fewer examples than fitted numbers, with no penalty, warn
    (:class:`~netmeld.errors.UnderdeterminedFitWarning`, naming ``what``). A progress bar
    counts the Adam steps when ``progress`` (default: when stderr is a terminal).
    """
    tensors = [t for p in parameters for t in (p["params"] if isinstance(p, dict) else [p])]
    if examples is not None:
        warn_underdetermined(
            what, examples, sum(t.numel() for t in tensors), penalty + weight_decay
        )
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
        for _ in track(range(steps), f"fitting {what}", total=steps, enabled=progress):
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


def warn_underdetermined(what: str, examples: int, fitted: int, penalty: float) -> None:
    """Warn when ``fitted`` numbers are fitted from fewer ``examples`` with no penalty."""
    if examples < fitted and not penalty > 0:
        warnings.warn(
            UnderdeterminedFitWarning(
                f"{what} fits {fitted:,} numbers from {examples:,} examples with no "
                "penalty, so the data do not determine them (the fit can drift anywhere that "
                "separates the examples): give more examples or a penalty greater than 0"
            ),
            stacklevel=3,
        )


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
