"""Inputs as tensors, ndarrays, torch Datasets and image folders give the same data."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import netmeld
from netmeld.data import load_data


class _Digits(torch.utils.data.Dataset):
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_tensor_ndarray_dataset_and_folder_agree(digits2, tmp_path):
    x, labels = digits2.test[0][:20], digits2.test[1][:20]
    x8 = (x * 255).round().to(torch.uint8)
    as_tensor = load_data((x8.float() / 255, labels), (1, 8, 8))
    as_uint8 = load_data((x8.numpy(), np.array(labels)), (1, 8, 8))
    as_hw = load_data((x8[:, 0].numpy(), labels), (1, 8, 8))  # (N, H, W) grey
    ds = _Digits(x8.float() / 255, [int(v) for v in labels])
    as_dataset = load_data(ds, (1, 8, 8))
    for i, (img, label) in enumerate(zip(x8, labels, strict=True)):
        (tmp_path / label).mkdir(exist_ok=True)
        Image.fromarray(img[0].numpy()).save(tmp_path / label / f"{i:03d}.png")
    as_folder = load_data(tmp_path, (1, 8, 8))
    for d in (as_uint8, as_hw, as_dataset):
        torch.testing.assert_close(d.inputs, as_tensor.inputs)
        assert d.labels == labels
    order = sorted(range(20), key=lambda i: (labels[i], f"{i:03d}"))
    torch.testing.assert_close(as_folder.inputs, as_tensor.inputs[order])
    assert as_folder.labels == [labels[i] for i in order]


def test_unlabeled_folder_and_resizing(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((16, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_data(tmp_path, (1, 8, 8))
    assert d.labels is None and d.inputs.shape == (3, 1, 8, 8)
    torch.testing.assert_close(d.inputs[2].mean(), torch.tensor(80 / 255), atol=2e-3, rtol=0)


def test_dataset_with_integer_labels_and_no_classes_is_an_error():
    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8), 1

    with pytest.raises(netmeld.DataError, match="no 'classes'"):
        load_data(Bare(), (1, 8, 8))


def test_label_count_mismatch():
    with pytest.raises(netmeld.DataError, match="3 inputs but 2 labels"):
        load_data((torch.zeros(3, 4), ["a", "b"]), (4,))
