"""The merging kernels checked against their definitions on small random tensors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from netmeld.errors import MethodError
from netmeld.ops import merge as K


@pytest.fixture
def tensors() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    models = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(3)]
    return base, models


def test_linear_is_the_weighted_mean(tensors):
    _, models = tensors
    assert_close(K.linear(models), sum(models) / 3)
    w = [1.0, 2.0, 3.0]
    expected = (models[0] + 2 * models[1] + 3 * models[2]) / 6
    assert_close(K.linear(models, w), expected)
    assert_close(K.linear(models, w, normalize=False), expected * 6)


def test_slerp_ends_and_norm(tensors):
    _, (a, b, _) = tensors
    assert_close(K.slerp(a, b, 0.0), a)
    assert_close(K.slerp(a, b, 1.0), b)
    # on unit vectors the midpoint stays on the sphere, unlike the linear midpoint
    ua, ub = a / a.norm(), b / b.norm()
    ub = ub - (ua * ub).sum() * ua
    ub = ub / ub.norm()
    mid = K.slerp(ua, ub, 0.5)
    assert_close(mid.norm(), torch.tensor(1.0))
    assert (ua + ub).norm() / 2 < 0.99


def test_task_arithmetic_definition(tensors):
    base, models = tensors
    expected = base + 0.5 * sum(m - base for m in models)
    assert_close(K.task_arithmetic(base, models, lambda_=0.5), expected)


def test_ties_at_density_one_without_election_is_task_arithmetic(tensors):
    base, models = tensors
    w = [0.3, 0.5, 0.2]
    ta = K.task_arithmetic(base, models, w)
    assert torch.equal(K.ties(base, models, w, density=1.0, consensus=None, normalize=False), ta)


def test_ties_at_density_one_equals_task_arithmetic_when_signs_agree(tensors):
    base, _ = tensors
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(6, 5, generator=g)
    # task vectors that agree in sign everywhere: sign election keeps every entry
    models = [base + direction * torch.rand(6, 5, generator=g) for _ in range(3)]
    ta = K.task_arithmetic(base, models)
    assert_close(K.ties(base, models, density=1.0, normalize=False), ta)
    # where signs disagree the election must change the result
    mixed = [base + direction, base - 0.5 * direction]
    assert not torch.allclose(
        K.ties(base, mixed, density=1.0, normalize=False), K.task_arithmetic(base, mixed)
    )


def test_ties_trims_and_elects(tensors):
    base = torch.zeros(4)
    models = [torch.tensor([3.0, -1.0, 0.1, 2.0]), torch.tensor([1.0, 2.0, -0.2, -1.5])]
    out = K.ties(base, models, density=0.5)
    # model 0 keeps 3 and 2; model 1 keeps 2 and -1.5; elected signs: +, +, (0 -> +), + (2 - 1.5)
    assert_close(out, torch.tensor([3.0, 2.0, 0.0, 2.0]))


def test_dare_is_seeded_and_unbiased():
    base = torch.zeros(200_000)
    model = torch.ones(200_000)
    a = K.dare(base, [model], density=0.3, seed=5, key="w")
    b = K.dare(base, [model], density=0.3, seed=5, key="w")
    c = K.dare(base, [model], density=0.3, seed=6, key="w")
    d = K.dare(base, [model], density=0.3, seed=5, key="v")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert abs((a != 0).float().mean().item() - 0.3) < 0.01
    assert abs(a.mean().item() - 1.0) < 0.02  # rescaled by 1/density
    assert_close(a[a != 0], torch.full_like(a[a != 0], 1 / 0.3))


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = torch.zeros(100)
    delta = torch.arange(1.0, 101.0)
    out = K.breadcrumbs(base, [delta], density=0.5, gamma=0.1)
    kept = delta[out != 0]
    assert kept.min().item() == 41 and kept.max().item() == 90  # bottom 40, top 10 dropped


def test_fisher_weights_by_information():
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    fa, fb = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    assert_close(K.fisher([a, b], [fa, fb], eps=0.0), torch.tensor([2.0, 1.5]))


def test_regmean_solves_the_least_squares_problem():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    merged = K.regmean(ws, grams, alpha=1.0)
    # gradient of sum_i ||X_i W^T - X_i W_i^T||^2 vanishes at the solution
    grad = sum((merged - w) @ gm for w, gm in zip(ws, grams, strict=True))
    assert grad.abs().max().item() < 1e-8
    # with identical inputs RegMean is the plain average
    same = K.regmean(ws, [grams[0], grams[0]], alpha=1.0)
    assert_close(same, (ws[0] + ws[1]) / 2)


def test_registry_lists_kernels_with_references():
    assert {
        "linear",
        "slerp",
        "task-arithmetic",
        "ties",
        "dare",
        "dare-ties",
        "breadcrumbs",
        "fisher",
        "regmean",
    } <= set(K.KERNELS)
    assert all(k.reference for k in K.KERNELS.values())


def test_unknown_kernel_and_parameter_errors():
    with pytest.raises(MethodError, match=r"valid methods: .*ties"):
        K.get_kernel("tie")
    with pytest.raises(MethodError, match=r"no parameter 'densty'.*density"):
        K.check_params("ties", {"densty": 0.5})
    with pytest.raises(MethodError, match=r"needs the common base"):
        K.merge_tensor("ties", [torch.zeros(2)])
    with pytest.raises(MethodError, match=r"tensor 1 has shape \(3,\)"):
        K.linear([torch.zeros(2), torch.zeros(3)])
