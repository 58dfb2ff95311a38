"""Multi-teacher distillation into one student over the union of the teachers' labels."""

from __future__ import annotations

import pytest
import torch

import netmeld
from netmeld.distill import distill
from netmeld.errors import DataError, MemberError


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
