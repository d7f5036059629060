"""The screener's networks, built on EfficientNet-Lite0 (torch; training, export, reference).

- :class:`SegmenterViewNet`: U-Net decoder on the Lite0 encoder -> lung probability map,
  plus a frontal/lateral head on the same encoder's pooled features: engine call 1.
- :class:`ClassifierCamNet`: Lite0 + global average pooling + ONE linear layer, so the class
  activation map (CAM, equal to Grad-CAM for this head) is a second output of the same
  forward pass: engine call 2.

Both take ``(N, 1, S, S)`` float in [0, 1] and do the ImageNet normalisation themselves, so
the runtime never has to know about it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engines.efficientnet_lite import FEATURE_CHANNELS, SKIP_CHANNELS, EfficientNetLite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASS_NAMES = ("covid", "pneumonia", "normal")
DECODER_CHANNELS = (48, 24, 16, 8)

SEGMENTER_OUTPUTS = ("lung_probability", "lateral_probability")
CLASSIFIER_OUTPUTS = ("probabilities", "cam", "features")


class GrayToImageNet(nn.Module):
    """(N, 1, H, W) in [0, 1] -> (N, 3, H, W) ImageNet z-scores."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Skips at strides 32, 16, 8, 4, 2 -> lung logit at stride 1."""

    def __init__(self) -> None:
        super().__init__()
        c32, c16, c8, c4, c2 = SKIP_CHANNELS[::-1]
        d = DECODER_CHANNELS
        self.blocks = nn.ModuleList(
            [
                DecoderBlock(c32, c16, d[0]),
                DecoderBlock(d[0], c8, d[1]),
                DecoderBlock(d[1], c4, d[2]),
                DecoderBlock(d[2], c2, d[3]),
            ]
        )
        self.out = nn.Conv2d(d[3], 1, 1)

    def forward(self, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = skips[-1]
        for block, skip in zip(self.blocks, skips[-2::-1], strict=True):
            x = block(x, skip)
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)


class SegmenterViewNet(nn.Module):
    """Engine call 1: lung probability map and P(lateral) from one encoder pass."""

    def __init__(self, encoder: EfficientNetLite0) -> None:
        super().__init__()
        self.norm = GrayToImageNet()
        self.encoder = encoder
        self.decoder = UNetDecoder()
        self.view_head = nn.Linear(FEATURE_CHANNELS, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = self.encoder.forward_skips(self.norm(x))
        lung = torch.sigmoid(self.decoder(skips, (x.shape[-2], x.shape[-1])))
        pooled = self.encoder.head(skips[-1]).mean(dim=(2, 3))
        lateral = torch.sigmoid(self.view_head(pooled))
        return lung[:, 0], lateral[:, 0]


class ClassifierCamNet(nn.Module):
    """Engine call 2: class probabilities, per-class CAM and pooled features in one pass.

    ``cam[n, c] = sum_k w[c, k] * A[n, k]``; its spatial mean plus the bias is the logit,
    so the CAM is exactly what the score is made of (Grad-CAM of a GAP + linear head).
    """

    def __init__(self, encoder: EfficientNetLite0, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.norm = GrayToImageNet()
        self.encoder = encoder
        self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.encoder.forward_features(self.norm(x))
        pooled = fmap.mean(dim=(2, 3))
        probabilities = torch.softmax(self.fc(pooled), dim=1)
        cam = torch.einsum("ck,nkhw->nchw", self.fc.weight, fmap)
        return probabilities, cam, pooled
