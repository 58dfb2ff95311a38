"""Member statistics: the ridge head computed from them equals the ridge head fitted on all the
members' training features together; files round-trip, and statistics that do not fit their
member, or each other, are clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import netmeld
from netmeld.errors import MethodError, ModelFileError
from netmeld.methods.statistics import FeatureStatistics, feature_statistics


def _own_data(scenario, member):
    rows = [i for i, label in enumerate(scenario.pool_labels) if label in member.labels]
    return scenario.pool[rows], [scenario.pool_labels[i] for i in rows]


def _features(member, x):
    model = netmeld.meld([member], "concat")
    with torch.no_grad():
        return model.run_members(x).features[0].double()


def _joint_ridge(members, datasets, lam):
    """The ridge head on every member's training features together (union one-hot targets)."""
    union = list(dict.fromkeys(label for m in members for label in m.labels))
    z = torch.cat([_features(m, x) for m, (x, _) in zip(members, datasets, strict=True)])
    y = torch.tensor([union.index(label) for _, labels in datasets for label in labels])
    z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    gram = z1.T @ z1
    penalty = torch.zeros_like(gram)
    penalty.diagonal()[:-1] = lam * torch.diagonal(gram)[:-1].mean()
    w = torch.linalg.solve(gram + penalty, z1.T @ torch.nn.functional.one_hot(y).double())
    return union, w[:-1].T, w[-1]


def _overlapping(scenario):
    """Two members on one trunk whose label sets share a label ('4')."""
    a, b = scenario.members
    b2 = copy.deepcopy(b)
    labels = ["4", *list(b.labels)[1:]]
    return [a, netmeld.Member(b2.module, labels, name="b2", preprocessing=b.preprocessing)]


@pytest.mark.parametrize("overlap", [False, True])
def test_the_ridge_head_from_statistics_equals_joint_ridge_training(digits2, overlap):
    members = _overlapping(digits2) if overlap else digits2.members
    datasets = [_own_data(digits2, m) for m in members]
    stats = [feature_statistics(m, d, folds=3) for m, d in zip(members, datasets, strict=True)]
    params = {"ridge": 0.1, "temperature": 1.0}  # the raw ridge head
    model = netmeld.meld(members, "ridge", statistics=stats, params=params)
    union, weight, bias = _joint_ridge(members, datasets, 0.1)
    assert model.labels == union
    linear = model.combiner.as_linear()  # one nn.Linear over the shared trunk's features
    torch.testing.assert_close(linear.weight.double(), weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(linear.bias.double(), bias, rtol=1e-4, atol=1e-5)
    x = digits2.test[0][:50]
    expected = _features(members[0], x) @ weight.T + bias
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)


def test_the_ridge_heads_temperature_calibrates_it_and_keeps_its_answers(digits2):
    members = digits2.members
    stats = [feature_statistics(m, _own_data(digits2, m)) for m in members]
    raw = netmeld.meld(members, "ridge", statistics=stats, params={"temperature": 1.0})
    fitted = netmeld.meld(members, "ridge", statistics=stats)
    t = fitted.method["fitted"]["temperature"]
    assert t > 2  # ridge scores are about 0 or 1: their softmax is far too flat
    x = digits2.test[0]
    torch.testing.assert_close(fitted(x), raw(x) * t, rtol=1e-4, atol=1e-4)
    a, b = (netmeld.evaluate(m, digits2.test, latency=False) for m in (raw, fitted))
    assert a.union_accuracy == b.union_accuracy
    assert b.ece < a.ece / 2  # on test images the temperature never saw


def test_the_ridge_temperature_stays_finite_when_the_classes_never_overlap(digits2):
    members = digits2.members
    width = netmeld.meld([members[0]], "concat").run_members(digits2.test[0][:1]).features[0]
    stats = []
    for i, member in enumerate(members):
        labels = [label for label in member.labels for _ in range(4)]
        means = torch.eye(width.shape[1])[[10 * i + member.labels.index(x) for x in labels]]
        stats.append(netmeld.statistics_from_features(member, 100 * means, labels, folds=2))
    model = netmeld.meld(members, "ridge", statistics=stats)  # no spread within a class
    t = model.method["fitted"]["temperature"]
    assert 1 < t < 1.2e3 and torch.isfinite(model(digits2.test[0][:5])).all()


def test_ldas_held_out_likelihood_from_statistics_is_that_of_the_held_out_examples(digits2):
    member = digits2.members[0]
    width = netmeld.meld([member], "concat").run_members(digits2.test[0][:1]).features[0]
    g = torch.Generator().manual_seed(0)
    k = len(member.labels)
    labels = [member.labels[i % k] for i in range(90)]  # example i in fold i % 3
    y = torch.tensor([member.labels.index(label) for label in labels])
    x = torch.randn(90, width.shape[1], generator=g, dtype=torch.float64) + 2 * y[:, None]
    stats = netmeld.statistics_from_features(member, x, labels, folds=3)
    fitted = netmeld.meld([member], "lda", statistics=[stats]).method["fitted"]
    for alpha, value in fitted["held_out_loglik"].items():
        expected = 0.0
        for fold in range(3):
            train, held = torch.arange(90) % 3 != fold, torch.arange(90) % 3 == fold
            means = {c: x[train & (y == c)].mean(0) for c in y.unique().tolist()}
            centred = torch.stack([x[i] - means[int(y[i])] for i in range(90)])
            cov = centred[train].T @ centred[train] / (int(train.sum()) - len(means))
            cov = (1 - float(alpha)) * cov + float(alpha) * torch.eye(len(cov)) * cov.diag().mean()
            cov += 1e-9 * torch.eye(len(cov))
            d = centred[held]
            expected += float(
                -0.5 * (d @ torch.linalg.solve(cov, d.T)).trace()
                - 0.5 * len(d) * torch.linalg.slogdet(cov)[1]
            )
        assert value == pytest.approx(expected, rel=1e-6, abs=0.01), alpha


def test_statistics_heads_beat_concat_and_save_and_load(digits2, tmp_path):
    members = digits2.members
    datasets = [_own_data(digits2, m) for m in members]
    concat = netmeld.evaluate(netmeld.meld(members, "concat"), digits2.test, latency=False)
    for method, projection in (("ridge", None), ("ridge", 256), ("lda", None), ("lda", 256)):
        stats = [
            feature_statistics(m, d, projection=projection, seed=3)
            for m, d in zip(members, datasets, strict=True)
        ]
        paths = [
            s.save(tmp_path / f"{m.name}-{method}-{projection}.stats")
            for s, m in zip(stats, members, strict=True)
        ]
        model = netmeld.meld(members, method, statistics=paths)  # files, read back
        report = netmeld.evaluate(model, digits2.test, latency=False)
        assert report.union_accuracy > concat.union_accuracy, (method, projection)
        saved = model.save(tmp_path / f"{method}-{projection}")
        again = netmeld.load(saved)
        torch.testing.assert_close(again(digits2.test[0][:20]), model(digits2.test[0][:20]))
        assert model.method["fitted"]["examples"] == sum(len(d[0]) for d in datasets)


def test_statistics_round_trip_and_hostile_files_are_refused(digits2, tmp_path):
    member = digits2.members[0]
    stats = feature_statistics(member, _own_data(digits2, member), projection=32, seed=1)
    path = stats.save(tmp_path / "a.stats")
    back = FeatureStatistics.load(path)
    assert (back.labels, back.projection, back.seed, back.dim) == (
        stats.labels,
        32,
        1,
        stats.dim,
    )
    assert torch.equal(back.gram, stats.gram) and torch.equal(back.sums, stats.sums)
    (tmp_path / "bad.stats").write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFileError, match="cannot be read"):
        FeatureStatistics.load(tmp_path / "bad.stats")
    broken = copy.deepcopy(stats)
    broken.gram[0, 0, 0] = float("nan")
    with pytest.raises(ModelFileError, match="'gram' holds NaN"):
        FeatureStatistics.load(broken.save(tmp_path / "nan.stats"))
    with pytest.raises(ModelFileError, match="does not exist"):
        FeatureStatistics.load(tmp_path / "missing.stats")


def test_statistics_that_do_not_fit_are_clear_errors(digits2):
    a, b = digits2.members
    sa = feature_statistics(a, _own_data(digits2, a))
    sb = feature_statistics(b, _own_data(digits2, b))
    with pytest.raises(MethodError, match="one per member"):
        netmeld.meld([a, b], "ridge", statistics=[sa])
    with pytest.raises(MethodError, match=r"labels .* differ"):
        netmeld.meld([a, b], "ridge", statistics=[sb, sa])
    retrained = copy.deepcopy(a)  # the same labels on a trunk whose weights moved
    with torch.no_grad():
        next(retrained.module.parameters()).view(-1)[0] += 0.01
    with pytest.raises(MethodError, match="another trunk or preprocessing"):
        netmeld.meld([retrained, b], "ridge", statistics=[sa, sb])
    projected = feature_statistics(b, _own_data(digits2, b), projection=16)
    with pytest.raises(MethodError, match="projected differently"):
        netmeld.meld([a, b], "ridge", statistics=[sa, projected])
    with pytest.raises(MethodError, match=r"statistics=\[\.\.\.\]"):
        netmeld.meld([a, b], "lda")
    with pytest.raises(MethodError, match="does not read statistics"):
        netmeld.meld([a, b], "concat", statistics=[sa, sb])
    moved = copy.deepcopy(b)  # a member fine-tuned away from the shared trunk, with its own stats
    with torch.no_grad():
        next(moved.module.parameters()).view(-1)[0] += 0.01
    own = feature_statistics(moved, _own_data(digits2, moved))
    with pytest.raises(MethodError, match="different trunks"):
        netmeld.meld([a, moved], "ridge", statistics=[sa, own])


def test_netmeld_stats_on_the_cli_gives_the_python_statistics(digits2, tmp_path, capsys):
    from PIL import Image

    from netmeld.cli import main

    folder = netmeld.meld(digits2.members, "concat").save(tmp_path / "m")
    paths = []
    for member in digits2.members:
        x, labels = _own_data(digits2, member)
        x, labels = x[:30], labels[:30]
        data = tmp_path / f"data-{member.name}"
        for i, (image, label) in enumerate(zip(x, labels, strict=True)):
            (data / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(
                data / label / f"{i:03d}.png"
            )
        out = tmp_path / f"{member.name}.stats"
        argv = ["stats", str(folder), "--member", member.name, "--data", str(data), "-o", str(out)]
        assert main(argv) == 0
        paths.append(out)
        expected = feature_statistics(member, data)
        assert torch.equal(FeatureStatistics.load(out).gram, expected.gram)
    assert main(["stats", str(folder), "--data", str(data), "-o", str(tmp_path / "x.stats")]) == 2
    assert "has members ['m1', 'm2']; pick one with --member" in capsys.readouterr().err
    assert not (tmp_path / "x.stats").exists()
    model = netmeld.meld(digits2.members, "ridge", statistics=paths)
    assert model.method["fitted"]["examples"] == 60
