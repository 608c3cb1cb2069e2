"""A tiny pose-format network for the train-gates tests: `--model tests.gate_models:tiny_pose --task pose`.

Seeded, so every build has the same weights (the CLI builds it afresh in each process). Its output has the
built-in OpenPose layout ([N, 57, H/8, W/8]: 19 heatmaps, 38 PAF channels) so the pose postprocess and
fidelity apply; the weights are random, only the mechanics are under test.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_pose() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 57, 1),
    )
    with torch.no_grad():
        model[0].weight.mul_(1 / 64)  # BGR 0-255 input: keep activations near unit scale
    return model.eval()
