"""Small architectures covering the conv patterns real video models use (built in the tests, random
weights, BatchNorm with non-trivial running statistics so that folding is exercised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out, inplace=True)


class ResNetStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 7, 2), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True),
            conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
            conv_bn(hidden, cout, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2), nn.ReLU6(inplace=True),
            InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6),
            InvertedResidual(24, 32, 2, 6), InvertedResidual(32, 32, 1, 6),
        )  # fmt: skip
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, 16), nn.ReLU())
        self.enc2 = nn.Sequential(conv_bn(16, 32, stride=2), nn.ReLU())
        self.bottleneck = nn.Sequential(conv_bn(32, 32, stride=2), nn.ReLU())
        self.dec2 = nn.Sequential(conv_bn(64, 32), nn.ReLU())
        self.dec1 = nn.Sequential(conv_bn(48, 16), nn.ReLU())
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottleneck(e2)
        d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), e2], 1))
        d1 = self.dec1(
            torch.cat([F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False), e1], 1)
        )
        return self.out(d1)


class HRNetFusion(nn.Module):
    """Two parallel resolutions exchanging information, as in HRNet's fuse layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, stride=2), nn.ReLU())
        self.high = nn.Sequential(conv_bn(16, 16), nn.ReLU(), conv_bn(16, 16))
        self.to_low = conv_bn(16, 32, stride=2)
        self.low = nn.Sequential(conv_bn(32, 32), nn.ReLU(), conv_bn(32, 32))
        self.low_to_high = conv_bn(32, 16, 1)
        self.high_to_low = conv_bn(16, 32, 3, 2)
        self.final = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        high = self.high(x)
        low = self.low(F.relu(self.to_low(x)))
        high_fused = F.relu(high + F.interpolate(self.low_to_high(low), size=high.shape[-2:], mode="nearest"))
        low_fused = F.relu(low + self.high_to_low(high))
        return self.final(high_fused) + F.interpolate(low_fused[:, :6], size=high.shape[-2:], mode="nearest")


class StridedDilated(nn.Module):
    """Strides, dilations, odd kernel shapes, no bias, non-zero padding modes."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 12, 5, stride=2, padding=2, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
            nn.Conv2d(12, 16, (1, 3), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=4, dilation=4, groups=4, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(16, 16, 2, stride=2), nn.ReLU(),
            nn.Conv2d(16, 8, 1, stride=2, padding=0, padding_mode="circular"),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def plain_net(seed: int = 0) -> nn.Module:
    """Three convs without normalisation: its output follows input brightness almost linearly, which makes
    slow drift visible."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()


ARCHITECTURES = {
    "resnet-basic": ResNetStack,
    "mobilenetv2": MobileNetV2Like,
    "unet": UNetLike,
    "hrnet-fusion": HRNetFusion,
    "strided-dilated": StridedDilated,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """An architecture in eval mode with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
