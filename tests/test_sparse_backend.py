"""The sparse backend computes what the reference backend computes, on real video, for every architecture,
gate and block size, and reports the same MACs; the per-layer dense fallback and the tuning cache work."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import skipconv_cli as sc
from skipconv_cli.engine.activations import CLAMP, SILU, activate_
from skipconv_cli.engine.backends import native, sparse
from skipconv_cli.engine.gates import BLOCK_SIZES, GATES
from tests.archs import ARCHITECTURES, build, plain_net
from tests.conftest import read_frames

STREAM_FRAMES = 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy shared machine two threads wait on each other's time slices, which
    makes this file's run time erratic; the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def tuning_cache(tmp_path, monkeypatch) -> None:
    """Tuning results go to a temporary folder, never to the user's cache."""
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path))
    sparse._MEMORY_CACHE.clear()


@pytest.fixture(scope="module")
def video_stream(videos_dir) -> torch.Tensor:
    """24 consecutive frames of the car clip (cars crossing: part of the image changes): [T, 1, 3, 48, 80]."""
    frames = read_frames(videos_dir / "car-detection.mp4", STREAM_FRAMES, start=190, size=(80, 48))
    stream = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255.0)
    return stream.unsqueeze(1)


def run_both(
    dense_model: torch.nn.Module,
    stream: torch.Tensor,
    crossover: float | None = None,
    learned: dict[str, torch.Tensor] | None = None,
    **options,
) -> tuple[torch.nn.Module, torch.nn.Module, float, float, int]:
    """Runs the reference and the sparse backend side by side.

    Returns both models, the worst output difference up to the first frame where some layer's gate
    differs between the backends (after that the streams may legitimately differ by a pending change),
    the output scale, and how many (layer, frame) gates differed. At threshold 0 a busy frame (the sparse
    layer takes the whole frame, its scan may stop early) is no divergence: the reference takes every
    changed input too.
    """
    reference = sc.convert(dense_model, backend="reference", **options)
    fast = sc.convert(dense_model, backend="sparse", **options)
    if learned is not None:  # trained Gumbel gates
        reference.load_state_dict(learned, strict=False)
        fast.load_state_dict(learned, strict=False)
    for _, layer in sc.engine.skip_layers(fast):
        layer.crossover = crossover
    worst, scale, gate_mismatches = 0.0, 0.0, 0
    exact_takes = options.get("threshold") == 0.0

    def busy_counts() -> list[int]:
        return [layer.backend_stats()["dense_frames"] for _, layer in sc.engine.skip_layers(fast)]

    with torch.no_grad():
        for frame in stream:
            busy_before = busy_counts()
            expected, got = reference(frame), fast(frame)
            busy = [after > before for before, after in zip(busy_before, busy_counts(), strict=True)]
            scale = max(scale, expected.abs().max().item())
            pairs = zip(sc.engine.skip_layers(reference), sc.engine.skip_layers(fast), strict=True)
            for ((_, a), (_, b)), took_frame in zip(pairs, busy, strict=True):
                if a.last_gate is None or b.last_gate is None:  # a plain (gateless) sparse layer
                    continue
                if took_frame and exact_takes:
                    continue
                if not torch.equal(a.last_gate, b.last_gate):
                    gate_mismatches += 1
            if not gate_mismatches:
                worst = max(worst, (expected - got).abs().max().item())
    return reference, fast, worst, scale, gate_mismatches


def trained_like_gates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gumbel gates as training leaves them: channel weights spread over ~3 decades, thresholds 0.05-0.5."""
    generator = torch.Generator().manual_seed(0)
    learned = {}
    for name, layer in sc.engine.skip_layers(model):
        channels = layer.gate.channel_log_weight.shape[0]
        learned[f"{name}.gate.channel_log_weight"] = torch.randn(channels, generator=generator) * 2
        threshold = 0.05 * 10 ** torch.rand((), generator=generator).item()
        learned[f"{name}.gate.log_threshold"] = torch.tensor(math.log(threshold))
    return learned


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_trained_gumbel_gates_run_in_the_cpp_step_and_match_the_reference(
    arch: str, video_stream: torch.Tensor
) -> None:
    dense_model = build(arch)
    learned = trained_like_gates(sc.convert(dense_model, gate="gumbel", backend="reference"))
    for block in (1, 4):
        reference, fast, worst, scale, mismatches = run_both(
            dense_model, video_stream, crossover=1.0, learned=learned, gate="gumbel", block=block
        )
        where = f"{arch} block {block}"
        assert worst <= 1e-4 * scale, f"{where}: max diff {worst:.3g} (scale {scale:.3g})"
        assert mismatches <= 0.1 * STREAM_FRAMES * len(sc.engine.skip_layers(fast)), where
        sources = {(layer._last_source or ("plain",))[0] for _, layer in sc.engine.skip_layers(fast)}
        assert "native" in sources, (where, sources)
        if block == 1:  # the gates do skip (blocks of 4 cover most of these 48x80 maps)
            assert sc.report(reference)["macs"]["reduction"] > 1.05, where


def executed(model: torch.nn.Module) -> int:
    return sc.report(model)["macs"]["executed"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sparse_matches_reference_for_every_gate_and_block(arch: str, video_stream: torch.Tensor) -> None:
    dense_model = build(arch)
    for gate in GATES:
        for block in BLOCK_SIZES:
            for threshold in (0.0, 0.1):
                if gate == "gumbel" and threshold:
                    continue  # the Gumbel gate ignores the threshold
                reference, fast, worst, scale, mismatches = run_both(
                    dense_model, video_stream, crossover=1.0, gate=gate, threshold=threshold, block=block
                )
                where = f"{arch} {gate} block {block} threshold {threshold}"
                assert worst <= 1e-4 * scale, f"{where}: max diff {worst:.3g} (scale {scale:.3g})"
                # Both backends take the same decisions on the same residuals. The residual of a deeper
                # layer can differ in the last bit (dense vs. tile-wise accumulation), which rarely flips
                # a decision exactly at the threshold, or, at threshold 0, whether a change that rounds to
                # nothing is seen at all; the MAC reports then differ by a few outputs.
                # Measured: identical reports above threshold 0; at threshold 0 with blocks of 1-2, gates of
                # up to 10% of (layer, frame) pairs differed by a few pixels, MACs by < 0.2%.
                assert mismatches <= 0.1 * STREAM_FRAMES * len(sc.engine.skip_layers(fast)), where
                if mismatches == 0:
                    assert sc.report(reference) == sc.report(fast), where
                else:
                    assert executed(fast) == pytest.approx(executed(reference), rel=5e-3), where


def test_forced_dense_and_forced_sparse_agree(video_stream: torch.Tensor, kernel: str) -> None:
    model = build("mobilenetv2")
    options = {"gate": "output-norm", "threshold": 0.1, "block": 4}
    _, always_dense, worst_dense, scale, _ = run_both(model, video_stream, crossover=0.0, **options)
    _, always_sparse, worst_sparse, _, _ = run_both(model, video_stream, crossover=1.0, **options)
    assert max(worst_dense, worst_sparse) <= 1e-4 * scale
    dense_stats = [layer.backend_stats() for _, layer in sc.engine.skip_layers(always_dense)]
    sparse_stats = [layer.backend_stats() for _, layer in sc.engine.skip_layers(always_sparse)]
    frames = STREAM_FRAMES
    assert all(s["sparse_frames"] == 0 for s in dense_stats), "crossover 0: always the dense fallback"
    assert all(s["plain_frames"] == 0 for s in dense_stats + sparse_stats), "fixed crossover: no plain frames"
    assert all(s["dense_frames"] + s["idle_frames"] == frames for s in dense_stats)
    assert sum(s["dense_frames"] for s in dense_stats) > len(dense_stats)
    assert all(s["dense_frames"] == 1 for s in sparse_stats), "crossover 1: dense only on the first frame"
    assert all(s["sparse_frames"] + s["idle_frames"] == frames - 1 for s in sparse_stats)
    assert sum(s["tiles"] for s in sparse_stats) > 0
    # crossover 0: a frame with any change is busy and taken whole: every output counts as computed
    for (_, layer), stats in zip(sc.engine.skip_layers(always_dense), dense_stats, strict=True):
        assert layer.layer_stats()["active_fraction"] == stats["dense_frames"] / frames
    assert executed(always_dense) > executed(always_sparse)
    # threshold 0: every busy frame (the scan stops early, the whole frame is taken) stays exact
    _, _, worst_busy, scale, mismatches = run_both(
        model, video_stream, crossover=0.0, **{**options, "threshold": 0.0}
    )
    assert mismatches == 0 and worst_busy <= 1e-4 * scale


@pytest.mark.skipif(sparse.native.extension() is None, reason="needs the C++ step (built in CI)")
@pytest.mark.parametrize("groups", [1, 4])  # the pixel path counts blocks, the tile path tiles
def test_busy_scan_stops_once_more_units_than_the_crossover_are_active(groups: int) -> None:
    """A frame that changes everywhere is decided busy after the first band of the scan: the residual of
    the rows after it is never computed; every block counts as gated, every output as written."""
    layer = sc.SkipConv2d(16, 16, 3, padding=1, groups=groups, threshold=0.0, block=4, backend="sparse")
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.rand(1, 16, 128, 128, generator=generator) for _ in range(2))
    with torch.no_grad():
        layer(first)
        state = layer._sparse_state
        state.crossover = 0.1
        units, computed, path, _ = sparse.native_step(
            layer, state, second.contiguous(memory_format=torch.channels_last)
        )
    maps, total = state.maps, sparse.units_per_sample(state)
    assert total == (32 * 32 if groups == 1 else state.plan.tiles_per_sample)
    assert path == sparse.native.PATH_DENSE and computed == 128 * 128
    assert 0.1 * total < units <= total // 2
    assert (maps.r_abs[0, :32] > 0).all() and (maps.r_abs[0, -32:] == 0).all(), "the scan went on"
    assert maps.gate.all() and (maps.mark == 2).all()


def test_pixel_path_runs_only_the_outputs_it_writes(video_stream: torch.Tensor, monkeypatch) -> None:
    """The C++ step recomputes the written outputs of ungrouped and depthwise convs as pixels: as exact as
    the tiles, and it runs fewer outputs."""
    model = build("mobilenetv2")  # ungrouped and depthwise layers
    runs = {}
    for pixels in ("1", "0"):
        monkeypatch.setenv("SKIPCONV_PIXELS", pixels)
        _, fast, worst, scale, mismatches = run_both(
            model, video_stream, crossover=1.0, gate="output-norm", threshold=0.1, block=4
        )
        assert worst <= 1e-4 * scale and mismatches == 0, f"pixels={pixels}: {worst:.3g} of {scale:.3g}"
        runs[pixels] = [layer for _, layer in sc.engine.skip_layers(fast)]
    total = {"1": 0, "0": 0}
    kinds = set()
    for with_pixels, with_tiles in zip(runs["1"], runs["0"], strict=True):
        matrix = with_pixels._sparse_state.maps.pixel_weight
        assert matrix is not None
        # ungrouped layers read the weight itself or its packed panels, depthwise ones a copy: a copy is
        # counted once for all streams, not as stream state (the tiles keep none)
        assert with_pixels.weight_layout_bytes() == layout_copy_bytes(with_pixels, matrix)
        assert with_tiles.weight_layout_bytes() == 0
        assert with_pixels.state_bytes() == with_tiles.state_bytes()
        kinds.add(with_pixels.groups == 1)
        assert with_pixels.layer_stats() == with_tiles.layer_stats(), "the same gates, the same MACs counted"
        run_pixels, run_tiles = (sparse_macs_run(layer) for layer in (with_pixels, with_tiles))
        # never more than the outputs counted as computed (mark 2 only: the written ones)
        assert run_pixels <= with_pixels.layer_stats()["macs_executed"]
        total["1"] += run_pixels
        total["0"] += run_tiles
    assert kinds == {True, False}, "ungrouped and depthwise layers"
    assert 0 < total["1"] < total["0"]


@pytest.mark.parametrize("vectors", ["avx512", "avx2", "none"])
@pytest.mark.parametrize("packed", ["1", "0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_pixel_path_products_are_exact_for_any_row_channel_count_and_activation(
    threads: int, packed: str, vectors: str, monkeypatch
) -> None:
    """The pixel path's products (ungrouped: weight panels packed for the vector kernel the CPU has, 16
    channels with AVX-512, 8 with AVX2, else at::mm on the weight itself; depthwise: a register of channels
    at a time) over changes of 1 to all output pixels, channel counts off their registers, with and without
    bias and fused activation (the packed product adds the bias and clamps as it stores): at threshold 0
    each frame's output is the dense convolution's. Each kernel a CPU has narrower than its widest runs
    here too (``SKIPCONV_VECTOR``)."""
    if native.VECTOR_WIDTHS[vectors] > native._cpu_vector_width():
        pytest.skip(f"this CPU has no {vectors} kernels")
    monkeypatch.setenv("SKIPCONV_PACKED", packed)
    monkeypatch.setenv("SKIPCONV_VECTOR", vectors)
    torch.set_num_threads(threads)
    try:
        check_pixel_products(torch.Generator().manual_seed(threads), vectors)
    finally:
        torch.set_num_threads(1)  # this module's setting (``one_thread``)


def check_pixel_products(generator: torch.Generator, vectors: str) -> None:
    regions = [
        (0, 1, 0, 1),
        (3, 5, 7, 10),
        (10, 15, 20, 25),
        (2, 11, 5, 25),
        (0, 24, 0, 40),
        (20, 24, 36, 40),
    ]
    relu6, silu = (CLAMP, 0.0, 6.0), (SILU, 0.0, 0.0)
    shapes = [(5, 37, 3, 1, None, True), (64, 16, 1, 1, relu6, True), (3, 96, 3, 1, silu, True)]
    shapes += [(40, 33, 1, 1, relu6, False), (8, 7, 3, 1, None, False), (37, 37, 3, 37, relu6, True)]
    shapes += [(16, 16, 3, 16, silu, True), (5, 5, 5, 5, None, True)]
    for in_channels, out_channels, kernel, groups, activation, bias in shapes:
        layer = sc.SkipConv2d(
            in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=bias, threshold=0.0,
            block=4,
        )  # fmt: skip
        layer.fused_activation = (
            activation  # (as ``fuse_activations`` sets it: applied as outputs are written)
        )
        layer.crossover = 1.0  # every frame on the pixel path, however much changed
        # inputs up to 10: outputs on both sides of ReLU6's bounds
        frame = 10 * torch.rand(1, in_channels, 24, 40, generator=generator)
        with torch.no_grad():
            layer(frame)
            for top, bottom, left, right in regions:
                frame = frame.clone()
                frame[..., top:bottom, left:right] = 10 * torch.rand(
                    1, in_channels, bottom - top, right - left, generator=generator
                )
                expected = F.conv2d(frame, layer.weight, layer.bias, padding=kernel // 2, groups=groups)
                if activation == relu6:
                    assert (expected < 0).any() and (expected > 6).any(), "both bounds are exercised"
                if activation is not None:
                    activate_(expected, activation)
                worst = (layer(frame) - expected).abs().max().item()
                assert worst <= 1e-5 * expected.abs().max().item(), (in_channels, out_channels, top, worst)
        packed = groups == 1 and native.packs_weights()
        matrix, width = layer._sparse_state.maps.pixel_weight, native.VECTOR_WIDTHS[vectors]
        assert matrix.dim() == (3 if packed else 2) and layer._sparse_state.maps.vectors == width
        assert not packed or matrix.shape[2] == width, "panels as wide as the kernel's registers"
        assert layer.backend_stats()["sparse_frames"] == len(regions)


def layout_copy_bytes(layer: sc.SkipConv2d, matrix: torch.Tensor) -> int:
    """What the pixel path's weight layout should hold beyond the weight: nothing where an ungrouped layer
    reads the weight itself (no packed product), else the copy."""
    if layer.groups == 1:
        packed = native.packs_weights()
        assert matrix.dim() == (3 if packed else 2)
        if not packed:
            assert matrix.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
            return 0
    return matrix.untyped_storage().nbytes()


def test_weight_layouts_outlive_a_stream_and_follow_a_changed_weight(video_stream: torch.Tensor) -> None:
    """The pixel path's weight matrix and the gate's mean |W| are derived once per weight: a new stream
    (reset) reuses them; a weight changed in place is laid out again, and gates and outputs follow it (the
    reference backend, which derives nothing, beside it)."""
    fast = sc.convert(build("mobilenetv2"), backend="sparse", gate="output-norm", threshold=0.1, block=4)
    reference = copy.deepcopy(fast)
    sc.engine.set_backend(reference, "reference")
    layers = [layer for _, layer in sc.engine.skip_layers(fast)]
    for layer in layers:
        layer.crossover = 1.0
    with torch.no_grad():
        for frame in video_stream[:3]:
            fast(frame)
        first = [layer._sparse_state.maps.pixel_weight for layer in layers]
        assert all(matrix is not None for matrix in first)
        sc.engine.reset(fast)
        held = [layer.weight_layout_bytes() for layer in layers]
        copies = [layout_copy_bytes(layer, m) for layer, m in zip(layers, first, strict=True)]
        assert held == copies and any(copies), "held across the reset, and reported"
        fast(video_stream[0])
        assert all(layer._sparse_state.maps.pixel_weight is m for layer, m in zip(layers, first, strict=True))

        for model in (fast, reference):
            for _, layer in sc.engine.skip_layers(model):
                layer.weight.mul_(1.5)
            sc.engine.reset(model)
        pairs = list(zip(sc.engine.skip_layers(reference), layers, strict=True))
        for frame in video_stream[:6]:
            expected, got = reference(frame), fast(frame)
            gated = [(a, b) for (_, a), b in pairs if b.last_gate is not None]
            assert all(torch.equal(a.last_gate, b.last_gate) for a, b in gated)
            assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert all(layer._sparse_state.maps.pixel_weight is not m for layer, m in zip(layers, first, strict=True))


def test_a_layer_tuned_to_plain_convolutions_releases_its_weight_copy(monkeypatch) -> None:
    """The pixel path's copy of a depthwise weight is kept across streams, but not by a layer that will not
    skip."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, groups=8, threshold=0.0, block=4, backend="sparse")
    with torch.no_grad():
        layer(torch.rand(1, 8, 32, 32))
        assert layer.weight_layout_bytes() == 8 * 9 * 4
        monkeypatch.setattr(sparse, "crossover_for", lambda layer, state: 0.0)  # tuned: never pays
        layer(torch.rand(1, 8, 32, 32))
    assert layer._sparse_state.plain_forever and layer.weight_layout_bytes() == 0


def test_always_plain_layer_is_the_plain_convolution_with_no_state(video_stream: torch.Tensor) -> None:
    """``always_plain`` (``run --dense``): every frame the layer's convolution, nothing laid out or copied,
    every output counted."""
    model = build("mobilenetv2")
    fast = sc.convert(model, threshold=0.0, backend="sparse")
    for _, layer in sc.engine.skip_layers(fast):
        layer.always_plain = True
    with torch.no_grad():
        for x in video_stream[:6]:
            expected, got = model(x), fast(x)
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    for _, layer in sc.engine.skip_layers(fast):
        state = layer._sparse_state
        assert state.plain_forever and state.x_pad is None and state.z is None and state.maps is None
        stats = layer.backend_stats()
        assert (stats["dense_frames"], stats["plain_frames"], stats["sparse_frames"]) == (1, 5, 0)
    assert sc.report(fast)["macs"]["reduction"] == 1.0


@pytest.mark.parametrize("shape", [(1, 32, 52, 52), (3, 5, 7, 9), (2, 7)])
def test_mean_abs_is_the_mean_absolute_value_per_sample(shape: tuple[int, ...]) -> None:
    """The output scale of a stream's first frame, read in C++: torch's abs().mean() to float precision,
    for either memory layout."""
    from skipconv_cli.engine.backends import native

    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(shape, generator=generator) * 3 - 1]
    if len(shape) == 4:
        maps.append(maps[0].contiguous(memory_format=torch.channels_last))
    for values in maps:
        dims = tuple(range(1, len(shape)))
        got, expected = native.mean_abs(values), values.double().abs().mean(dims, keepdim=True).float()
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=0.0)


def sparse_macs_run(layer: sc.SkipConv2d) -> int:
    """MACs the backend ran on sparse frames (its dense frames left out)."""
    stats, counted = layer.backend_stats(), layer.layer_stats()
    return stats["macs_run"] - stats["dense_frames"] * counted["macs_dense"] // layer.frames_seen


def test_auto_tuned_layers_stay_exact_and_count_plain_frames_as_dense(video_stream: torch.Tensor) -> None:
    """Auto-tuning may send a layer to plain dense convolutions (its gate costs what its conv does) or
    back off after a busy frame; outputs stay as exact as the reference's, and MACs count what ran."""
    model = build("mobilenetv2")
    _, tuned, worst, scale, _ = run_both(model, video_stream, crossover=None, threshold=0.0, block=4)
    assert worst <= 1e-4 * scale
    layers = [layer for _, layer in sc.engine.skip_layers(tuned)]
    plain = [layer for layer in layers if layer._sparse_state.plain_forever]
    for layer in plain:
        stats = layer.backend_stats()
        assert stats["plain_frames"] == STREAM_FRAMES - 1 and stats["sparse_frames"] == 0
        assert layer.layer_stats()["active_fraction"] == 1.0, "a plain layer computes every output"
        assert layer.state_bytes() == 0, "a plain layer keeps no stream state"
        assert layer.weight_layout_bytes() == 0, "nor a copy of its weight"
    for layer in layers:
        stats = layer.backend_stats()
        frames = sum(stats[k] for k in ("sparse_frames", "dense_frames", "idle_frames", "plain_frames"))
        assert frames == STREAM_FRAMES


def test_backoff_runs_plain_frames_after_a_busy_frame_and_resumes_from_the_last() -> None:
    """A busy frame (its output the plain convolution's) is followed by plain frames (no gate, state left
    alone); the last of them becomes the state, which the next skip frame gates against, exactly. The
    back-off grows while the layer stays busy and starts over after a judged frame with tiles (the probe,
    first after the back-off, is not judged)."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, backend="sparse")
    generator = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 8, 32, 32, generator=generator) for _ in range(12)]
    dense = torch.nn.Conv2d(8, 8, 3, padding=1)

    def counts() -> tuple[int, int, int]:
        stats = layer.backend_stats()
        return stats["dense_frames"], stats["plain_frames"], stats["sparse_frames"]

    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
        outputs = [layer(frames[0]).clone()]
        state = layer._sparse_state
        state.tuned, state.crossover = True, 0.5  # pin a crossover without pinning the path
        state.dense_seconds = math.inf  # and switch the time rule off: only dense recomputes are busy
        outputs.append(layer(frames[1]).clone())  # every pixel changed: dense recompute, back-off of 2
        assert state.plain_left == 2 and counts() == (2, 0, 0)
        outputs += [layer(frames[2]).clone(), layer(frames[3]).clone()]
        assert counts() == (2, 2, 0)
        assert torch.equal(state.x_ref, frames[3]), "the back-off's last frame is the state"
        local = frames[3].clone()
        local[..., :4, :4] += 1.0  # a small change from the state's frame: tiles
        outputs.append(layer(local).clone())
        assert counts() == (2, 2, 1) and state.backoff == 2, "the probe: not judged"
        calm = local.clone()
        calm[..., -4:, -4:] += 1.0
        outputs.append(layer(calm).clone())
        assert counts() == (2, 2, 2) and state.backoff == 0
        layer(frames[5])  # busy: back-off starts over, then grows while busy
        assert state.backoff == sparse.BACKOFF_FIRST == 2
        for frame in frames[6:8]:  # plain, plain
            layer(frame)
        layer(frames[8])  # busy again
        grown = 2 * sparse.BACKOFF_GROWTH
        assert state.backoff == grown and state.plain_left == grown
        inputs = [*frames[:4], local, calm]
        for got, x in zip(outputs, inputs, strict=True):
            torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)


def test_backoff_ends_when_the_input_has_not_changed_since_the_last_plain_frame() -> None:
    """A layer in back-off whose input is the same tensor as on its last plain frame, not written since (the
    layer before was idle), takes the frame as its state there and then; a changed input does not."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, backend="sparse")
    dense = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.rand(1, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    revision = sparse.Revision()
    x.skipconv_revision = revision  # as a state tensor of the layer before carries it
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
        layer(torch.rand(1, 8, 32, 32))
        state = layer._sparse_state
        state.tuned, state.crossover, state.backoff, state.plain_left = True, 0.5, 16, 16
        layer(x)
        revision.number += 1  # written: still in back-off
        layer(x)
        assert state.plain_left == 14
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)  # unchanged: resynced
        assert state.plain_left == 0 and torch.equal(state.x_ref, x)


def test_busy_frame_when_the_layer_before_went_plain_takes_the_frame_without_backoff() -> None:
    """The layer before handed out its state, then a fresh map (it went plain): the burst of its pending
    change makes this frame busy once. The layer takes the frame and goes on skipping; a busy frame on a
    fresh map after fresh maps backs off as usual."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, backend="sparse")
    dense = torch.nn.Conv2d(8, 8, 3, padding=1)
    generator = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 8, 32, 32, generator=generator) for _ in range(3)]
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
        layer(frames[0])
        state = layer._sparse_state
        state.tuned, state.crossover = True, 0.5
        state.dense_seconds = math.inf  # the time rule off: only busy frames back off
        handed = frames[0].clone().contiguous(memory_format=torch.channels_last)
        handed[..., :4, :4] += 1.0
        handed.skipconv_revision = sparse.Revision()  # the state tensor the layer before hands out
        layer(handed)
        assert state.plain_left == 0 and state.scanned is not None
        torch.testing.assert_close(layer(frames[1]), dense(frames[1]), rtol=1e-5, atol=1e-5)
        assert state.plain_left == 0 and torch.equal(state.x_ref, frames[1]), "taken, no back-off"
        layer(frames[2])  # busy again, on a fresh map after a fresh map
        assert state.plain_left == sparse.BACKOFF_FIRST


def test_plain_estimate_is_timed_on_the_plain_call_and_kept_near_it() -> None:
    """The plain frames' time the judge compares with is timed on the call plain frames make, and slow
    plain frames cannot raise it past twice that (else a layer could stay on slower sparse frames)."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    x = torch.rand(1, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    calls = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        layer(x)
        state = layer._sparse_state
        plain_conv = sparse.plain_conv
        patch.setattr(sparse, "plain_conv", lambda *args: calls.append(args) or plain_conv(*args))
        sparse._PLAIN_SECONDS.clear()
        assert sparse.plain_seconds(layer, x) > 0 and calls, "timed on plain_conv"
        state.timed_seconds = state.dense_seconds = 1e-12  # every real plain frame is slower than this
        sparse.plain_frame(layer, state, x, timed=True)
    assert state.dense_seconds <= 2e-12


def test_backoff_refreshes_the_plain_estimate_every_few_frames() -> None:
    """A back-off's plain frames keep the estimate current, timing one frame in ``PLAIN_TIMED_EVERY`` (the
    timing is Python that every back-off frame would pay otherwise), and end in the resync."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    frames = [torch.rand(1, 8, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(10)]
    with torch.no_grad():
        layer(frames[0])
        state = layer._sparse_state
        state.tuned, state.timed_seconds = True, 1.0
        state.plain_left = backoff = 2 * sparse.PLAIN_TIMED_EVERY + 1
        updates = 0
        for x in frames[1 : backoff + 1]:
            state.dense_seconds = 5.0  # a real plain frame is far faster: a timed frame lowers it
            layer(x)
            updates += state.dense_seconds < 5.0
        assert state.plain_left == 0 and torch.equal(state.x_ref, frames[backoff]), "resynced at the end"
    assert updates == 2


def test_time_rule_backs_off_when_sparse_frames_are_slower_on_average() -> None:
    """One sparse frame slower than the plain convolution does not stop a layer whose other frames pay;
    sparse frames slower on average do (then skipping starts over with a fresh average)."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    with torch.no_grad():
        layer(torch.rand(1, 8, 32, 32))
    state = layer._sparse_state
    state.tuned, state.dense_seconds, state.tile_batches = True, 1.0, {1}  # (no cold batch size)
    tiles = sparse.native.PATH_TILES
    for seconds in (0.5, 0.5, 2.0, 0.5):  # one frame twice as slow as the plain convolution
        sparse.judge(layer, state, tiles, seconds, 1)
        assert state.plain_left == 0, seconds
    slow_frames = 0
    while state.plain_left == 0 and slow_frames < 3:  # frames 1.5x as slow as the plain convolution
        sparse.judge(layer, state, tiles, 1.5, 1)
        slow_frames += 1
    assert state.plain_left == sparse.BACKOFF_FIRST and state.sparse_seconds is None


def test_the_first_frame_after_plain_frames_is_not_judged_by_time() -> None:
    """A probe's scan is a full one (the state missed the input's writes during the plain frames): judged
    by its time, a layer whose convolution costs about its scan never came back from back-off. A busy
    probe backs off (with growth), a slow one does not; the next slow frame does, with growth."""
    layer = sc.SkipConv2d(8, 8, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    with torch.no_grad():
        layer(torch.rand(1, 8, 32, 32))
    state = layer._sparse_state
    state.tuned, state.dense_seconds, state.tile_batches = True, 1.0, {1}
    tiles, busy = sparse.native.PATH_TILES, sparse.native.PATH_DENSE
    while state.plain_left == 0:  # frames 1.5x as slow as the plain convolution, until the layer backs off
        sparse.judge(layer, state, tiles, 1.5, 1)
    assert state.plain_left == state.backoff == sparse.BACKOFF_FIRST
    x = torch.rand(1, 8, 32, 32)
    for _ in range(sparse.BACKOFF_FIRST):
        assert sparse.plain_frame_if_due(layer, state, x) is not None
    assert state.probing and sparse.plain_frame_if_due(layer, state, x) is None
    sparse.judge(layer, state, tiles, 5.0, 1)  # the probe: 5x as slow, not judged
    assert state.plain_left == 0 and state.backoff == sparse.BACKOFF_FIRST and not state.probing
    sparse.judge(layer, state, tiles, 5.0, 1)  # judged: back off, grown
    assert state.plain_left == state.backoff == sparse.BACKOFF_GROWTH * sparse.BACKOFF_FIRST
    state.plain_left, state.probing = 0, True
    sparse.judge(layer, state, busy, 0.1, 1)  # a busy probe backs off
    assert state.plain_left == state.backoff == sparse.BACKOFF_GROWTH**2 * sparse.BACKOFF_FIRST


def test_auto_tuning_is_cached_on_disk(tmp_path, video_stream: torch.Tensor) -> None:
    model = sc.convert(plain_net(), threshold=0.1, block=8, backend="sparse")
    with torch.no_grad():
        for frame in video_stream[:3]:
            model(frame)
    crossovers = [layer.backend_stats()["crossover"] for _, layer in sc.engine.skip_layers(model)]
    assert all(c is not None and 0.0 <= c <= 1.0 for c in crossovers)
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    assert len(cached) == 3, "one entry per layer geometry"
    # a new process would read the file: the values come back without measuring again
    sparse._MEMORY_CACHE.clear()
    files[0].write_text(json.dumps(dict.fromkeys(cached, 0.25)))
    again = sc.convert(plain_net(), threshold=0.1, block=8, backend="sparse")
    with torch.no_grad():
        for frame in video_stream[:2]:
            again(frame)
    assert {layer.backend_stats()["crossover"] for _, layer in sc.engine.skip_layers(again)} == {0.25}


def test_a_streams_tuning_key_is_made_once_per_layer(monkeypatch, video_stream: torch.Tensor) -> None:
    """Every layer's key to the tuning caches is made once a stream, on its first frame, and kept in the
    state: the first skip frame's lookups (crossover, plain time) reuse it instead of making it again (env
    reads and string building at in-model prices)."""
    model = sc.convert(plain_net(), threshold=0.1, block=8, backend="sparse")
    made = []
    memory_key = sparse.memory_key
    monkeypatch.setattr(sparse, "memory_key", lambda *args: made.append(1) or memory_key(*args))
    layers = len(list(sc.engine.skip_layers(model)))
    with torch.no_grad():
        for stream in range(2):
            sc.reset(model)
            for frame in video_stream[:3]:
                model(frame)
            assert len(made) == layers * (stream + 1)
    assert all(layer._sparse_state.key for _, layer in sc.engine.skip_layers(model))


def test_downstream_inplace_ops_do_not_corrupt_the_state(video_stream: torch.Tensor) -> None:
    # resnet-basic ends its blocks with in-place adds and ReLUs on the conv outputs
    _, _, worst, scale, _ = run_both(build("resnet-basic"), video_stream[:8], threshold=0.0, block=2)
    assert worst <= 1e-4 * scale


def test_outputs_handed_out_are_checked_and_model_outputs_are_copies(video_stream: torch.Tensor) -> None:
    """Layers hand out their state without a copy; a write into it is repaired (z recomputed from the
    reference input) and the layer hands out copies from then on; a model's own outputs are copies the
    caller may keep; convert() turns in-place activation modules out-of-place."""
    head = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(8, 4, 1)
    )
    model = sc.convert(head, threshold=0.0, block=2, backend="sparse")
    for _, layer in sc.engine.skip_layers(model):
        layer.crossover = 1.0
    with torch.no_grad():
        kept = [model(frame) for frame in video_stream[:6]]
        for got, frame in zip(kept, video_stream[:6], strict=True):
            torch.testing.assert_close(got, head(frame), rtol=1e-5, atol=1e-5)
        first = model[0]
        out = first(video_stream[6])
        assert out.data_ptr() == first._sparse_state.z.data_ptr(), "an inner output is the state itself"
        out.mul_(0.0)  # a downstream in-place op
        again = first(video_stream[7])
        assert first.copy_outputs, "after a write into its output the layer hands out copies"
        assert again.data_ptr() != first._sparse_state.z.data_ptr()
        assert first.fused_activation is not None, "the ReLU that alone reads the conv is fused into it"
        torch.testing.assert_close(again, head[1](head[0](video_stream[7])), rtol=1e-5, atol=1e-5)
    assert all(not m.inplace for m in model.modules() if hasattr(m, "inplace"))


def test_gradients_and_lossy_reference_use_the_reference_path() -> None:
    model = sc.convert(plain_net(), backend="sparse").train()
    frame = torch.rand(1, 3, 32, 32)
    model(frame)
    out = model(frame + 0.1)
    assert out.requires_grad, "with gradients the layer runs the reference path"
    lossy = sc.convert(plain_net(), backend="sparse", reference="previous")
    with torch.no_grad():
        lossy(frame)
        lossy(frame + 0.1)
    assert all(layer._sparse_state is None for _, layer in sc.engine.skip_layers(lossy))


def test_set_backend_switches_and_restarts_the_stream() -> None:
    model = sc.convert(plain_net(), threshold=0.0, backend="reference")
    frames = torch.rand(1, 1, 3, 32, 40).repeat(3, 1, 1, 1, 1)
    frames[1:, ..., 4:12, 8:20] += 0.5  # a local change: most of the map is skipped
    with torch.no_grad():
        expected = [model(f) for f in frames]
        sc.set_backend(model, "sparse")
        assert all(layer.backend == "sparse" for _, layer in sc.engine.skip_layers(model))
        for _, layer in sc.engine.skip_layers(model):
            layer.crossover = 1.0  # the tile path (tiny maps would be tuned to plain convolutions)
        sc.reset_stats(model)
        got = [model(f) for f in frames]
    assert sc.report(model)["layers"][0]["active_fraction"] < 1.0
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        sc.set_backend(model, "cuda-magic")
    with pytest.raises(ValueError, match="backend must be one of"):
        sc.convert(plain_net(), backend="fast")


def test_batch_streams_and_inference_mode() -> None:
    generator = torch.Generator().manual_seed(0)
    stream = torch.rand(6, 2, 3, 40, 48, generator=generator)
    stream[1:, 0] = stream[0, 0]  # stream 0 is static, stream 1 changes every frame
    reference = sc.convert(build("hrnet-fusion"), threshold=0.3, block=4, backend="reference")
    fast = sc.convert(build("hrnet-fusion"), threshold=0.3, block=4, backend="sparse")
    for _, layer in sc.engine.skip_layers(fast):
        layer.crossover = 1.0  # the tile path on every layer, so that the reports match
    with torch.inference_mode():
        for frame in stream:
            torch.testing.assert_close(fast(frame), reference(frame), rtol=0, atol=1e-4)
    assert sc.report(fast) == sc.report(reference)


def test_a_layer_whose_input_is_an_unchanged_idle_output_skips_its_scan(monkeypatch) -> None:
    """Layer b reads layer a's output directly (through a fused ReLU). When a frame leaves a unchanged, b's
    next frame is idle without the C++ step; when a writes, b runs its step again; outputs stay exact."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)
    ).eval()
    model = sc.convert(net, threshold=0.0, block=4, backend="sparse")
    a, b = model[0], model[2]
    for layer in (a, b):
        layer.crossover = 1.0
    steps: list[str] = []
    real_step = sparse.native_step

    def counting_step(layer, state, x, forced=None, **options):
        steps.append("a" if layer is a else "b")
        return real_step(layer, state, x, forced, **options)

    monkeypatch.setattr(sparse, "native_step", counting_step)
    torch.manual_seed(0)
    still = torch.rand(1, 3, 32, 32)
    moved = still.clone()
    moved[..., 4:10, 4:10] += 0.5
    frames = [still, still, still, moved, moved, moved]
    expected = [net(f) for f in frames]
    got = []
    with torch.no_grad():
        for frame in frames:
            steps.clear()
            got.append((model(frame), list(steps)))
    per_frame = [s for _, s in got]
    # frame 0 dense (b takes a's output whole: a record to scan from); 1: a scans (its input carries no
    # revision) and is idle, b's input is unchanged since it took it: b skips its scan; 2: the same;
    # 3: a writes, b scans; 4: a idle, b scans (its last frame was not idle); 5: a idle, b skips
    assert per_frame == [[], ["a"], ["a"], ["a", "b"], ["a", "b"], ["a"]]
    for (out, _), want in zip(got, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert b.backend_stats()["idle_frames"] == 4 and b.backend_stats()["sparse_frames"] == 1


def test_after_taking_a_frame_whole_a_layer_scans_only_what_changed_since(monkeypatch) -> None:
    """A busy frame that takes the input whole (pinned crossover) leaves x_ref = x: the next frame scans
    incrementally from there, or not at all when the layer before left its output unchanged; outputs stay
    exact against the dense model."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)
    ).eval()
    model = sc.convert(net, threshold=0.0, block=4, backend="sparse")
    a, b = model[0], model[2]
    a.crossover, b.crossover = 1.0, 0.25  # b: a frame with more than 16 of its 64 blocks active is busy
    scans: list[tuple[str, bool]] = []
    real_step = sparse.native_step

    def counting_step(layer, state, x, forced=None, incremental=False, **options):
        scans.append(("a" if layer is a else "b", incremental))
        return real_step(layer, state, x, forced, incremental, **options)

    monkeypatch.setattr(sparse, "native_step", counting_step)
    torch.manual_seed(0)
    still = torch.rand(1, 3, 32, 32)
    wide = still.clone()
    wide[..., 2:30, 2:30] += 0.5  # busy for b: it takes the frame whole
    small = wide.clone()
    small[..., 12:14, 12:14] -= 0.3  # one frame's small change after the take
    frames = [still, wide, wide, small]
    got = []
    with torch.no_grad():
        for frame in frames:
            scans.clear()
            got.append((model(frame), [s for s in scans if s[0] == "b"]))
            if frame is frames[1]:
                assert b.last_gate.all()  # a busy frame reports every block gated, taken or not
    # 1: b scans what a wrote (from the first frame's record), is busy and takes the frame; 2: a idle, b's
    # input unchanged since the take: no step; 3: a writes a few pixels, b scans only those
    assert [s for _, s in got] == [[], [("b", True)], [], [("b", True)]]
    assert b.backend_stats()["dense_frames"] == 2  # (the stream's first frame and the busy one)
    for (out, _), frame in zip(got, frames, strict=True):
        torch.testing.assert_close(out, net(frame), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_incremental_scans_gate_exactly_as_full_scans(
    arch: str, video_stream: torch.Tensor, monkeypatch
) -> None:
    """A layer reading the previous layer's output rescans only what that layer wrote (its marks): the
    gates and outputs are bit-identical to full scans, frame by frame, at several blocks and thresholds."""
    dense_model = build(arch)
    real_step = sparse.native_step
    incremental_steps = []

    def watching_step(layer, state, x, forced=None, incremental=False, marks=None, limits=None):
        incremental_steps.append(incremental)
        return real_step(layer, state, x, forced, incremental, marks, limits)

    monkeypatch.setattr(sparse, "native_step", watching_step)

    def run(block: int, threshold: float) -> list[tuple[torch.Tensor, list]]:
        model = sc.convert(dense_model, threshold=threshold, block=block, backend="sparse")
        for _, layer in sc.engine.skip_layers(model):
            layer.crossover = 1.0
        frames = []
        with torch.no_grad():
            for frame in video_stream:
                out = model(frame).clone()
                frames.append((out, [layer.last_gate for _, layer in sc.engine.skip_layers(model)]))
        return frames

    for block, threshold in ((1, 0.05), (4, 0.3)):
        incremental = run(block, threshold)
        with monkeypatch.context() as patch:
            patch.setattr(sparse, "writes_since_scan", lambda state, x, limits: None)
            full = run(block, threshold)
        for (out_a, gates_a), (out_b, gates_b) in zip(incremental, full, strict=True):
            assert torch.equal(out_a, out_b), (arch, block)
            assert all(torch.equal(a, b) for a, b in zip(gates_a, gates_b, strict=True) if a is not None)
    assert any(incremental_steps), f"{arch}: no layer scanned incrementally"


@pytest.mark.skipif(sparse.native.extension() is None, reason="needs the C++ step (built in CI)")
def test_pixel_layer_on_a_small_map_goes_busy_by_blocks_not_tiles() -> None:
    """On an 8x8 map one execution tile is the whole map; a change in one corner gates one of the four
    blocks, which the pixel path recomputes alone (a tile count would have called the frame busy)."""
    layer = sc.SkipConv2d(16, 16, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    dense = torch.nn.Conv2d(16, 16, 3, padding=1)
    dense.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    first = torch.rand(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    second = first.clone()
    second[..., :2, :2] += 1.0
    with torch.no_grad():
        layer(first)
        layer._sparse_state.crossover = 0.5
        units, _, path, outputs_run = sparse.native_step(
            layer, layer._sparse_state, second.contiguous(memory_format=torch.channels_last)
        )
        assert (units, path, outputs_run) == (1, sparse.native.PATH_TILES, 9)  # outputs [0, 3) x [0, 3)
        torch.testing.assert_close(layer._sparse_state.z, dense(second), atol=1e-5, rtol=0)


@pytest.mark.skipif(sparse.native.extension() is None, reason="needs the C++ step (built in CI)")
def test_the_tuners_gate_alone_point_is_the_scan_alone() -> None:
    """The tuner times "the gate alone" as a forced step with no units: it must cost what an idle frame does
    (the scan), not also the footprint pass of a sparse frame, or cheap layers look gate-bound and go plain
    (HRNet-w32's first conv did: 465 us "gate" for a 417 us convolution)."""
    layer = sc.SkipConv2d(8, 16, 3, padding=1, threshold=0.0, block=4, backend="sparse")
    first = torch.rand(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer(first)
        state = layer._sparse_state
        state.maps.mark.fill_(7)  # a value no pass writes
        x = first.contiguous(memory_format=torch.channels_last)
        result = sparse.native_step(layer, state, x, torch.empty(0, dtype=torch.long))
    assert result == [0, 0, 3, 0]
    assert (state.maps.mark == 7).all(), "the footprint pass ran"
