"""The sparse backend agrees with the reference backend on the built-in models over real frames."""

from __future__ import annotations

import pytest
import torch

import skipconv_cli as sc
from skipconv_cli.models.factory import create_model, resolve_spec
from tests.conftest import read_frames


def first_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(
    ("model", "size"),
    [("light-person", (192, 192)), ("nanodet-m", (192, 224)), ("openpose-mbv2-05", (192, 224))],
)
def test_sparse_matches_reference_on_builtin_models(
    model: str, size: tuple[int, int], weights_dir, videos_dir
) -> None:
    loaded = create_model(resolve_spec(model, None), weights_dir / resolve_spec(model, None).weights)
    frames = read_frames(videos_dir / "car-detection.mp4", 8, start=180)
    inputs = [loaded.spec.preprocess(frame, size)[0] for frame in frames]
    with torch.no_grad():
        dense = [first_output(loaded.module(x)) for x in inputs]
        # float32 noise of the model itself: the same dense pass in the layout the sparse backend uses
        channels_last = loaded.module.to(memory_format=torch.channels_last)
        layout_noise = max(
            (first_output(channels_last(x)) - d).abs().max().item()
            for x, d in zip(inputs, dense, strict=True)
        )
        loaded.module.to(memory_format=torch.contiguous_format)
    scale = max(d.abs().max().item() for d in dense)
    tolerance = max(1e-4 * scale, 2 * layout_noise)
    for gate, threshold, block in (("output-norm", 0.0, 1), ("output-norm", 0.1, 4), ("input-norm", 0.05, 8)):
        outputs = {}
        for backend in ("reference", "sparse"):
            model_ = sc.convert(loaded.module, gate=gate, threshold=threshold, block=block, backend=backend)
            for _, layer in sc.engine.skip_layers(model_):
                layer.crossover = 1.0  # the tile path everywhere (no plain layers), so MACs compare
            with torch.no_grad():
                outputs[backend] = [first_output(model_(x)) for x in inputs]
            outputs[backend + "_macs"] = sc.report(model_)["macs"]
        worst = max(
            (a - b).abs().max().item() for a, b in zip(outputs["reference"], outputs["sparse"], strict=True)
        )
        assert worst <= tolerance, f"{model} {gate} {threshold} block {block}: {worst:.3g} > {tolerance:.3g}"
        # sparse recomputes tiles where reference accumulates deltas: last-bit differences make a few
        # downstream residuals exactly zero in one backend and not in the other, flipping those decisions
        ratio = outputs["reference_macs"]["executed"] / outputs["sparse_macs"]["executed"]
        assert ratio == pytest.approx(1.0, rel=0.01)
