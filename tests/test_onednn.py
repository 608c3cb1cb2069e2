"""Dense convolutions that PyTorch would run on its native kernel go to oneDNN where that is faster, with
the same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import skipconv_cli as sc
from skipconv_cli.engine import onednn


@pytest.mark.parametrize(
    ("shape", "out_channels", "groups", "routed"),
    [
        ((1, 256, 8, 8), 256, 1, True),  # HRNet-w32's 8x8 branch
        ((1, 64, 16, 16), 64, 1, True),
        ((1, 32, 16, 16), 32, 1, False),  # too little work: the native kernel is faster
        ((2, 256, 8, 8), 256, 1, False),  # batches go to oneDNN already
        ((1, 256, 8, 8), 256, 256, False),  # so do grouped convolutions
        ((1, 256, 10, 10), 256, 1, False),  # and inputs above 20480 values
    ],
)
def test_routed_convolution_matches_the_native_one(shape, out_channels, groups, routed) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, shape[1] // groups, 3, 3, generator=generator) * 0.05
    bias = torch.randn(out_channels, generator=generator)
    with torch.no_grad():
        assert onednn.prefers_onednn(x, weight, 1, groups) is routed
        expected = F.conv2d(x, weight, bias, 1, 1, 1, groups)
        got = onednn.conv2d(x, weight, bias, 1, 1, 1, groups)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_gradients_keep_the_native_kernel() -> None:
    x = torch.rand(1, 256, 8, 8, requires_grad=True)
    weight = torch.randn(256, 256, 3, 3)
    assert not onednn.prefers_onednn(x, weight, 1, 1)
    with torch.no_grad():
        assert onednn.prefers_onednn(x, weight, 1, 1)


def test_plain_frames_and_the_dense_baseline_use_it() -> None:
    """A sparse-backend layer on plain frames and a model passed through ``use_onednn`` give the dense
    convolution's output on a map PyTorch would run natively."""
    x = torch.rand(1, 256, 8, 8)
    net = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU()).eval()
    with torch.no_grad():
        expected = net(x)
        routed = sc.engine.use_onednn(sc.engine.fold_batchnorms(net))
        assert type(routed[0]) is onednn.OneDNNConv2d
        assert (routed(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
        layer = sc.convert(net, threshold=0.0, backend="sparse")
        for module in layer.modules():
            if isinstance(module, sc.SkipConv2d):
                module.always_plain = True
        for _ in range(3):
            assert (layer(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
