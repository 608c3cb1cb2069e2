"""tf-pose-estimation's MobileNetV2 OpenPose (PINTO0309's 368x432 export) as a native PyTorch module.

Why native: the skip-convolution engine needs real ``nn.Conv2d`` layers to replace, and the published files
are TFLite. The graph below is the one inside ``mobilenet_v2_pose_dm{05,10,14}_368_432_weight_quant.tflite``
(read op by op with :mod:`skipconv_cli.models.tflite_weights`):

* backbone: MobileNetV2 (TF-slim layer names ``Conv``, ``expanded_conv`` ... ``expanded_conv_12``) up to
  stride 16, width ``0.5 / 1.0 / 1.4``, ReLU6, batch norm already folded into conv biases;
* features: ``concat(expanded_conv_5 (stride 8), upsample2x(expanded_conv_12 (stride 16)))``, the 2x
  upsample being TF's legacy bilinear resize (``align_corners=False, half_pixel_centers=False``);
* head: 6 OpenPose stages, each two branches (``L1``: 38 PAF channels, ``L2``: 19 heatmap channels) of five
  separable convs (depthwise without activation, pointwise + ReLU except the last); stages 2-6 read
  ``concat(L1, L2, features)`` of the previous stage;
* output: ``concat(L2, L1)`` of stage 6 = [N, 57, H/8, W/8]: 18 COCO-18 heatmaps, background, 19 PAF (x, y).

TF "SAME" padding is asymmetric for stride-2 convs on even sizes (all the padding goes right/bottom), so
strided convs get a :class:`PadSame` in front of a ``padding=0`` conv; stride-1 convs use PyTorch's symmetric
padding, which is identical. The input is BGR 0-255 without normalisation.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
from torch import nn

from skipconv_cli.engine import register_zero_pad
from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.pose import COCO18_KEYPOINTS, postprocess_openpose, preprocess_openpose
from skipconv_cli.models.registry import ModelSpec, register_model

NUM_HEATMAPS = 19  # 18 COCO-18 keypoints + background
NUM_PAFS = 38  # 19 limbs x (x, y)

# (expansion t, output channels at width 1.0, repeats n, first stride s): MobileNetV2's table cut at
# expanded_conv_12 (stride 16), the last layer tf-pose uses.
_INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
)
_FEATURE_BLOCK = 5  # expanded_conv_5: the stride-8 feature concatenated with the upsampled stride-16 one


# ---------------------------------------------------------------------------------------------- padding
def get_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total padding TF "SAME" adds along one axis of length ``size`` (split left = total // 2)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def is_static_pad(kernel: int, stride: int = 1, dilation: int = 1) -> bool:
    """True when "SAME" padding is symmetric and independent of the input size (stride 1, odd kernel)."""
    return stride == 1 and (dilation * (kernel - 1)) % 2 == 0


def same_padding(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) TF "SAME" adds to ``x`` [N, C, H, W]: the odd pixel at the bottom, right."""
    ph = get_same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    pw = get_same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def pad_same(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """Zero-pad ``x`` [N, C, H, W] as TF "SAME" does (see ``same_padding``)."""
    left, right, top, bottom = same_padding(x, kernel, stride, dilation)
    ph, pw = top + bottom, left + right
    if ph == 0 and pw == 0:
        return x
    # written out instead of F.pad, which took ~1.8x as long on channels_last maps (openpose-mbv2-14's
    # stride-2 convs: 2.0 vs 1.1 ms on [1, 144, 184, 216])
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, h + ph, w + pw), dtype=x.dtype, device=x.device, memory_format=layout)
    out[:, :, :top].zero_()
    out[:, :, top + h :].zero_()
    out[:, :, top : top + h, :left].zero_()
    out[:, :, top : top + h, left + w :].zero_()
    out[:, :, top : top + h, left : left + w] = x
    return out


class PadSame(nn.Module):
    """TF "SAME" padding decided from the input size at run time (timm's dynamic case).

    A separate module (not a ``Conv2d`` subclass) so that the conv after it stays a plain ``nn.Conv2d`` that
    the skip-convolution converter can swap without losing the padding.
    """

    def __init__(self, kernel: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel = (kernel, kernel)
        self.stride = (stride, stride)
        self.dilation = (dilation, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel[0]}, stride={self.stride[0]}"

    def padding(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) that ``pad_same`` adds to ``x``."""
        return same_padding(x, self.kernel, self.stride, self.dilation)


# the sparse backend keeps the padded map and copies in only what changed (``engine.register_zero_pad``)
register_zero_pad(PadSame, PadSame.padding)


# ---------------------------------------------------------------------------------------------- upsample
@functools.lru_cache(maxsize=16)
def _legacy_bilinear_matrix(
    in_size: int, out_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[out_size, in_size]: row ``o`` holds the two weights of TF1's sampling ``src = o * in / out``."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    i0 = src.floor().clamp(max=in_size - 1)
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=in_size - 1)
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows, i0), 1 - frac, accumulate=True)
    matrix.index_put_((rows, i1), frac, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def resize_bilinear_tf_legacy(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` of x [N, C, H, W] to ``size``.

    Sampling is asymmetric: ``src = dst * in / out`` with the upper neighbour clamped to the last row. For
    2x this copies even outputs and averages neighbours for odd ones, the last odd one repeating the edge.
    ``F.interpolate(align_corners=False)`` uses half-pixel centres instead and differs by ~0.4 at the
    model output, so the sampling is written out here: separable, one matrix product per axis, in the
    input's memory layout. (Gathering neighbour rows with ``index_select`` took 3.7 ms a frame on
    openpose-mbv2-14 at 368x432 and returned a contiguous map from a channels_last one, which every conv
    of the stages then converted back.)
    """
    n, c, h, w = x.shape
    rows = _legacy_bilinear_matrix(h, size[0], x.dtype, x.device)
    cols = _legacy_bilinear_matrix(w, size[1], x.dtype, x.device)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        pixels = x.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
        resized = torch.matmul(rows, pixels.reshape(n, h, w * c))  # [N, H', W * C]
        resized = torch.matmul(cols, resized.reshape(n * size[0], w, c))  # [N * H', W', C]
        return resized.reshape(n, size[0], size[1], c).permute(0, 3, 1, 2)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class UpsampleTfLegacy(nn.Module):
    """Module wrapper of :func:`resize_bilinear_tf_legacy` that resizes to a reference tensor's size."""

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return resize_bilinear_tf_legacy(x, (like.shape[-2], like.shape[-1]))


# ---------------------------------------------------------------------------------------------- layers
class ConvAct(nn.Module):
    """``[PadSame] -> nn.Conv2d(bias=True) -> activation``: one TFLite conv op with its fused activation.

    Args:
        in_channels, out_channels, kernel, stride: as ``nn.Conv2d``.
        groups: ``in_channels`` for a depthwise conv.
        act: ``"relu6"``, ``"relu"`` or ``"none"`` (the file's fused activation).
    """

    _ACTS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "none": nn.Identity}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu6",
    ) -> None:
        super().__init__()
        if act not in self._ACTS:
            raise ValueError(f"act must be one of {sorted(self._ACTS)}, got {act!r}")
        static = is_static_pad(kernel, stride)
        self.pad = nn.Identity() if static else PadSame(kernel, stride)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride,
            padding=(kernel - 1) // 2 if static else 0,
            groups=groups,
        )
        self.act_name = act
        self.act = self._ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.pad(x)))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """TF-slim's channel rounding: nearest multiple of ``divisor``, never more than 10% below ``value``."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class InvertedResidual(nn.Module):
    """MobileNetV2 block ``expanded_conv_i``: [1x1 expand] -> 3x3 depthwise -> 1x1 project (+ residual)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expansion) if expansion != 1 else in_channels
        self.expand = ConvAct(in_channels, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = ConvAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvAct(hidden, out_channels, 1, act="none")
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class MobileNetV2Features(nn.Module):
    """MobileNetV2 to stride 16 returning the stride-8 (block 5) and stride-16 (block 12) features."""

    def __init__(self, width: float) -> None:
        super().__init__()
        channels = make_divisible(32 * width)
        self.stem = ConvAct(3, channels, 3, stride=2)
        blocks: list[nn.Module] = []
        for expansion, base, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
            out = make_divisible(base * width)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out, first_stride if i == 0 else 1, expansion))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.channels_s8 = self.blocks[_FEATURE_BLOCK].project.conv.out_channels
        self.channels_s16 = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        s8 = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == _FEATURE_BLOCK:
                s8 = x
        return s8, x


class SeparableConv(nn.Module):
    """tf-pose ``separable_conv``: depthwise (no activation), then pointwise + ReLU (none on the last)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, relu: bool = True) -> None:
        super().__init__()
        self.depthwise = ConvAct(in_channels, in_channels, kernel, groups=in_channels, act="none")
        self.pointwise = ConvAct(in_channels, out_channels, 1, act="relu" if relu else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _branch(in_channels: int, width: int, last_hidden: int, out_channels: int) -> nn.Sequential:
    """Five separable convs: 3x3, 3x3, 3x3 at ``width``; 1x1 to ``last_hidden``; 1x1 to the outputs."""
    return nn.Sequential(
        SeparableConv(in_channels, width, 3),
        SeparableConv(width, width, 3),
        SeparableConv(width, width, 3),
        SeparableConv(width, last_hidden, 1),
        SeparableConv(last_hidden, out_channels, 1, relu=False),
    )


class OpenPoseStage(nn.Module):
    """One refinement stage: a PAF branch (``L1``, 38 ch) and a heatmap branch (``L2``, 19 ch)."""

    def __init__(self, in_channels: int, width: int, last_hidden: int) -> None:
        super().__init__()
        self.paf = _branch(in_channels, width, last_hidden, NUM_PAFS)
        self.heatmap = _branch(in_channels, width, last_hidden, NUM_HEATMAPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.paf(x), self.heatmap(x)


class OpenPoseMobileNetV2(nn.Module):
    """tf-pose MobileNetV2 OpenPose.

    Args:
        width: backbone depth multiplier (0.5, 1.0 or 1.4 in the published files).
        stage_width: channels of the OpenPose stages (64 for width 0.5, else 128).
        num_stages: OpenPose stages (6).

    Shape:
        input [N, 3, H, W] BGR 0-255 (H, W multiples of 32 for the TF-exact graph; other sizes run too);
        output [N, 57, H/8, W/8]: heatmaps 0-17 (COCO-18 order), 18 background, 19-56 PAF (x, y) pairs.

    Examples:
        >>> model = openpose_mbv2_14()
        >>> load_tflite_weights(model, Path("mobilenet_v2_pose_dm14_368_432_weight_quant.tflite"))
        >>> model(torch.zeros(1, 3, 368, 432)).shape
        torch.Size([1, 57, 46, 54])
    """

    def __init__(self, width: float = 1.0, stage_width: int = 128, num_stages: int = 6) -> None:
        super().__init__()
        self.width = width
        self.backbone = MobileNetV2Features(width)
        self.upsample = UpsampleTfLegacy()
        feat = self.backbone.channels_s8 + self.backbone.channels_s16
        stages = [OpenPoseStage(feat, stage_width, 4 * stage_width)]
        stages += [
            OpenPoseStage(feat + NUM_PAFS + NUM_HEATMAPS, stage_width, stage_width)
            for _ in range(num_stages - 1)
        ]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s8, s16 = self.backbone(x)
        feat = torch.cat([s8, self.upsample(s16, s8)], dim=1)
        paf, heat = self.stages[0](feat)
        for stage in self.stages[1:]:
            paf, heat = stage(torch.cat([paf, heat, feat], dim=1))
        return torch.cat([heat, paf], dim=1)


def openpose_mbv2_05() -> OpenPoseMobileNetV2:
    """Width 0.5 backbone, 64-channel stages (``dm05``)."""
    return OpenPoseMobileNetV2(width=0.5, stage_width=64)


def openpose_mbv2_10() -> OpenPoseMobileNetV2:
    """Width 1.0 backbone, 128-channel stages (``dm10``)."""
    return OpenPoseMobileNetV2(width=1.0, stage_width=128)


def openpose_mbv2_14() -> OpenPoseMobileNetV2:
    """Width 1.4 backbone, 128-channel stages (``dm14``)."""
    return OpenPoseMobileNetV2(width=1.4, stage_width=128)


# ---------------------------------------------------------------------------------------------- weights
_BACKBONE_NAME = re.compile(r"^MobilenetV2/(Conv|expanded_conv(?:_(\d+))?)/(expand|depthwise|project)?")
_STAGE_NAME = re.compile(r"^Openpose/MConv_Stage(\d+)_L([12])_(\d)_(depthwise|pointwise)/")


def tflite_name_to_module(name: str) -> str | None:
    """Map a TFLite weight name onto the :class:`ConvAct` that holds it (timm's checkpoint filter).

    ``MobilenetV2/expanded_conv_3/expand/weights`` -> ``backbone.blocks.3.expand``;
    ``Openpose/MConv_Stage2_L1_4_pointwise/weights`` -> ``stages.1.paf.3.pointwise``; None when unknown.
    """
    m = _BACKBONE_NAME.match(name)
    if m:
        if m.group(1) == "Conv":
            return "backbone.stem"
        return f"backbone.blocks.{int(m.group(2) or 0)}.{m.group(3)}"
    m = _STAGE_NAME.match(name)
    if m:
        stage, branch, layer, kind = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return f"stages.{stage - 1}.{'paf' if branch == '1' else 'heatmap'}.{layer - 1}.{kind}"
    return None


_TFLITE_ACTS = {"RELU6": "relu6", "RELU": "relu", "NONE": "none"}


def load_tflite_weights(model: nn.Module, path: Path) -> None:
    """Copy the (int8-dequantized) conv weights of a tf-pose TFLite file into ``model``.

    Every conv of the file must land on a :class:`ConvAct` of the same shape and activation, and every
    ``ConvAct`` must receive one; otherwise the file is not this architecture.

    Raises:
        SkipconvError: unreadable file, or names / shapes / activations that do not match.
    """
    from skipconv_cli.models.tflite_weights import TfliteModel

    tfl = TfliteModel(path)
    targets = {name: m for name, m in model.named_modules() if isinstance(m, ConvAct)}
    loaded: set[str] = set()
    with torch.no_grad():
        for layer in tfl.conv_layers():
            target_name = tflite_name_to_module(layer.name)
            if target_name is None or target_name not in targets:
                raise SkipconvError(f"{path}: weight {layer.name!r} has no place in {type(model).__name__}")
            target = targets[target_name]
            if tuple(target.conv.weight.shape) != layer.weight.shape:
                raise SkipconvError(
                    f"{path}: {layer.name} has shape {layer.weight.shape}, "
                    f"{target_name} expects {tuple(target.conv.weight.shape)} (wrong width?)"
                )
            if (
                _TFLITE_ACTS.get(layer.activation) != target.act_name
                or tuple(layer.stride) != target.conv.stride
            ):
                raise SkipconvError(
                    f"{path}: {layer.name} is {layer.activation} stride {layer.stride}, "
                    f"{target_name} is {target.act_name} stride {target.conv.stride}"
                )
            target.conv.weight.copy_(torch.from_numpy(layer.weight))
            if layer.bias is None:
                target.conv.bias.zero_()
            else:
                target.conv.bias.copy_(torch.from_numpy(layer.bias))
            loaded.add(target_name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise SkipconvError(f"{path}: no weights for {len(missing)} layers, e.g. {missing[:3]}")


_PINTO_URL = (
    "https://raw.githubusercontent.com/PINTO0309/MobileNetV2-PoseEstimation/"
    "d4a4b5419ea4506a41deb960a2573759de40bd6e/models/train/test/tflite/posttraing_quantization/"
)
_PUBLISHED = (
    ("05", openpose_mbv2_05),
    ("10", openpose_mbv2_10),
    ("14", openpose_mbv2_14),
)
for _dm, _build in _PUBLISHED:
    _file = f"mobilenet_v2_pose_dm{_dm}_368_432_weight_quant.tflite"
    register_model(
        ModelSpec(
            name=f"openpose-mbv2-{_dm}",
            task="pose",
            input_size=(368, 432),
            build=_build,
            preprocess=preprocess_openpose,
            postprocess=postprocess_openpose,
            weights=_file,
            load_weights=load_tflite_weights,
            labels=COCO18_KEYPOINTS,
            license="MIT",
            source=_PINTO_URL + _file,
            default_score_threshold=0.4,  # tf-pose's THRESH_HUMAN_SCORE
            extra={"output_stride": 8},
        )
    )
