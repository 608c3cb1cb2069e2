"""NanoDet-m (RangiLyu, Apache-2.0) as a native PyTorch module: ShuffleNetV2 1.0x + PAN + GFL head.

Reproduces the published ``nanodet_m_416.onnx`` graph: BatchNorm is folded into biased convs, every
activation is LeakyReLU(0.1), the depthwise 3x3 convs of the backbone have no activation (as in
ShuffleNetV2), the PAN's 1x1 lateral convs have none either, and the resampling is bilinear with
``align_corners=False`` (up by 2 top-down, down by 2 bottom-up). The head is one stack of two
depthwise-separable convs per level whose last 1x1 conv predicts class scores and box distributions
together (``share_cls_reg``). ``forward`` returns the six tensors the ONNX graph returns; decoding and NMS
live in :mod:`skipconv_cli.models.detection`.

``nanodet_m_320.onnx`` from the same repository has the same architecture but is a separately trained
checkpoint (its conv weights differ from the 416 file), so ``load_nanodet_weights`` loads either; only
the 416 file is registered.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skipconv_cli.models.detection import COCO_LABELS, postprocess_nanodet, preprocess_nanodet
from skipconv_cli.models.onnx_weights import load_convs_in_order, read_onnx_convs
from skipconv_cli.models.registry import ModelSpec, register_model

NEGATIVE_SLOPE = 0.1

# Output order of ``NanoDet.forward`` (and of the ONNX file).
OUTPUT_NAMES: tuple[str, ...] = (
    "cls_pred_stride_8",
    "cls_pred_stride_16",
    "cls_pred_stride_32",
    "dis_pred_stride_8",
    "dis_pred_stride_16",
    "dis_pred_stride_32",
)


def conv_act(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (BatchNorm folded into its bias) + optional LeakyReLU(0.1), as ``conv`` / ``act``."""
    layers = OrderedDict(
        conv=nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=True
        )
    )
    if act:
        layers["act"] = nn.LeakyReLU(NEGATIVE_SLOPE)
    return nn.Sequential(layers)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` halves (ShuffleNet), so the next split mixes both branches."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 unit.

    Stride 1: split the channels in half, transform one half (1x1, depthwise 3x3, 1x1), concat, shuffle.
    Stride 2: both branches see the whole input and downsample, doubling the channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        branch = out_channels // 2
        if stride == 2:
            self.branch1 = nn.Sequential(
                OrderedDict(
                    depthwise=conv_act(in_channels, in_channels, 3, 2, groups=in_channels, act=False),
                    pointwise=conv_act(in_channels, branch, 1),
                )
            )
        branch_in = in_channels if stride == 2 else branch
        self.branch2 = nn.Sequential(
            OrderedDict(
                pointwise1=conv_act(branch_in, branch, 1),
                depthwise=conv_act(branch, branch, 3, stride, groups=branch, act=False),
                pointwise2=conv_act(branch, branch, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1.0x without the last 1x1 conv; returns stage2/3/4 (strides 8, 16, 32)."""

    def __init__(
        self, stage_channels: tuple[int, ...] = (24, 116, 232, 464), repeats: tuple[int, ...] = (4, 8, 4)
    ):
        super().__init__()
        self.conv1 = conv_act(3, stage_channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_channels = stage_channels[0]
        for out_channels, repeat in zip(stage_channels[1:], repeats, strict=True):
            blocks = [ShuffleV2Block(in_channels, out_channels, 2)]
            blocks += [ShuffleV2Block(out_channels, out_channels, 1) for _ in range(repeat - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.conv1(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return c3, c4, self.stage4(c4)


class PAN(nn.Module):
    """NanoDet's light PAN: 1x1 laterals, bilinear top-down then bottom-up sums, no extra convs."""

    def __init__(self, in_channels: tuple[int, ...] = (116, 232, 464), out_channels: int = 96):
        super().__init__()
        self.lateral_convs = nn.ModuleList(conv_act(c, out_channels, 1, act=False) for c in in_channels)

    def forward(self, features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], scale_factor=2.0, mode="bilinear", align_corners=False
            )
        outs = list(laterals)
        for i in range(len(outs) - 1):
            outs[i + 1] = outs[i + 1] + F.interpolate(
                outs[i], scale_factor=0.5, mode="bilinear", align_corners=False
            )
        return outs


class DepthwiseConvAct(nn.Module):
    """Depthwise 3x3 + LeakyReLU, pointwise 1x1 + LeakyReLU (NanoDet's ``DepthwiseConvModule``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = conv_act(in_channels, in_channels, 3, groups=in_channels)
        self.pointwise = conv_act(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class NanoDetHead(nn.Module):
    """GFL head with shared class/box towers: per level 2 depthwise-separable convs and one 1x1 output."""

    def __init__(
        self,
        num_classes: int = 80,
        channels: int = 96,
        stacked_convs: int = 2,
        reg_max: int = 7,
        num_levels: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cls_convs = nn.ModuleList(
            nn.Sequential(*(DepthwiseConvAct(channels, channels) for _ in range(stacked_convs)))
            for _ in range(num_levels)
        )
        self.gfl_cls = nn.ModuleList(
            nn.Conv2d(channels, num_classes + 4 * (reg_max + 1), 1) for _ in range(num_levels)
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cls_preds, dis_preds = [], []
        for x, convs, out_conv in zip(features, self.cls_convs, self.gfl_cls, strict=True):
            out = out_conv(convs(x))
            cls, dis = out.split((self.num_classes, out.shape[1] - self.num_classes), dim=1)
            cls_preds.append(cls.sigmoid().flatten(start_dim=2).transpose(1, 2))
            dis_preds.append(dis.flatten(start_dim=2).transpose(1, 2))
        return (*cls_preds, *dis_preds)


class NanoDet(nn.Module):
    """NanoDet-m.

    Shape:
        - Input: [N, 3, H, W], BGR letterboxed and normalised per channel, H and W multiples of 32.
        - Output: a tuple in :data:`OUTPUT_NAMES` order: ``cls_pred_stride_{8,16,32}`` [N, HW/s², 80]
          (sigmoided class scores) then ``dis_pred_stride_{8,16,32}`` [N, HW/s², 32] (4 sides x 8 bins,
          logits), cells row-major.
    """

    def __init__(self, num_classes: int = 80):
        super().__init__()
        self.backbone = ShuffleNetV2()
        self.fpn = PAN()
        self.head = NanoDetHead(num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"NanoDet needs [N, 3, H, W] with H, W multiples of 32, got {tuple(x.shape)}")
        return self.head(self.fpn(self.backbone(x)))


def build_nanodet_m() -> NanoDet:
    return NanoDet(num_classes=80)


def load_nanodet_weights(module: nn.Module, path: Path) -> None:
    """Copy ``nanodet_m_416.onnx`` (or ``nanodet_m_320.onnx``) conv weights into ``module``."""
    load_convs_in_order(module, read_onnx_convs(path), torch.zeros(1, 3, 64, 64))


NANODET_M_SPEC = register_model(
    ModelSpec(
        name="nanodet-m",
        task="detect",
        input_size=(416, 416),
        build=build_nanodet_m,
        preprocess=preprocess_nanodet,
        postprocess=postprocess_nanodet,
        weights="nanodet_m_416.onnx",
        load_weights=load_nanodet_weights,
        labels=COCO_LABELS,
        license="Apache-2.0 (NanoDet by RangiLyu)",
        source=(
            "https://raw.githubusercontent.com/Kazuhito00/Detection-PoseEstimation-Pipeline/"
            "7121ff80014612e72c5ebb950e698bd5b1ac53f2/Detector/nanodet/model/nanodet_m_416.onnx"
        ),
        extra={"output_names": OUTPUT_NAMES},
    )
)
