"""Threshold 0 is exact over long real streams, for every gate, block size and architecture; above 0 the
pending reference keeps the error bounded where the paper's lossy reference drifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import skipconv_cli as sc
from skipconv_cli.engine.gates import BLOCK_SIZES, GATES
from tests.archs import ARCHITECTURES, build, plain_net
from tests.conftest import read_frames

STREAM_FRAMES = 200


@pytest.fixture(scope="module")
def person_stream(videos_dir) -> torch.Tensor:
    """200 consecutive frames of the person clip, small enough for the reference path: [T, 1, 3, 64, 112]."""
    frames = read_frames(
        videos_dir / "one-by-one-person-detection.mp4", STREAM_FRAMES, start=1150, size=(112, 64)
    )
    stream = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255.0)
    return stream.unsqueeze(1)


def run_stream(model: torch.nn.Module, stream: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(frame) for frame in stream]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_threshold_zero_is_exact_for_every_gate_and_block(arch: str, person_stream: torch.Tensor) -> None:
    dense_model = build(arch)
    dense = run_stream(dense_model, person_stream)
    scale = max(out.abs().max().item() for out in dense)
    for gate in GATES:
        for block in BLOCK_SIZES:
            skip_model = sc.convert(dense_model, gate=gate, threshold=0.0, block=block, backend="reference")
            skip = run_stream(skip_model, person_stream)
            worst = max((s - d).abs().max().item() for s, d in zip(skip, dense, strict=True))
            assert worst <= 1e-4 * scale, (
                f"{arch} {gate} block {block}: max diff {worst:.3g} (scale {scale:.3g})"
            )
            stats = sc.report(skip_model)
            assert stats["frames"] == STREAM_FRAMES
            if block == 1 and gate != "gumbel":
                # compression noise touches most pixels, but some outputs see no change at all
                assert stats["macs"]["reduction"] > 1.0, f"{arch} {gate} skipped nothing"


def slow_change_stream(frames: int = 120, step: float = 2.0) -> torch.Tensor:
    """A static scene where one region brightens by ``step`` grey levels per frame."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 64, 64, generator=generator) * 200.0
    stream = []
    for t in range(frames):
        frame = base.clone()
        frame[..., 16:40, 20:44] += step * t
        stream.append(frame / 255.0)
    return torch.stack(stream)


def errors_against_dense(reference: str, stream: torch.Tensor, threshold: float, **options) -> list[float]:
    dense_model = plain_net()
    options = {"gate": "output-norm", "threshold": threshold, "reference": reference, **options}
    skip_model = sc.convert(dense_model, backend="reference", **options)
    dense, skip = run_stream(dense_model, stream), run_stream(skip_model, stream)
    return [(s - d).abs().max().item() for s, d in zip(skip, dense, strict=True)]


def test_pending_reference_stays_bounded_while_lossy_reference_drifts() -> None:
    stream = slow_change_stream()
    threshold = 0.04
    # the per-frame change stays below the threshold, so the lossy reference never catches up with it
    lossy = errors_against_dense("previous", stream, threshold)
    pending = errors_against_dense("pending", stream, threshold)
    assert lossy[-1] > 4 * lossy[20], f"lossy error did not grow: {lossy[20]:.3g} -> {lossy[-1]:.3g}"
    early, late = max(pending[1:40]), max(pending[80:])
    assert late <= 1.2 * early, f"pending error grows with stream length: {early:.3g} -> {late:.3g}"
    assert lossy[-1] > 5 * late, f"pending {late:.3g} vs lossy {lossy[-1]:.3g}"
    skip_model = sc.convert(plain_net(), gate="output-norm", threshold=threshold, backend="reference")
    run_stream(skip_model, stream)
    assert sc.report(skip_model)["macs"]["reduction"] > 2.0, "pending should still skip most of the work"


def test_reset_every_bounds_the_lossy_error() -> None:
    stream = slow_change_stream()
    never = errors_against_dense("previous", stream, 0.04)
    every_4 = errors_against_dense("previous", stream, 0.04, reset_every=4)
    assert max(every_4[::4]) == 0.0, "reset frames are dense"
    assert max(every_4) < 0.25 * max(never)
