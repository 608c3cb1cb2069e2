"""Residual sums and nearest upsampling follow the sparsity (``engine.elementwise``): the same values as the
plain ops, bit for bit, while recomputing only what their inputs wrote."""

from __future__ import annotations

import copy
import io
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import skipconv_cli as sc
from skipconv_cli.engine.activations import CLAMP
from skipconv_cli.engine.backends import native, sparse
from skipconv_cli.engine.elementwise import (
    FollowsSparsity,
    SparseConcat,
    SparsePad,
    SparseSum,
    SparseUpsample,
    register_zero_pad,
    upsample_factor,
)
from skipconv_cli.pipeline.profile import state_bytes_per_stream
from tests.archs import build
from tests.conftest import read_frames

convert_module = sys.modules["skipconv_cli.engine.convert"]


class Block(nn.Module):
    """A residual block (sum then a shared ReLU module, as HRNet's), an upsampled branch added back, a sum
    without activation, a broadcasting sum and a sum written into in place (both must stay plain)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.down = nn.Conv2d(16, 16, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.offset = nn.Parameter(torch.randn(1, 16, 1, 1))
        self.head = nn.Conv2d(16, 8, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.relu(self.conv2(self.relu(self.conv1(x))) + x)  # sparse, ReLU fused
        u = self.up(self.down(y)) + y  # sparse, the upsampling too
        z = self.conv3(u) + u  # sparse, no activation
        w = z + self.offset  # broadcasting: plain
        v = self.conv3(w) + z
        v.mul_(1.0)  # written into in place: plain
        return self.head(v + w)


@pytest.fixture(scope="module")
def stream(videos_dir) -> torch.Tensor:
    frames = read_frames(videos_dir / "car-detection.mp4", 16, start=190, size=(96, 64))
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255.0).unsqueeze(1)


@pytest.fixture(autouse=True)
def tuning_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path))
    sparse._MEMORY_CACHE.clear()


def followed_and_plain(net: nn.Module, monkeypatch, **options) -> tuple[nn.Module, nn.Module]:
    """``net`` converted with the ops that follow the sparsity and without them; every layer skipping
    (crossover 1), so that the ops' inputs carry revisions every frame."""
    followed = sc.convert(net, backend="sparse", **options)
    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "follow_sparsity", lambda model: 0)
        plain = sc.convert(net, backend="sparse", **options)
    for converted in (followed, plain):
        for _, layer in sc.engine.skip_layers(converted):
            layer.crossover = 1.0
    return followed, plain


def run(model: nn.Module, stream: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    outputs, gates = [], []
    with torch.no_grad():
        for frame in stream:
            outputs.append(model(frame.contiguous(memory_format=torch.channels_last)))
            gates.append([layer.last_gate for _, layer in sc.engine.skip_layers(model)])
    return outputs, gates


def assert_followed_bit_for_bit(
    net: nn.Module, model: nn.Module, without: nn.Module, stream: torch.Tensor, threshold: float, ops: list
) -> list[torch.Tensor]:
    """``model`` (ops following the sparsity) gives ``without``'s outputs and gates bit for bit, and
    ``net``'s within float noise at threshold 0; after the first frame ``ops`` wrote only part of their
    maps (counted in input pixels: an upsampling copies each to factor pixels). Returns the outputs."""
    (got, got_gates), (expected, expected_gates) = run(model, stream), run(without, stream)
    for frame, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"frame {frame}"
    for frame, (ga, gb) in enumerate(zip(got_gates, expected_gates, strict=True)):
        for x, y in zip(ga, gb, strict=True):
            assert (x is None and y is None) or torch.equal(x, y), f"gates differ on frame {frame}"
    if threshold == 0.0:
        with torch.no_grad():
            dense = [net(frame) for frame in stream]
        assert max((a - b).abs().max().item() for a, b in zip(got, dense, strict=True)) < 1e-4
    for op in ops:
        factor = math.prod(getattr(op, "factor", (1, 1)))
        whole = op.out[0, 0].numel() // factor * (len(stream) - 1)
        assert 0 < op.pixels_written < whole, type(op).__name__
    return got


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_sparse_sums_equal_plain_sums_bit_for_bit(
    stream: torch.Tensor, threshold: float, monkeypatch
) -> None:
    torch.manual_seed(0)
    net = Block().eval()
    with_sums, without = followed_and_plain(net, monkeypatch, threshold=threshold, block=2)
    sums = [m for m in with_sums.modules() if isinstance(m, SparseSum)]
    # every sum of two tensors not written into in place; the ReLU module after the first fused
    assert [s.activation is not None for s in sums] == [True, False, False, False, False]
    assert isinstance(with_sums.up, SparseUpsample)
    # the sums recomputed only what changed: fewer pixels than whole maps on every frame after the first
    got = assert_followed_bit_for_bit(net, with_sums, without, stream, threshold, [*sums[:2], with_sums.up])
    # sums of a broadcast or of two plain tensors keep no state
    assert [s.out is not None for s in sums] == [True, True, True, False, False]
    # their outputs and mark maps count as stream state
    layers_only = sum(layer.state_bytes() for _, layer in sc.engine.skip_layers(with_sums))
    followers = sum(op.state_bytes() for op in (*sums, with_sums.up))
    assert followers > 0 and state_bytes_per_stream(with_sums) == layers_only + followers
    # copies survive: a deep copy runs the same way
    twin = copy.deepcopy(with_sums)
    sc.reset(twin)
    twin_out, _ = run(twin, stream[:3])
    assert all(torch.equal(a, b) for a, b in zip(twin_out, got[:3], strict=True))


def test_sums_stay_plain_under_the_reference_backend_and_autograd() -> None:
    torch.manual_seed(0)
    net = Block().eval()
    reference = sc.convert(net, threshold=0.0, backend="reference")
    assert not any(isinstance(m, SparseSum) for m in reference.modules()), "sums follow the sparse backend"
    model = sc.convert(net, threshold=0.0, backend="sparse")
    x = torch.rand(1, 3, 32, 48)
    sums = [m for m in model.modules() if isinstance(m, SparseSum)]
    y = sums[0](torch.rand(1, 4, 8, 8, requires_grad=True), torch.rand(1, 4, 8, 8))
    y.sum().backward()  # autograd: the plain sum, activated out of place
    assert sums[0].out is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


def test_only_exact_nearest_upsampling_is_followed() -> None:
    assert upsample_factor(nn.Upsample(scale_factor=2)) == (2, 2)
    assert upsample_factor(nn.Upsample(scale_factor=(4.0, 2.0))) == (4, 2)
    for module in (
        nn.Upsample(scale_factor=3),  # 1/3 is not exact: the source row could round to the next
        nn.Upsample(scale_factor=1.5),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Upsample(size=(8, 8)),
        nn.UpsamplingNearest2d(scale_factor=2),
    ):
        assert upsample_factor(module) is None, module


class Branches(nn.Module):
    """A module called with a list of maps (as HRNet's modules are): traced on its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, 1, 1) for _ in range(2))
        self.relu = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.relu(self.convs[i](x) + x) for i, x in enumerate(xs)]


class TwoResolutions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.branches = Branches()
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        high, low = self.branches([x, self.down(x)])
        return self.head(high + self.up(low))


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_a_forward_taking_lists_is_traced_on_its_first_call(stream: torch.Tensor, monkeypatch) -> None:
    torch.manual_seed(0)
    model, without = followed_and_plain(TwoResolutions().eval(), monkeypatch, threshold=0.2, block=2)
    assert not any(isinstance(m, SparseSum) for m in model.branches.modules()), "not traced before a call"
    (got, _), (expected, _) = run(model, stream), run(without, stream)
    sums = [m for m in model.branches.modules() if isinstance(m, SparseSum)]
    assert len(sums) == 2 and all(s.activation is not None and s.pixels_written > 0 for s in sums)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # a list of another length runs the forward as written
    x = torch.rand(1, 16, 8, 8)
    with torch.no_grad():
        (only,) = model.branches([x])
        torch.testing.assert_close(only, torch.relu(model.branches.convs[0](x) + x))


class SharedUpsample(nn.Module):
    """One upsampling module called at two sites, on maps of two sizes (as yolox-nano's PAFPN)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Conv2d(16, 16, 3, 2, 1)
        self.side = nn.Conv2d(16, 16, 3, 2, 1)
        self.lower = nn.Conv2d(16, 16, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        low = self.down(x) + self.side(x)
        mid = self.up(self.lower(low)) + low
        return self.head(self.up(mid) + x)


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_an_upsampling_shared_by_two_sites_runs_plain_until_reset(stream: torch.Tensor, monkeypatch) -> None:
    torch.manual_seed(0)
    model, without = followed_and_plain(SharedUpsample().eval(), monkeypatch, threshold=0.1, block=2)
    (got, _), (expected, _) = run(model, stream[:6]), run(without, stream[:6])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert model.up.shared and model.up.out is None, "no state laid out afresh at every call"
    sums = [op for op in model.modules() if isinstance(op, SparseSum)]
    assert any(op.out is not None for op in sums)
    sc.reset(model)
    assert not model.up.shared
    assert all(op.out is None for op in sums), "reset drops the sums' state"


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_a_sum_with_one_input_that_is_state_keeps_its_output_and_one_with_none_does_not() -> None:
    relu = (CLAMP, 0.0, math.inf)
    torch.manual_seed(0)
    fresh = [torch.randn(1, 8, 6, 5).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    state = fresh[2].clone(memory_format=torch.channels_last)
    state.skipconv_revision = sparse.Revision()  # what a skipping layer's output carries
    summed = SparseSum(relu)
    with torch.no_grad():
        neither = summed(fresh[0], fresh[1])
        assert summed.out is None and sparse.revision_of(neither) is None
        assert torch.equal(neither, torch.relu(fresh[0] + fresh[1]))
        assert neither.skipconv_activation == relu  # a ReLU module after it is not applied again
        one = summed(fresh[0], state)  # laid out: written whole, no marks (the readers scan it whole)
        assert one is summed.out and torch.equal(one, torch.relu(fresh[0] + state))
        revision = sparse.revision_of(one)
        assert revision.marks is None and revision.marked != revision.number
        number = revision.number
        # the same tensors again, the changes of the plain one not known: recomputed, nothing changed
        assert summed(fresh[0], state) is one and revision.number == number
        fresh[0].add_(1.0)  # a plain input changed in place: still recomputed whole
        assert torch.equal(summed(fresh[0], state), torch.relu(fresh[0] + state))
        changed = (one != torch.relu(fresh[0] - 1.0 + state)).any(1)
        assert revision.marked == revision.number and torch.equal(revision.marks == 2, changed)


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_after_an_input_whose_changes_are_unknown_only_changed_pixels_are_written_and_marked() -> None:
    """A layer's plain frame hands out a fresh map, equal bit for bit where its input did not change: the
    sum taking it recomputes every pixel but writes and marks only those whose value changed, so that the
    ops after it (an upsampling, a sum reading that) keep following the sparsity instead of taking the
    whole map in turn."""
    torch.manual_seed(0)
    cl = torch.channels_last
    state = torch.randn(1, 4, 6, 8).contiguous(memory_format=cl)
    state.skipconv_revision = sparse.Revision()
    plain = torch.randn(1, 4, 6, 8).contiguous(memory_format=cl)
    summed, up, after = SparseSum(), SparseUpsample(nn.Upsample(scale_factor=2), (2, 2)), SparseSum()
    other = torch.randn(1, 4, 12, 16).contiguous(memory_format=cl)
    other.skipconv_revision = sparse.Revision()
    with torch.no_grad():
        for frame in range(4):
            if frame:  # a plain frame: a new tensor, two pixels different
                plain = plain.clone(memory_format=cl)
                plain[0, :, frame, 2 * frame] += 1.0
                plain[0, 1, 5, 7] -= float(frame)
            s = summed(state, plain)
            u = up(s)
            out = after(u, other)
            assert torch.equal(s, state + plain) and torch.equal(u, F.interpolate(s, scale_factor=2))
            assert torch.equal(out, u + other)
            if frame:
                assert summed.revision.marked == summed.revision.number
                assert torch.nonzero(summed.marks[0] == 2).tolist() == [[frame, 2 * frame], [5, 7]]
                written = (summed.marks[0] == 2).repeat_interleave(2, 0).repeat_interleave(2, 1)
                assert torch.equal(up.marks[0] == 2, written) and torch.equal(after.marks[0] == 2, written)
    # the first frame whole; then two pixels a frame: the sum over the sum's map, the upsampling copies 2
    assert summed.pixels_written == 2 * 3 and up.pixels_written == 2 * 3 and after.pixels_written == 8 * 3


class Concatenations(nn.Module):
    """Channel concatenations as in a CSP block and openpose's stages: two layers' outputs, one of them with
    a map made afresh every frame (a plain op: its changes are not known); a concatenation of maps of two
    sizes and one along another dim stay ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.left = nn.Conv2d(16, 8, 3, 1, 1)
        self.right = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(32, 16, 3, 1, 1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.mix(torch.cat([self.left(x), self.right(x), x * 0.5], dim=1))  # followed
        z = torch.cat((y, self.head(y)), 1)  # followed (positional dim)
        wide = torch.cat([z, z], dim=3)  # another dim: plain
        return self.head(z[:, :16]) + wide[:, :8, :, : z.shape[-1]]


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_concatenations_follow_the_sparsity_bit_for_bit(
    stream: torch.Tensor, threshold: float, monkeypatch
) -> None:
    torch.manual_seed(0)
    net = Concatenations().eval()
    model, without = followed_and_plain(net, monkeypatch, threshold=threshold, block=2)
    concats = [m for m in model.modules() if isinstance(m, SparseConcat)]
    assert len(concats) == 2
    # (the fresh map: compared pixel by pixel, written only where it changed)
    assert_followed_bit_for_bit(net, model, without, stream, threshold, concats)


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_a_concatenation_writes_and_marks_what_each_input_changed() -> None:
    """Per input: a layer's one write (its mark map), no change, or a fresh map compared with its channels."""
    torch.manual_seed(0)
    cl = torch.channels_last
    layer_out = torch.randn(1, 3, 5, 6).contiguous(memory_format=cl)
    layer_out.skipconv_revision = revision = sparse.Revision()
    still = torch.randn(1, 2, 5, 6).contiguous(memory_format=cl)
    still.skipconv_revision = sparse.Revision()
    fresh = torch.randn(1, 4, 5, 6).contiguous(memory_format=cl)
    concat = SparseConcat()
    with torch.no_grad():
        out = concat(layer_out, still, fresh)
        assert torch.equal(out, torch.cat([layer_out, still, fresh], 1)) and out is concat.out
        assert concat.revision.marks is None  # laid out: written whole
        for frame in range(1, 4):
            layer_out[0, :, frame, frame] += 1.0  # the layer's write, where its mark map says
            revision.number += 1
            revision.marks = torch.zeros(1, 5, 6, dtype=torch.uint8)
            revision.marks[0, frame, frame] = 2
            revision.marked = revision.number
            fresh = fresh.clone(memory_format=cl)
            fresh[0, 1, 4, 5 - frame] -= 1.0
            assert concat(layer_out, still, fresh) is out
            assert torch.equal(out, torch.cat([layer_out, still, fresh], 1)), f"frame {frame}"
            written = sorted([[frame, frame], [4, 5 - frame]])
            assert torch.nonzero(concat.marks[0] == 2).tolist() == written
            assert concat.revision.marked == concat.revision.number
        assert concat.pixels_written == 2 * 3
        # nothing changed: nothing written, the revision stays
        number = concat.revision.number
        assert concat(layer_out, still, fresh.clone(memory_format=cl)) is out
        assert concat.revision.number == number and concat.pixels_written == 6
        # the same total of channels split otherwise (the unchanged input moved): laid out again
        other = torch.randn(1, 4, 5, 6).contiguous(memory_format=cl)
        other.skipconv_revision = sparse.Revision()
        assert torch.equal(concat(other, still, layer_out), torch.cat([other, still, layer_out], 1))
        # all made afresh: the plain concatenation, no state kept
        plain = concat(fresh, fresh)
        assert concat.out is None and sparse.revision_of(plain) is None
        assert torch.equal(plain, torch.cat([fresh, fresh], 1))


class AsymmetricPad(nn.Module):
    """TF "SAME" padding before a stride-2 conv: the odd pixel at the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (0, 1, 0, 1))


register_zero_pad(AsymmetricPad, lambda module, x: (0, 1, 0, 1))


class Pads(nn.Module):
    """Zero paddings (a static one, a declared one) before unpadded convs; a padding with ones stays plain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.pad = nn.ZeroPad2d((1, 2, 2, 1))
        self.conv = nn.Conv2d(16, 16, 3, 1, 0)
        self.same = AsymmetricPad()
        self.down = nn.Conv2d(16, 16, 3, 2, 0)
        self.ones = nn.ConstantPad2d(1, 1.0)
        self.head = nn.Conv2d(16, 8, 3, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ones(self.down(self.same(self.conv(self.pad(self.stem(x)))))))


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_zero_paddings_follow_the_sparsity_bit_for_bit(
    stream: torch.Tensor, threshold: float, monkeypatch
) -> None:
    torch.manual_seed(0)
    net = Pads().eval()
    model, without = followed_and_plain(net, monkeypatch, threshold=threshold, block=2)
    assert isinstance(model.pad, SparsePad) and isinstance(model.same, SparsePad)
    assert_followed_bit_for_bit(net, model, without, stream, threshold, [model.pad, model.same])
    assert model.ones.out is None, "padding with ones: not a zero padding, no state"


@pytest.mark.skipif(native.extension() is None, reason="needs the C++ step (built in CI)")
def test_a_padding_copies_and_marks_only_what_its_input_changed() -> None:
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(1, 3, 4, 5).contiguous(memory_format=cl)
    x.skipconv_revision = revision = sparse.Revision()
    pad = SparsePad(nn.ZeroPad2d((2, 0, 1, 3)), lambda module, t: (2, 0, 1, 3))
    with torch.no_grad():
        out = pad(x)
        assert torch.equal(out, nn.functional.pad(x, (2, 0, 1, 3))) and out is pad.out
        x[0, :, 3, 4] = 7.0  # the layer before wrote one pixel
        revision.number += 1
        revision.marks = torch.zeros(1, 4, 5, dtype=torch.uint8)
        revision.marks[0, 3, 4] = 2
        revision.marked = revision.number
        assert pad(x) is out and torch.equal(out, nn.functional.pad(x, (2, 0, 1, 3)))
        assert torch.nonzero(pad.marks[0] == 2).tolist() == [[1 + 3, 2 + 4]]
        # the layer's new output tensor (a busy frame: written whole, no marks): compared, one pixel differs
        fresh = x.clone(memory_format=cl)
        fresh[0, 0, 0, 0] = -7.0
        fresh.skipconv_revision = revision
        revision.number += 1
        revision.marks, revision.marked = None, -1
        assert pad(fresh) is out and torch.equal(out, nn.functional.pad(fresh, (2, 0, 1, 3)))
        assert torch.nonzero(pad.marks[0] == 2).tolist() == [[1, 2]] and pad.pixels_written == 2
        plain = pad(torch.randn(1, 3, 4, 5).contiguous(memory_format=cl))  # no revision: the plain module
        assert pad.out is None and sparse.revision_of(plain) is None


def test_folded_batchnorms_leave_a_rewritten_forward() -> None:
    """A forward rewritten for its sums no longer calls the ``nn.Identity`` a folded BatchNorm left (a module
    call per BatchNorm and frame); the outputs are the model's."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bn(self.conv(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual()).eval()
    with torch.no_grad():
        net[1].bn.running_mean.uniform_(-1, 1)
        net[1].bn.running_var.uniform_(0.5, 2)
    fast = sc.convert(net, backend="sparse", threshold=0.0, block=4)
    assert type(fast[1].bn) is nn.Identity and any(isinstance(m, SparseSum) for m in fast.modules())
    calls = []
    fast[1].bn.register_forward_hook(lambda *args: calls.append(1))
    frames = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        for x in frames:
            assert (fast(x) - net(x)).abs().max().item() < 1e-4
    assert not calls


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # (torch's own unpickling of fx code)
@pytest.mark.parametrize("arch", ["mobilenetv2", "hrnet-fusion", "unet", "lists of branches"])
def test_whole_converted_model_saves_mid_stream_and_loads_as_a_new_stream(
    arch: str, stream: torch.Tensor
) -> None:
    """``torch.save`` of the model itself (not its state_dict): the rewritten forwards (sums, concatenations,
    a forward traced with its lists unpacked) pickle, and the stream state (weak references) is left
    behind: the loaded copy runs the stream from its first frame exactly as the original does."""
    torch.manual_seed(0)
    net = TwoResolutions().eval() if arch == "lists of branches" else build(arch)
    model = sc.convert(net, gate="output-norm", threshold=0.1, block=4, backend="sparse")
    for _, layer in sc.engine.skip_layers(model):
        layer.crossover = 1.0  # (decisions that do not depend on timing: the two runs compare bit for bit)
    with torch.no_grad():
        for frame in stream[:3]:
            model(frame)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(layer._sparse_state is None for _, layer in sc.engine.skip_layers(loaded))
    assert all(layer._sparse_state is not None for _, layer in sc.engine.skip_layers(model))  # untouched
    followers = [m for m in loaded.modules() if isinstance(m, FollowsSparsity)]
    assert followers and all(op.out is None for op in followers)
    if arch == "lists of branches":  # traced on the first call, before the save: the loaded copy follows
        assert any(isinstance(m, SparseSum) for m in loaded.branches.modules())
    sc.reset(model)
    with torch.no_grad():
        for frame in stream[:6]:
            assert torch.equal(model(frame), loaded(frame))
