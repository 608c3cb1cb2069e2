"""Multiply-accumulate counts of convolutions and of the gates that decide where they run.

Counts are per sample; a bias add is not a MAC (the same convention as ``torch.utils.flop_counter``,
whose conv FLOPs are 2 x these MACs).
"""

from __future__ import annotations

from torch import nn


def macs_per_output_position(conv: nn.Conv2d) -> int:
    """MACs to compute all output channels of one output pixel."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def conv_macs(conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    """Dense MACs of ``conv`` producing an output of spatial size ``out_hw``."""
    return macs_per_output_position(conv) * out_hw[0] * out_hw[1]


def norm_gate_macs(conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Cost of a norm gate: |r| summed over channels, then a k x k box sum at each output."""
    kh, kw = conv.kernel_size
    return conv.in_channels * in_hw[0] * in_hw[1] + kh * kw * out_hw[0] * out_hw[1]
