"""Dense convolutions on oneDNN where PyTorch would pick its slower native (THNN) kernel.

PyTorch sends an ungrouped batch-1 convolution whose input holds at most 20480 values, with kernels of at
most 3 on a side, to its native im2col kernel instead of oneDNN (``use_mkldnn`` in ATen's convolution: "for
some case, native is faster"). For HRNet-w32's 8x8 branch (3x3, 256 -> 256 channels) that kernel took 427 us
against 246 us through ``aten::mkldnn_convolution`` called directly, 2 threads; 64 channels at 16x16: 119 vs
82 us; but 32 channels at 16x16 (2.4 M multiply-adds): 41 vs 48 us. So the convolutions PyTorch would run
natively go to oneDNN from ``ONEDNN_FROM_MACS`` on. Used by the dense baseline (``use_onednn``) and by the
sparse backend's plain frames, so that neither side of a comparison runs the slower kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

NATIVE_MAX_NUMEL = 20480  # PyTorch's bound for the native kernel (batch 1, ungrouped, kernels up to 3)
ONEDNN_FROM_MACS = 4_000_000


def prefers_onednn(x: torch.Tensor, weight: torch.Tensor, stride, groups: int) -> bool:
    """Whether PyTorch would run this convolution natively where oneDNN is faster (the cheap tests first:
    it runs on every plain frame)."""
    if groups != 1 or x.numel() > NATIVE_MAX_NUMEL or x.dim() != 4 or x.shape[0] != 1:
        return False
    kh, kw = weight.shape[-2:]
    if kh > 3 and kw > 3:  # (those go to oneDNN already)
        return False
    sh, sw = _pair(stride)
    outputs = (x.shape[-2] // sh) * (x.shape[-1] // sw)
    if outputs * weight.shape[0] * weight.shape[1] * kh * kw < ONEDNN_FROM_MACS:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (zero padding given as numbers), on oneDNN where PyTorch would pick the slower kernel."""
    if isinstance(padding, str) or not prefers_onednn(x, weight, stride, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return torch.ops.aten.mkldnn_convolution(
        x, weight, bias, list(_pair(padding)), list(_pair(stride)), list(_pair(dilation)), groups
    )


class OneDNNConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose zero-padded convolutions go through ``conv2d`` above."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def use_onednn(model: nn.Module) -> nn.Module:
    """``model`` with each plain ``nn.Conv2d`` (not a subclass) running as ``OneDNNConv2d``, in place: the
    same parameters, buffers and hooks."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = OneDNNConv2d
    return model
