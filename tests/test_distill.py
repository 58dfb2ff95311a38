"""Multi-teacher distillation into one student over the union of the teachers' labels."""

from __future__ import annotations

import pytest
import torch

import netmeld
from netmeld.errors import DataError, MemberError
from netmeld.methods.distill import distill


@pytest.fixture(scope="module")
def taught(digits2):
    teacher = netmeld.meld(digits2.members, "calibrate", (digits2.pool, digits2.pool_labels))
    student = distill(teacher, digits2.pool, epochs=100, progress=False)
    return teacher, student


def test_student_learns_the_union_from_unlabeled_inputs(digits2, taught, tmp_path):
    teacher, student = taught
    assert student.labels == teacher.labels  # the union, in the teacher's order
    assert len(student.members) == 1
    t_acc = netmeld.evaluate(teacher, digits2.test).union_accuracy
    s_acc = netmeld.evaluate(student, digits2.test).union_accuracy
    assert s_acc > t_acc - 0.03
    untrained = distill(teacher, digits2.pool, epochs=1, lr=1e-6, progress=False)
    assert s_acc > netmeld.evaluate(untrained, digits2.test).union_accuracy + 0.2
    student.save(tmp_path / "student")
    again = netmeld.load(tmp_path / "student")
    torch.testing.assert_close(again(digits2.test[0]), student(digits2.test[0]))


def test_teacher_members_are_combined_first(digits2):
    student = distill(digits2.members, digits2.pool, union="concat", epochs=2, progress=False)
    assert student.labels == netmeld.meld(digits2.members, "concat").labels
    assert student.method["teacher"]["method"] == "concat"


def test_errors(digits2, taught):
    teacher, _ = taught
    with pytest.raises(DataError, match="needs unlabeled inputs"):
        distill(teacher, None)
    with pytest.raises(DataError, match="is empty"):
        distill(teacher, torch.zeros(0, 1, 8, 8))
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(MemberError, match="outputs 3 logits, the teacher has 10 labels"):
        distill(teacher, digits2.pool, student=wrong, epochs=1)


def _bn_mismatch(teacher, x):
    total = []

    def hook(mod, args, _out):
        v = args[0]
        dims = [0, *range(2, v.dim())]
        total.append(float((v.mean(dims) - mod.running_mean).norm()))

    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook) for m in norms]
    with torch.no_grad():
        teacher(x)
    for h in handles:
        h.remove()
    return sum(total)


def test_data_free_inputs_match_the_batchnorm_statistics(digits2, taught):
    from netmeld.methods.distill import synthesize

    teacher, _ = taught
    x = synthesize(teacher, 64, steps=50, seed=1)
    assert x.shape == (64, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, synthesize(teacher, 64, steps=50, seed=1))
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert _bn_mismatch(teacher, x) < 0.5 * _bn_mismatch(teacher, noise)
    student = distill(
        teacher, None, data_free=512, synthesis={"steps": 50}, epochs=100, progress=False
    )
    # a member alone scores at most half; the data-free student learnt both halves
    assert netmeld.evaluate(student, digits2.test).union_accuracy > 0.6
    assert student.method["params"]["data_free"] is True


def test_student_can_start_from_the_merged_bodies(digits2, taught):
    teacher, _ = taught
    student = distill(teacher, digits2.pool, init="merge", epochs=1, lr=1e-9, progress=False)
    merged = netmeld.merge_members(teacher.members, "linear", data=digits2.pool[:2048])
    s_state = student.members[0].module.state_dict()
    for key, value in merged.members[0].module.state_dict().items():
        if value.dim() == 4:  # the convolutions (BatchNorm statistics move in train mode)
            torch.testing.assert_close(s_state[key], value, rtol=0, atol=1e-6)


def test_feature_hints_train_a_projection_that_is_dropped(digits2, taught, tmp_path):
    teacher, _ = taught
    student = distill(teacher, digits2.pool, hint_weight=1.0, epochs=60, progress=False)
    assert student.method["params"]["hint_weight"] == 1.0
    assert netmeld.evaluate(student, digits2.test).union_accuracy > 0.6
    module = student.members[0].module
    assert not any(m._forward_pre_hooks for m in module.modules())  # the hint hook is gone
    student.save(tmp_path / "hinted")
    assert set(netmeld.load(tmp_path / "hinted").state_dict()) == set(student.state_dict())
