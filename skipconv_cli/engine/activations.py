"""Activations fused into the convolution that feeds them.

Where a conv's output goes to an activation and nowhere else (found in a symbolic trace), the conv applies
the activation itself: in place on a plain frame's fresh output (no second map-sized tensor), and, in the
sparse backend, only to the outputs a skip frame writes, so the activation follows the sparsity instead of
costing a pass over the whole map every frame (HRNet-w32: ~10 ms a frame of ReLUs; openpose-mbv2: ~10 ms
of ReLU6). The output it hands on carries the activation in ``skipconv_activation``; the activation module,
wrapped in :class:`FusedActivation`, passes such a tensor through. The wrapper is needed because a module
may be shared by several call sites (HRNet's blocks use one ``nn.ReLU`` after a conv and after the residual
add): it applies the activation to everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# kinds, numbered as the C++ step numbers them (skip_step.cpp: Activation)
NONE, CLAMP, SILU = 0, 1, 2
Activation = tuple[int, float, float]  # (kind, lower bound, upper bound); bounds are for CLAMP


def activation_of(module: nn.Module) -> Activation | None:
    """The fusable activation ``module`` computes, or None."""
    if type(module) is nn.ReLU:
        return (CLAMP, 0.0, math.inf)
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        return (CLAMP, float(module.min_val), float(module.max_val))
    if type(module) is nn.SiLU:
        return (SILU, 0.0, 0.0)
    return None


def activate_(t: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Applies ``activation`` to ``t`` in place and marks ``t`` as activated."""
    kind, low, high = activation
    if kind == CLAMP:
        if high == math.inf:
            t.clamp_(min=low)
        else:
            t.clamp_(low, high)
    elif kind == SILU:
        F.silu(t, inplace=True)
    t.skipconv_activation = activation
    return t


class FusedActivation(nn.Module):
    """An activation module whose input may arrive already activated by the conv before it."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        kind = activation_of(activation)
        if kind is None:
            raise ValueError(f"{type(activation).__name__} is not a fusable activation")
        self.activation = activation
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(x, "skipconv_activation", None) == self.kind:
            return x
        return self.activation(x)


class ActivateOutput:
    """Forward hook of a plain ``nn.Conv2d`` whose output only its activation reads (the dense baseline of
    ``fuse_activations``): the activation in place, as a fused conv+activation kernel would."""

    def __init__(self, activation: Activation) -> None:
        self.activation = activation

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return activate_(output, self.activation)
