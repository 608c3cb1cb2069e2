"""YOLOX-nano (Megvii, Apache-2.0) as a native PyTorch module: CSPDarknet + PAFPN + decoupled head.

Nano is YOLOX at depth 0.33 and width 0.25 with depthwise-separable 3x3 convs. The published ONNX files
have BatchNorm folded into the convolutions, so every "conv + BN + SiLU" block here is a biased
``nn.Conv2d`` followed by SiLU; that also makes every conv a plain ``nn.Conv2d``, which is what the
skip-convolution layers replace. ``forward`` returns the same raw tensor as the ONNX graph; decoding and
NMS live in :mod:`skipconv_cli.models.detection`.

Registers ``yolox-nano`` (COCO-80, 416x416) and ``light-person`` (the same graph with one class, trained
for people at 192x192, from Kazuhito00's Detection-PoseEstimation-Pipeline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from skipconv_cli.models.detection import COCO_LABELS, postprocess_yolox, preprocess_yolox
from skipconv_cli.models.onnx_weights import load_convs_in_order, read_onnx_convs
from skipconv_cli.models.registry import ModelSpec, register_model


class ConvAct(nn.Module):
    """Conv (BatchNorm folded into its bias) + SiLU; 'same' padding for odd kernels."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=True
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DWConvAct(nn.Module):
    """Depthwise kxk conv + SiLU, then pointwise 1x1 conv + SiLU (YOLOX's ``DWConv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.dconv = ConvAct(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.pconv = ConvAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


class Bottleneck(nn.Module):
    """1x1 conv, depthwise-separable 3x3 conv, optional residual."""

    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.conv1 = ConvAct(channels, channels, 1)
        self.conv2 = DWConvAct(channels, channels, 3)
        self.use_add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """Cross-stage partial block: two 1x1 branches, bottlenecks on one, concat, 1x1 fuse."""

    def __init__(self, in_channels: int, out_channels: int, n: int, shortcut: bool = True):
        super().__init__()
        hidden = out_channels // 2
        self.conv1 = ConvAct(in_channels, hidden, 1)
        self.conv2 = ConvAct(in_channels, hidden, 1)
        self.conv3 = ConvAct(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv2 runs before the bottlenecks, as in the exported graph (the weight loader relies on order).
        x_1 = self.conv1(x)
        x_2 = self.conv2(x)
        return self.conv3(torch.cat((self.m(x_1), x_2), dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling (max-pool 5, 9, 13 at stride 1) between two 1x1 convs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = ConvAct(in_channels, hidden, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvAct(hidden * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixels -> 4x channels) then a 3x3 conv: the stem."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvAct(in_channels * 4, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_left = x[..., ::2, ::2]
        top_right = x[..., ::2, 1::2]
        bot_left = x[..., 1::2, ::2]
        bot_right = x[..., 1::2, 1::2]
        return self.conv(torch.cat((top_left, bot_left, top_right, bot_right), dim=1))


class CSPDarknet(nn.Module):
    """Backbone; returns the stride 8, 16, 32 features (dark3, dark4, dark5)."""

    def __init__(self, depth: float, width: float):
        super().__init__()
        base = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, base)
        self.dark2 = nn.Sequential(DWConvAct(base, base * 2, 3, 2), CSPLayer(base * 2, base * 2, n))
        self.dark3 = nn.Sequential(DWConvAct(base * 2, base * 4, 3, 2), CSPLayer(base * 4, base * 4, 3 * n))
        self.dark4 = nn.Sequential(DWConvAct(base * 4, base * 8, 3, 2), CSPLayer(base * 8, base * 8, 3 * n))
        self.dark5 = nn.Sequential(
            DWConvAct(base * 8, base * 16, 3, 2),
            SPPBottleneck(base * 16, base * 16),
            CSPLayer(base * 16, base * 16, n, shortcut=False),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class PAFPN(nn.Module):
    """Top-down then bottom-up feature pyramid over the three backbone levels."""

    def __init__(self, depth: float, width: float):
        super().__init__()
        n = max(round(depth * 3), 1)
        c3, c4, c5 = (int(c * width) for c in (256, 512, 1024))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = ConvAct(c5, c4, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, shortcut=False)
        self.reduce_conv1 = ConvAct(c4, c3, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, shortcut=False)
        self.bu_conv2 = DWConvAct(c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, shortcut=False)
        self.bu_conv1 = DWConvAct(c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, shortcut=False)

    def forward(
        self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2, x1, x0 = features
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(torch.cat((self.upsample(fpn_out0), x1), dim=1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat((self.upsample(fpn_out1), x2), dim=1))
        pan_out1 = self.C3_n3(torch.cat((self.bu_conv2(pan_out2), fpn_out1), dim=1))
        pan_out0 = self.C3_n4(torch.cat((self.bu_conv1(pan_out1), fpn_out0), dim=1))
        return pan_out2, pan_out1, pan_out0


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1x1 stem, then separate class and box/objectness towers."""

    def __init__(self, num_classes: int, width: float):
        super().__init__()
        hidden = int(256 * width)
        in_channels = [int(c * width) for c in (256, 512, 1024)]
        self.stems = nn.ModuleList(ConvAct(c, hidden, 1) for c in in_channels)
        self.cls_convs = nn.ModuleList(
            nn.Sequential(DWConvAct(hidden, hidden, 3), DWConvAct(hidden, hidden, 3)) for _ in in_channels
        )
        self.reg_convs = nn.ModuleList(
            nn.Sequential(DWConvAct(hidden, hidden, 3), DWConvAct(hidden, hidden, 3)) for _ in in_channels
        )
        self.cls_preds = nn.ModuleList(nn.Conv2d(hidden, num_classes, 1) for _ in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(hidden, 4, 1) for _ in in_channels)
        self.obj_preds = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in in_channels)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outputs = []
        for level, x in enumerate(features):
            x = self.stems[level](x)
            cls_out = self.cls_preds[level](self.cls_convs[level](x))
            reg_feat = self.reg_convs[level](x)
            reg_out = self.reg_preds[level](reg_feat)
            obj_out = self.obj_preds[level](reg_feat)
            out = torch.cat((reg_out, obj_out.sigmoid(), cls_out.sigmoid()), dim=1)
            outputs.append(out.flatten(start_dim=2))
        return torch.cat(outputs, dim=2).permute(0, 2, 1)


class YOLOX(nn.Module):
    """YOLOX with depthwise convs (the nano family).

    Args:
        num_classes: 80 for COCO, 1 for the person-only detector.
        depth: depth multiplier (0.33 for nano).
        width: channel multiplier (0.25 for nano).

    Shape:
        - Input: [N, 3, H, W], BGR 0-255 letterboxed, H and W multiples of 32.
        - Output: [N, A, 5 + num_classes] with A = HW/64 + HW/256 + HW/1024 anchors (strides 8, 16, 32,
          row-major per level); columns are raw x, y, log w, log h offsets, then sigmoided objectness and
          class probabilities.
    """

    def __init__(self, num_classes: int = 80, depth: float = 0.33, width: float = 0.25):
        super().__init__()
        self.backbone = CSPDarknet(depth, width)
        self.neck = PAFPN(depth, width)
        self.head = YOLOXHead(num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"YOLOX needs [N, 3, H, W] with H, W multiples of 32, got {tuple(x.shape)}")
        return self.head(self.neck(self.backbone(x)))


def build_yolox_nano() -> YOLOX:
    return YOLOX(num_classes=80)


def build_light_person() -> YOLOX:
    return YOLOX(num_classes=1)


def load_yolox_weights(module: nn.Module, path: Path) -> None:
    """Copy a YOLOX-nano-family ONNX file's conv weights into ``module`` (built by the matching builder)."""
    load_convs_in_order(module, read_onnx_convs(path), torch.zeros(1, 3, 64, 64))


load_yolox_nano_weights = load_yolox_weights
load_light_person_weights = load_yolox_weights

_KAZUHITO_PIPELINE = (
    "https://raw.githubusercontent.com/Kazuhito00/Detection-PoseEstimation-Pipeline/"
    "7121ff80014612e72c5ebb950e698bd5b1ac53f2/Detector/"
)

YOLOX_NANO_SPEC = register_model(
    ModelSpec(
        name="yolox-nano",
        task="detect",
        input_size=(416, 416),
        build=build_yolox_nano,
        preprocess=preprocess_yolox,
        postprocess=postprocess_yolox,
        weights="yolox_nano_416.onnx",
        load_weights=load_yolox_nano_weights,
        labels=COCO_LABELS,
        license="Apache-2.0 (YOLOX by Megvii)",
        source=(
            "https://raw.githubusercontent.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/"
            "3d4f1119d0694200671c08069ecb847aa0d8495a/model/yolox_nano.onnx"
        ),
    )
)

LIGHT_PERSON_SPEC = register_model(
    ModelSpec(
        name="light-person",
        task="detect",
        input_size=(192, 192),
        build=build_light_person,
        preprocess=preprocess_yolox,
        postprocess=postprocess_yolox,
        weights="light_person_detector.onnx",
        load_weights=load_light_person_weights,
        labels=("person",),
        license="Apache-2.0",
        source=_KAZUHITO_PIPELINE + "light_person_detector/model/model.onnx",
    )
)
