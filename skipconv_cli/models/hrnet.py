"""HRNet-W32 for pose (Sun et al., CVPR 2019), the model the Skip-Convolutions paper evaluates on.

Written after the official ``deep-high-resolution-net.pytorch`` ``pose_hrnet.py`` with its ``w32`` config,
module for module (``conv``/``bn`` names, bias-free convs followed by ``BatchNorm2d``), so that a published
state_dict would load as is and a converter can fold BN into the convs:

* stem: two 3x3 stride-2 convs (64 channels) -> stride 4;
* stage 1: 4 bottleneck blocks (256 channels);
* stages 2-4: 1 / 4 / 3 modules with 2 / 3 / 4 branches (32, 64, 128, 256 channels, strides 4-32), each
  branch 4 basic blocks, then a fuse layer that adds every branch into every other (1x1 conv + nearest
  upsample from lower resolutions, chains of 3x3 stride-2 convs from higher ones); the last module keeps
  only the stride-4 branch;
* head: 1x1 conv to 17 COCO-17 heatmaps at 1/4 input resolution.

No public weights are reachable from this project, so the registered ``hrnet-w32`` is randomly initialised
(seeded, deterministic) and only serves to benchmark compute: its keypoints mean nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from skipconv_cli.models.pose import COCO18_KEYPOINTS, postprocess_heatmap_argmax, preprocess_imagenet
from skipconv_cli.models.registry import ModelSpec, register_model

NUM_JOINTS = 17
BN_MOMENTUM = 0.1


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv without bias (a BatchNorm follows), padding 1."""
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (``expansion`` 1)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) conv-BN layers with a shortcut."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def _make_layer(
    block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int
) -> nn.Sequential:
    """``blocks`` blocks; the first gets a 1x1 conv-BN shortcut when the channel count changes."""
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
        )
    layers = [block(inplanes, planes, 1, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of basic blocks, then the exchange (fuse) between all resolutions.

    Args:
        channels: per branch (branch i has stride 4 * 2**i).
        num_blocks: basic blocks per branch.
        multi_scale_output: False keeps only the highest-resolution output (the network's last module).
    """

    def __init__(self, channels: list[int], num_blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.multi_scale_output = multi_scale_output
        self.branches = nn.ModuleList(_make_layer(BasicBlock, c, c, num_blocks) for c in channels)
        self.fuse_layers = self._make_fuse_layers(channels)
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self, channels: list[int]) -> nn.ModuleList:
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches if self.multi_scale_output else 1):
            row = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:  # lower resolution: 1x1 conv to branch i's width, then nearest upsample
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(channels[j], channels[i], 1, bias=False),
                            nn.BatchNorm2d(channels[i], momentum=BN_MOMENTUM),
                            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                        )
                    )
                elif j == i:
                    row.append(nn.Identity())
                else:  # higher resolution: (i - j) stride-2 3x3 convs, ReLU between, none after the last
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out_c = channels[i] if last else channels[j]
                        layers: list[nn.Module] = [
                            conv3x3(channels[j], out_c, 2),
                            nn.BatchNorm2d(out_c, momentum=BN_MOMENTUM),
                        ]
                        if not last:
                            layers.append(nn.ReLU(inplace=False))
                        steps.append(nn.Sequential(*layers))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(row)
        return fuse_layers

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for row in self.fuse_layers:
            y = row[0](xs[0])
            for j in range(1, self.num_branches):
                y = y + row[j](xs[j])
            out.append(self.relu(y))
        return out


def _transition(pre_channels: list[int], channels: list[int]) -> nn.ModuleList:
    """Adapts each kept branch's width (3x3 conv) and creates new branches with stride-2 3x3 convs."""
    layers = nn.ModuleList()
    for i, out_c in enumerate(channels):
        if i < len(pre_channels):
            if out_c != pre_channels[i]:
                layers.append(
                    nn.Sequential(
                        conv3x3(pre_channels[i], out_c),
                        nn.BatchNorm2d(out_c, momentum=BN_MOMENTUM),
                        nn.ReLU(inplace=False),
                    )
                )
            else:
                layers.append(nn.Identity())
        else:
            steps = []
            for k in range(i + 1 - len(pre_channels)):
                in_c = pre_channels[-1]
                step_out = out_c if k == i - len(pre_channels) else in_c
                steps.append(
                    nn.Sequential(
                        conv3x3(in_c, step_out, 2),
                        nn.BatchNorm2d(step_out, momentum=BN_MOMENTUM),
                        nn.ReLU(inplace=False),
                    )
                )
            layers.append(nn.Sequential(*steps))
    return layers


class PoseHighResolutionNet(nn.Module):
    """HRNet pose network (``pose_hrnet`` of the official code).

    Args:
        width: channels of the highest-resolution branch (32 for W32, 48 for W48).
        num_joints: heatmaps out (17 COCO keypoints).
        stage_modules: modules in stages 2, 3, 4 (1, 4, 3).
        num_blocks: basic blocks per branch (4).

    Shape:
        input [N, 3, H, W] (RGB, ImageNet mean/std; H, W multiples of 32); output [N, 17, H/4, W/4].

    Examples:
        >>> hrnet_w32()(torch.zeros(1, 3, 256, 256)).shape
        torch.Size([1, 17, 64, 64])
    """

    def __init__(
        self,
        width: int = 32,
        num_joints: int = NUM_JOINTS,
        stage_modules: tuple[int, int, int] = (1, 4, 3),
        num_blocks: int = 4,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = _make_layer(Bottleneck, 64, 64, 4)

        pre = [64 * Bottleneck.expansion]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s, num_modules in enumerate(stage_modules):
            channels = [width * 2**i for i in range(s + 2)]
            self.transitions.append(_transition(pre, channels))
            last_stage = s == len(stage_modules) - 1
            self.stages.append(
                nn.Sequential(
                    *(
                        HighResolutionModule(channels, num_blocks, not (last_stage and m == num_modules - 1))
                        for m in range(num_modules)
                    )
                )
            )
            pre = channels
        self.final_layer = nn.Conv2d(width, num_joints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for transition, stage in zip(self.transitions, self.stages, strict=True):
            # Kept branches adapt their own output; a new branch grows from the lowest resolution.
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            xs = stage(xs)
        return self.final_layer(xs[0])


def init_random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights that keep activations O(1) through the depth (for benchmarks).

    Kaiming-normal convs; the last BatchNorm of each residual branch (x0.1) and of each fuse path (x0.3)
    scaled down so that sums of residuals and fused branches do not blow up (the feature std stays in
    0.7-2.2 through all modules at 256x256 for unit-variance input); the head scaled so heatmaps have a
    std of about 0.4. BN running stats stay at mean 0 / var 1. Uses its own generator, so the caller's
    RNG state is untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for m in model.modules():
            if isinstance(m, BasicBlock):
                m.bn2.weight.fill_(0.1)
            elif isinstance(m, Bottleneck):
                m.bn3.weight.fill_(0.1)
            elif isinstance(m, HighResolutionModule):
                for row in m.fuse_layers:
                    for layer in row:
                        for bn in layer.modules():
                            if isinstance(bn, nn.BatchNorm2d):
                                bn.weight.fill_(0.3)
        if isinstance(model, PoseHighResolutionNet):
            model.final_layer.weight.mul_(0.1)
    return model


def hrnet_w32() -> PoseHighResolutionNet:
    """HRNet-W32 with deterministic random weights (no public checkpoint is reachable)."""
    return init_random(PoseHighResolutionNet(width=32))


register_model(
    ModelSpec(
        name="hrnet-w32",
        task="pose",
        input_size=(256, 256),
        build=hrnet_w32,
        preprocess=preprocess_imagenet,
        postprocess=postprocess_heatmap_argmax,
        weights=None,
        load_weights=None,
        labels=COCO18_KEYPOINTS,
        license="MIT",
        source="https://github.com/leoxiaobin/deep-high-resolution-net.pytorch",
        default_score_threshold=0.0,
        extra={
            "random_weights": True,
            "note": "random-weight HRNet-W32 for compute benchmarks only; keypoints are meaningless",
            "output": "17 COCO-17 heatmaps at stride 4, mapped to COCO-18 by argmax (neck = mid-shoulders)",
        },
    )
)
