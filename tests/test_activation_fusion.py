"""Activations fused into the conv that alone feeds them (engine.activations): which convs fuse, and the
outputs stay those of the unconverted model, on the C++ step, the PyTorch tile path and plain frames."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skipconv_cli as sc
from skipconv_cli.engine import fuse_activations, skip_layers
from skipconv_cli.engine.activations import CLAMP, SILU, FusedActivation


class PadSame(nn.Module):
    """TF 'same' padding computed from the input's shape: control flow a symbolic trace cannot follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            return F.pad(x, (1, 1, 1, 1))
        return F.pad(x, (0, 1, 0, 1))


class SameConvAct(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pad = PadSame()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.pad(x)))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)  # shared: after the stem (fusable) and after the add (not)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)  # read by the add and by the output: not fusable
        self.mix = nn.Conv2d(8, 8, 1)
        self.silu = nn.SiLU()
        self.down = SameConvAct(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.relu(self.bn(self.stem(x)))
        b = self.branch(a)
        c = self.relu(a + b)
        d = self.silu(self.mix(c))
        return self.down(d), b


class Net(nn.Module):
    """Control flow in the root's own forward: its children are traced one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, branch = self.body(x)
        if x.shape[0] > 0:
            return down.sum() + branch.sum() * 0 + down
        return down


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    bn = net.body.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net


def frames(count: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(1)
    stream = [torch.rand(1, 3, 40, 48)]
    for i in range(count - 1):
        frame = stream[-1].clone()
        y, x = 8 * (i % 4), 5 * (i % 7)
        frame[..., y : y + 6, x : x + 9] += 0.4 * torch.rand(1, 3, 6, 9)
        stream.append(frame)
    return stream


def test_only_convs_read_by_an_activation_alone_are_fused() -> None:
    model = sc.convert(make_net(), threshold=0.0, block=2, backend="sparse")
    fused = {name: layer.fused_activation for name, layer in skip_layers(model)}
    assert fused == {
        "body.stem": (CLAMP, 0.0, float("inf")),  # through its folded BatchNorm
        "body.branch": None,  # also read by the add and returned
        "body.mix": (SILU, 0.0, 0.0),
        "body.down.conv": (CLAMP, 0.0, 6.0),  # inside a module traced on its own after PadSame failed
    }
    assert isinstance(model.body.relu, FusedActivation) and isinstance(model.body.down.act, FusedActivation)


# the tile path pinned, the busy path pinned (every frame with a change taken whole), or tuned
@pytest.mark.parametrize("crossover", [1.0, 0.0, None])
def test_fused_outputs_equal_the_unconverted_model(monkeypatch, tmp_path, kernel: str, crossover) -> None:
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path))
    net = make_net()
    model = sc.convert(net, threshold=0.0, block=2, backend="sparse")
    for _, layer in skip_layers(model):
        layer.crossover = crossover
    with torch.no_grad():
        for frame in frames():
            torch.testing.assert_close(model(frame), net(frame), rtol=1e-5, atol=1e-5)
    states = [layer._sparse_state for _, layer in skip_layers(model)]
    native = [state.maps is not None for state in states if not state.plain_forever]
    assert all(native) if kernel != "torch" else not any(native)
    pixels = [state.maps.pixel_weight is not None for state in states if state.maps is not None]
    assert all(pixels) if kernel == "native" else not any(pixels)  # make_net has no grouped conv
    tile_frames = sum(layer.backend_stats()["sparse_frames"] for _, layer in skip_layers(model))
    if crossover == 1.0:
        assert tile_frames > 0
    elif crossover == 0.0:
        assert tile_frames == 0


def test_reference_backend_and_dense_baseline_keep_the_outputs() -> None:
    net = make_net()
    # fusion is the sparse backend's: passes through
    reference = sc.convert(net, threshold=0.0, block=2, backend="reference")
    baseline = fuse_activations(net)
    with torch.no_grad():
        for frame in frames(4):
            expected = net(frame)
            torch.testing.assert_close(reference(frame), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(baseline(frame), expected, rtol=1e-5, atol=1e-5)
