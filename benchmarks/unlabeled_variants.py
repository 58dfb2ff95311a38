"""Unlabeled-data union heads compared: which way of using 1,000 unlabeled images gets closest to
the oracle (issue 15, part 3). The registered methods (``infomax``, ``semi``) run through
``netmeld.meld``; the candidates that lost are written out here, on the members' cached trunk
features, so the comparison can be rerun:

- ``em-priors``: Saerens, Latinne & Decaestecker (2002): EM re-estimates the label priors on
  the unlabeled inputs and shifts each label's logit by log(new prior / old prior); on top of
  ``weight-norm``;
- ``em-offsets``: the same EM over the members' shares only (one offset per member);
- ``distill``: the ``infomax`` union's soft answers on the unlabeled inputs distilled into one
  joint linear head over the shared trunk (L-BFGS, started from the members' heads);
- ``em-lda``: a shared-covariance Gaussian head re-estimated by EM on the unlabeled inputs,
  started from the ``infomax`` union's answers;
- ``im-head``: SHOT's information maximisation applied to the whole joint linear head (not only
  the gate): ``distill``'s head, then fitted to confident, diverse answers on the unlabeled
  inputs, kept near the ``infomax`` answers by their cross-entropy.

Same scenarios, seeds and data as ``union_heads.py``::

    python benchmarks/unlabeled_variants.py --datasets cifar10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import union_heads as uh

import netmeld
from netmeld.engine import small_fit
from netmeld.methods.meld import extract
from netmeld.methods.union import information_loss

CANDIDATES = ["weight-norm", "em-priors", "em-offsets", "infomax", "distill", "em-lda", "im-head"]


def _scaled_logits(model: Any, features: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model.heads[n](features) * model.union.scale[i]
            for i, n in enumerate(model.member_names)
        ]


def em_priors(logits: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Saerens et al.'s EM: the per-label logit shift that makes the priors self-consistent."""
    start = torch.full((logits.shape[1],), 1.0 / logits.shape[1])
    prior = start.clone()
    for _ in range(iterations):
        prior = (logits + (prior / start).log()).softmax(1).mean(0)
    return (prior / start).log()


def em_offsets(logits: list[torch.Tensor], iterations: int = 100) -> torch.Tensor:
    """EM over the members' shares: one offset per member, shares proportional to labels."""
    sizes = torch.tensor([z.shape[1] for z in logits], dtype=torch.float64)
    offsets = torch.zeros(len(logits))
    for _ in range(iterations):
        union = torch.cat([z + o for z, o in zip(logits, offsets, strict=True)], 1).softmax(1)
        mass = torch.stack([c.sum(1) for c in torch.split(union, sizes.int().tolist(), 1)], 1)
        offsets = offsets + (sizes / sizes.sum()).float().log() - mass.mean(0).log()
    return torch.cat([o.repeat(z.shape[1]) for o, z in zip(offsets, logits, strict=True)])


def distill(
    features: torch.Tensor,
    soft: torch.Tensor,
    init: tuple[torch.Tensor, ...],
    information: float = 0.0,
) -> Any:
    """A joint linear head fitted to ``soft`` answers (cross-entropy, small L2), plus
    ``information`` times SHOT's information-maximisation loss on the same inputs."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    weight = (init[0] * std).detach().clone().requires_grad_(True)
    bias = (init[1] + init[0] @ mean).detach().clone().requires_grad_(True)
    z = (features - mean) / std

    def loss() -> torch.Tensor:
        out = z @ weight.T + bias
        logp = F.log_softmax(out, 1)
        fit = -(soft * logp).sum(1).mean() + 1e-4 * weight.pow(2).sum()
        return fit + information * information_loss(out, 1.0) if information else fit

    small_fit([weight, bias], loss, 100, optimizer="lbfgs")
    w = (weight / std).detach()
    return lambda f: f @ w.T + (bias - w @ mean).detach()


def em_lda(features: torch.Tensor, soft: torch.Tensor, shrinkage: float = 0.6) -> Any:
    """Shared-covariance Gaussian classes, EM-refined from ``soft`` answers (5 rounds)."""
    n, d = features.shape
    post = soft
    for _ in range(5):
        counts = post.sum(0) + 1e-6
        means = post.T @ features / counts[:, None]
        cov = (features.T @ features - (means.T * counts) @ means) / n
        cov = (1 - shrinkage) * cov + shrinkage * torch.eye(d) * cov.diagonal().mean()
        inv = torch.linalg.solve(cov, means.T).T
        bias = -0.5 * (means * inv).sum(1) + (counts / n).log()
        post = (features @ inv.T + bias).softmax(1)
    return lambda f: f @ inv.T + bias


def run(sc: Any, seed: int, input_shape: Any) -> dict[str, float]:
    concat = netmeld.meld(sc.members, "concat", input_shape=input_shape)
    test_x, test_labels = sc.test
    test = extract(concat, test_x, batch_size=128).features[0]
    targets = torch.tensor([concat.labels.index(label) for label in test_labels])
    pool = torch.from_numpy(np.random.default_rng(seed).permutation(len(sc.pool))[: uh.UNLABELED])
    unlabeled = sc.pool_features[pool]

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == targets).float().mean())

    out: dict[str, float] = {}
    wn = netmeld.meld(sc.members, "weight-norm", input_shape=input_shape)
    wn_test = torch.cat(_scaled_logits(wn, test), 1)
    out["weight-norm"] = acc(wn_test)
    out["em-priors"] = acc(wn_test + em_priors(torch.cat(_scaled_logits(wn, unlabeled), 1)))
    out["em-offsets"] = acc(wn_test + em_offsets(_scaled_logits(wn, unlabeled)))
    im = netmeld.meld(sc.members, "infomax", sc.pool[pool], seed=seed, input_shape=input_shape)

    def union(model: Any, f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.logits_from(model.outputs_from_features([f] * len(model.members)))

    out["infomax"] = acc(union(im, test))
    soft = union(im, unlabeled).softmax(1)
    heads = [concat.heads[n] for n in concat.member_names]
    init = (torch.cat([h.weight for h in heads]).detach(), torch.cat([h.bias for h in heads]))
    out["distill"] = acc(distill(unlabeled, soft, init)(test))
    out["em-lda"] = acc(em_lda(unlabeled, soft)(test))
    out["im-head"] = acc(distill(unlabeled, soft, init, information=1.0)(test))
    oracle = netmeld.meld([sc.oracle], "concat", input_shape=input_shape)
    with torch.no_grad():
        ologits = oracle.heads["oracle"](test)
    otargets = torch.tensor([oracle.labels.index(label) for label in test_labels])
    out["oracle"] = float((ologits.argmax(1) == otargets).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cifar10"], choices=["digits", "cifar10"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--splits", nargs="+", choices=list(uh.SPLITS), default=list(uh.SPLITS))
    parser.add_argument("--data", default=None, help="folder of the shared data sets")
    args = parser.parse_args()
    sources = {
        "digits": uh.Source("digits", lambda s, seed: uh.digits_scenario(s, seed=seed)),
        "cifar10": uh.Source(
            "cifar10 (EfficientNet-lite0)", uh._cifar(args.data, 128, 500, 300), (3, 32, 32)
        ),
    }
    table = Table(title="union accuracy, % (gap to the oracle), 1,000 unlabeled images")
    for column in ["scenario", *CANDIDATES, "oracle"]:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for key in args.datasets:
        source = sources[key]
        for split in args.splits:
            runs = [
                run(source.build(uh.SPLITS[split], seed), seed, source.input_shape)
                for seed in args.seeds
            ]
            mean = {k: 100 * statistics.mean(r[k] for r in runs) for k in runs[0]}
            cells = [f"{mean[c]:.1f} ({mean[c] - mean['oracle']:+.1f})" for c in CANDIDATES]
            table.add_row(f"{source.name}, {split}", *cells, f"{mean['oracle']:.1f}")
            print(f"  {source.name}, {split}: {mean}", file=sys.stderr)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
