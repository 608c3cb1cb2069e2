"""Gates: where a Skip-Convolution recomputes its output (NOTES.md Eq. 5, 7, 8).

All gates see the residual ``r = x - x_ref`` of a layer and return a boolean mask at the layer's output
resolution, one channel, per stream: [N, 1, H_out, W_out].

Norm thresholds are scale-free: a residual estimate is divided by the layer's own scale, measured on the
last dense frame of the stream, so one ``threshold`` means the same in every layer and every model:
- ``input-norm``: support L1 norm of r at p divided by the mean support L1 norm of the dense input.
  ``threshold=0.1`` means "recompute where the input under the kernel changed by more than 10% of a
  typical input patch".
- ``output-norm``: Eq. 7's ||W||_1 * (support L1 norm of r at p), with ||W||_1 taken per weight (the mean
  |W|) and divided by the layer's mean output magnitude mean |z|: the estimated change of the output at p
  relative to a typical output. Dividing Young's bound by the fan-in and by C_out makes one threshold
  comparable across layers: on openpose-mbv2-14 and the person clip, at equal heatmap error it skips 1.7x
  more than the raw bound (3.66x vs 2.15x MAC reduction at max error 0.10). Useful thresholds: 0.03-1.
- ``gumbel``: a learned gate (NOTES.md Eq. 8, see ``GumbelGate``): a one-output-channel conv on |r| with a
  learned non-negative weight per input channel and the layer's kernel support, compared in log space with a
  learned per-layer threshold; fires where its logit is positive (sigmoid > 0.5). Untrained, it is the
  output-norm gate at threshold 1e-6 (open, exact); ``skipconv train-gates`` starts it at 0.01. Like every
  gate it never fires where the residual is exactly zero over the kernel support.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("input-norm", "output-norm", "gumbel")
BLOCK_SIZES = (1, 2, 4, 8)
GUMBEL_TEMPERATURE = 2.0 / 3.0
GUMBEL_OPEN_THRESHOLD = 1e-6  # an untrained Gumbel gate is output-norm at this threshold: open, exact
GUMBEL_LOGIT_SCALE = 4.0  # logit per unit of log(estimate / threshold): how sharply a sampled gate decides


def pad_like_conv(t: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pads ``t`` the way ``conv`` pads its input; returns the tensor and the padding still to apply
    inside ``F.conv2d`` (zero padding is left to the conv, other modes are applied here)."""
    if conv.padding_mode == "zeros":
        return t, conv.padding  # type: ignore[return-value]
    return F.pad(t, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)


def support_sum(t: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Sum of a one-channel map [N, 1, H, W] over the kernel support of every output of ``conv``."""
    padded, padding = pad_like_conv(t, conv)
    ones = t.new_ones((1, 1, *conv.kernel_size))
    return F.conv2d(padded, ones, stride=conv.stride, padding=padding, dilation=conv.dilation)


def blockify(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Makes a gate constant over ``block x block`` tiles of the output: max-pool, then nearest upsample.

    A float (straight-through, training) gate stays float so its gradient reaches the tile's max."""
    if block == 1:
        return mask
    h, w = mask.shape[-2:]
    soft = mask.dtype.is_floating_point
    pooled = F.max_pool2d(mask if soft else mask.to(torch.float32), block, block, ceil_mode=True)
    tiled = pooled.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w]
    return tiled if soft else tiled > 0


def channel_abs_sum(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum(1, keepdim=True)


class GumbelGate(nn.Module):
    """The learned gate of a layer (NOTES.md Eq. 8): where to recompute, from the residual r.

    The paper's gate is a one-output-channel conv on the signed r. A linear function of r cannot measure
    how much r changed (r and -r are the same amount of change), so it must learn a norm from scratch, and
    trained that way it skipped less than the output-norm gate at equal fidelity (measured on
    openpose-mbv2-14: 11.5x vs 28.5x MAC reduction at PCK ~80). This gate is the one-output-channel conv on
    |r| instead, with a non-negative weight per input channel spread over the layer's kernel support
    (``exp(channel_log_weight[c]) * mean|W| / mean|z|``), compared in log space with a learned threshold:

        logit(p) = GUMBEL_LOGIT_SCALE * (log(estimate(p)) - log_threshold)

    With every channel weight 1 the estimate is exactly the output-norm gate's, so a fresh gate is
    output-norm at ``GUMBEL_OPEN_THRESHOLD`` (open wherever the input changed: converting with untrained
    gates is exact), and training learns which channels matter and each layer's threshold. It costs what a
    norm gate costs (a weighted channel sum and a box sum), and log space keeps one learning rate right for
    residuals of any scale.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.channel_log_weight = nn.Parameter(torch.zeros(conv.in_channels, **factory))
        self.log_threshold = nn.Parameter(torch.tensor(math.log(GUMBEL_OPEN_THRESHOLD), **factory))

    def estimate(self, residual: torch.Tensor, conv: nn.Conv2d, out_scale: torch.Tensor) -> torch.Tensor:
        """The weighted output-norm estimate [N, 1, H_out, W_out] (Eq. 7 with learned channel weights)."""
        weights = self.channel_log_weight.exp().view(1, -1, 1, 1)
        weighted = F.conv2d(residual.detach().abs(), weights)
        return support_sum(weighted, conv) * (conv.weight.detach().abs().mean() / out_scale)

    def forward(self, residual: torch.Tensor, conv: nn.Conv2d, out_scale: torch.Tensor) -> torch.Tensor:
        estimate = self.estimate(residual, conv, out_scale)
        return GUMBEL_LOGIT_SCALE * (torch.log(estimate.clamp_min(1e-12)) - self.log_threshold)


def gumbel_sigmoid(logits: torch.Tensor, temperature: float = GUMBEL_TEMPERATURE) -> torch.Tensor:
    """Binary-concrete sample with a hard 0/1 forward value and the soft sample's gradient."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def check_gate_args(gate: str, threshold: float, block: int) -> None:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got {gate!r}")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0; got {threshold!r}")
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {', '.join(map(str, BLOCK_SIZES))}; got {block!r}")
