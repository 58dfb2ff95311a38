"""Property-based: the matching kernels (ops/matching.py) over random sizes and values, NaN
included where a caller could pass it, end in a valid permutation or merge (issue 13, item 9)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netmeld.ops.matching import CorrelationStats, activation_matching, zip_matching

sizes = st.integers(min_value=1, max_value=12)


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**16), nan_share=st.sampled_from([0.0, 0.1, 1.0]))
def test_activation_matching_is_a_permutation(n, seed, nan_share):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    c[torch.rand(n, n, generator=g) < nan_share] = float("nan")
    perm = activation_matching(c)
    assert sorted(perm.tolist()) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(
    n_a=sizes,
    n_b=sizes,
    rows=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    constant=st.booleans(),
)
def test_correlations_are_finite_and_bounded_for_finite_features(n_a, n_b, rows, seed, constant):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n_a, generator=g) * 10
    b = torch.randn(rows, n_b, generator=g)
    if constant:  # a dead unit: zero variance
        a[:, 0] = 3.0
    stats = CorrelationStats(n_a, n_b)
    for chunk in range(0, rows, 7):
        stats.update(a[chunk : chunk + 7], b[chunk : chunk + 7])
    for c in (stats.correlation(), stats.joint_correlation()):
        assert torch.isfinite(c).all()
        assert c.abs().max() <= 1 + 1e-6


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**16), alpha=st.floats(0, 1))
def test_zip_matching_merges_every_unit_into_n_outputs(n, seed, alpha):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 2 * n, generator=g, dtype=torch.float64)
    stats = CorrelationStats(n, n)
    stats.update(x[:, :n], x[:, n:])
    merge, unmerge = zip_matching(stats.joint_correlation(), alpha=alpha)
    assert merge.shape == (n, 2 * n) and unmerge.shape == (2 * n, n)
    torch.testing.assert_close(merge.sum(1), torch.ones(n, dtype=torch.float64))
    assert ((unmerge == 0) | (unmerge == 1)).all() and (unmerge.sum(1) == 1).all()
    assert (merge > 0).sum() == 2 * n  # every unit of A and B lands in one output
