"""`skipconv profile`: dense and skip timed in one run, with the JSON a script reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import skipconv


def test_profile_json_has_times_macs_and_layers(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = skipconv(
        "profile", "sample:person", "--model", "light-person", "--max-frames", "8", "--warmup", "2",
        "--threads", "1", "--block", "4", "--json", str(out), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    time_ = data["time"]
    assert time_["dense_ms_per_frame"] > 0 and time_["skip_ms_per_frame"] > 0
    assert time_["speedup"] == time_["dense_ms_per_frame"] / time_["skip_ms_per_frame"]
    # 8 frames are too few to leave a stream's start out: the settled speedup is the whole run's
    assert time_["start_frames"] == 0 and time_["speedup_after_start"] == time_["speedup"]
    assert data["macs"]["reduction"] > 1.0 and data["frames"] == 8
    assert data["realised"] == time_["speedup"] / data["macs"]["reduction"]
    layers = data["layers"]
    assert len(layers) == 113 and all(layer["dense_ms"] > 0 and layer["skip_ms"] > 0 for layer in layers)
    for layer in layers:  # the path each layer ran most, and the frames behind it
        path, share = layer["ran_as"].split()
        counts = {k: layer["backend"][f"{k}_frames"] for k in ("sparse", "idle", "plain", "dense")}
        assert sum(counts.values()) == 8, layer["name"]
        assert counts["sparse" if path == "tiles" else path] == max(counts.values())
        assert share == f"{100 * max(counts.values()) / 8:.0f}%"
    assert data["dense_layout"] in ("nchw", "channels_last")
    # the CPU code the sparse backend ran, as the engine names it for this machine
    from skipconv_cli.engine.backends import native

    assert data["cpu_kernel"] == native.kernel_name() and data["cpu_kernel"] in result.stdout
    assert data["memory"]["state_bytes_per_stream"] > 0 and data["memory"]["dense_peak_activation_bytes"] > 0
    assert data["memory"]["weight_layout_bytes"] > 0
    assert "faster" in result.stdout and "of the MAC reduction realised" in result.stdout


def test_profile_at_threshold_zero_matches_dense(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = skipconv(
        "profile", "sample:cars", "--model", "light-person", "--threshold", "0", "--max-frames", "6",
        "--warmup", "1", "--threads", "1", "--backend", "reference", "--json", str(out), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["output_difference"]["relative_to_output_scale"] < 1e-4


def test_end_to_end_times_are_taken_without_layer_timers(weights_dir, videos_dir) -> None:
    """The timed pass runs without per-layer hooks (they cost each module call microseconds); the layer
    times come from a pass of their own, which leaves the first pass's statistics and no hook behind."""
    import torch

    from skipconv_cli.engine.skip_conv import SkipConv2d
    from skipconv_cli.models.factory import create_model, resolve_spec
    from skipconv_cli.pipeline import profile
    from skipconv_cli.pipeline.runner import SkipSettings
    from tests.conftest import read_frames

    spec = resolve_spec("light-person", None)
    loaded = create_model(spec, weights_dir / spec.weights)
    frames = read_frames(videos_dir / "one-by-one-person-detection.mp4", 5, start=100)
    settings = SkipSettings(gate="output-norm", threshold=0.1, block=4, backend="sparse")
    hooked_calls = []
    real = profile._interleaved

    def spy(dense, skip, inputs, device, on_frame=None):
        hooked_calls.append(sum(bool(m._forward_hooks) for m in skip.modules() if isinstance(m, SkipConv2d)))
        return real(dense, skip, inputs, device, on_frame)

    profile._interleaved = spy
    try:
        torch.set_num_threads(1)
        quick = profile.profile_model(loaded, settings, frames, (192, 192), warmup=1, layer_times=False)
        full = profile.profile_model(loaded, settings, frames, (192, 192), warmup=1)
    finally:
        profile._interleaved = real
    assert hooked_calls[0] == 0 and hooked_calls[1] == 0 and hooked_calls[2] > 0, hooked_calls
    assert all(layer["dense_ms"] == 0 and layer["skip_ms"] == 0 for layer in quick["layers"])
    assert all(layer["dense_ms"] > 0 and layer["skip_ms"] > 0 for layer in full["layers"])
    for layer in full["layers"]:  # the timed pass's frames, not both passes'
        counts = [layer["backend"][f"{k}_frames"] for k in ("sparse", "idle", "plain", "dense")]
        assert sum(counts) == len(frames), layer["name"]


def test_run_compares_with_the_same_dense_baseline_as_profile(videos_dir) -> None:
    # the unconverted hrnet-w32 has 292 BatchNorms and runs NCHW: a slower dense model than profile's
    from torch import nn

    from skipconv_cli.engine.onednn import OneDNNConv2d
    from skipconv_cli.models.factory import create_model, resolve_spec
    from skipconv_cli.pipeline.runner import DenseComparison, Predictor, SkipSettings, skip_model
    from tests.conftest import read_frames

    loaded = create_model(resolve_spec("hrnet-w32", None))
    skip = Predictor(loaded, skip_model(loaded, SkipSettings(backend="sparse")), (256, 256), 0.1)
    dense = DenseComparison.alongside(skip).predictor
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dense.model.modules())
    convs = [m for m in dense.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # small maps on oneDNN, not PyTorch's slower native kernel (engine.onednn)
    assert all(type(c) is OneDNNConv2d for c in convs)
    frame = read_frames(videos_dir / "one-by-one-person-detection.mp4", 1, start=1250)[0]
    x = loaded.spec.preprocess(frame, (256, 256))[0]
    with torch.no_grad():
        unconverted, baseline = loaded.module(x), dense.model(x.contiguous(memory_format=torch.channels_last))
    assert (baseline - unconverted).abs().max() <= 1e-4 * unconverted.abs().max()  # BatchNorm folded exactly


@pytest.mark.parametrize(
    "option", [["--warmup", "-1"], ["--top", "-3"], ["--threads", "0"], ["--max-frames", "0"]]
)
def test_profile_refuses_bad_counts_in_one_line(option: list[str]) -> None:
    # (a negative --warmup or --top sliced the frames or the table from the end and went on)
    result = skipconv("profile", "sample:person", "--model", "light-person", *option)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and option[0] in lines[0]


def test_profile_runs_streams_as_one_batch(env: dict, tmp_path: Path) -> None:
    """--streams N: N consecutive segments of the clip in one batch (as N cameras); each stream exact at
    threshold 0, MACs counted for all of them, memory per stream; a clip too short for them is refused."""
    runs = {}
    for streams in (1, 3):
        out = tmp_path / f"profile{streams}.json"
        result = skipconv(
            "profile", "sample:person", "--model", "light-person", "--max-frames", "6",
            "--streams", str(streams), "--warmup", "1", "--threads", "1", "--threshold", "0", "--block", "4",
            "--json", str(out), env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[streams] = (json.loads(out.read_text()), result.stdout)
    (one, _), (three, stdout) = runs[1], runs[3]
    assert three["streams"] == 3 and three["frames"] == 6 and "batch of 3 streams" in stdout
    assert three["output_difference"]["relative_to_output_scale"] < 1e-4
    assert three["macs"]["dense"] == 3 * one["macs"]["dense"]
    # per stream: the same network and input size, so the same dense peak and about the same state
    assert three["memory"]["dense_peak_activation_bytes"] == one["memory"]["dense_peak_activation_bytes"]
    assert 0.9 < three["memory"]["state_bytes_per_stream"] / one["memory"]["state_bytes_per_stream"] < 1.1

    short = skipconv(
        "profile", "sample:cars", "--model", "light-person", "--max-frames", "200", "--streams", "2"
    )
    lines = [line for line in short.stderr.splitlines() if line.strip()]
    assert short.returncode == 1 and len(lines) == 1 and "--streams 2 needs 2 x --max-frames 200" in lines[0]
