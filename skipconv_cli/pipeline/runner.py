"""Video in, predictions and reports out: preprocess -> infer -> postprocess, each stage timed.

Frames come from a generator (constant memory on long streams); outputs are written frame by frame so an
interrupted run leaves valid files behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skipconv_cli.engine import (
    convert,
    fold_batchnorms,
    fuse_activations,
    keep_freed_memory,
    report,
    reset_stats,
    skip_layers,
    use_onednn,
)
from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.factory import LoadedModel
from skipconv_cli.models.registry import Letterbox
from skipconv_cli.pipeline.annotate import draw_boxes, draw_hud, draw_persons, overlay_mask
from skipconv_cli.pipeline.fidelity import fidelity
from skipconv_cli.pipeline.video import FrameSource, JsonLinesWriter, VideoWriter


@dataclass(frozen=True)
class SkipSettings:
    """How the model is converted. ``dense`` computes every frame fully (same accounting, reduction 1.0)."""

    gate: str = "output-norm"
    threshold: float | Mapping[str, float] = 0.3
    block: int = 1
    reset_every: int | None = None
    dense: bool = False
    backend: str = "sparse"
    gates: Path | None = None  # learned Gumbel gates (train-gates), applied after conversion

    @property
    def backend_used(self) -> str:
        """The backend the model runs: ``dense`` runs the sparse backend's plain frames, whatever
        ``backend`` says (see ``skip_model``)."""
        return "sparse" if self.dense else self.backend


def parse_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """``"HxW"`` or ``"S"`` -> (height, width), multiples of 32 or the model's own default (the pose
    models' 368x432 is not a multiple of 32)."""
    if text is None:
        return default
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise SkipconvError(
            f"--size must be HEIGHTxWIDTH or one number, e.g. 736x1280; got {text!r}"
        ) from None
    size = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts)
    if size == tuple(default):
        return default
    if len(size) != 2 or min(size) < 32 or any(s % 32 for s in size):
        raise SkipconvError(f"--size must be multiples of 32 (e.g. 416 or 736x1280); got {text!r}")
    return size  # type: ignore[return-value]


def skip_model(loaded: LoadedModel, settings: SkipSettings) -> nn.Module:
    """The converted model. ``dense``: every layer a plain convolution on every frame (the sparse backend's
    plain frames, whatever ``backend`` says), so that a dense run costs what the dense model does and its
    report has the same per-layer entries, every MAC executed. Like ``dense_baseline``, it sets the process's
    allocator to keep freed maps (``keep_freed_memory``): frames do not page-fault their maps in anew."""
    keep_freed_memory()
    options: dict = {"gate": settings.gate, "block": settings.block, "backend": settings.backend_used}
    if settings.dense:
        # (recomputing every frame through the Skip-Conv machinery instead, reset_every=1, laid out the
        # state anew each frame: light-person 45 ms a frame with the sparse backend, 34 with the reference
        # one, where the dense model takes 16)
        options |= {"threshold": 0.0}
    else:
        options |= {"threshold": settings.threshold, "reset_every": settings.reset_every}
    try:
        model = convert(loaded.module, **options)
    except ValueError as e:
        raise SkipconvError(str(e)) from e
    if settings.dense:
        for _, layer in skip_layers(model):
            layer.always_plain = True
    if settings.gates is not None and not settings.dense:
        from skipconv_cli.pipeline.gates_file import load_gates

        gates = load_gates(settings.gates)
        gates.check_matches(loaded.name, loaded.weights_sha256, settings.block)
        gates.apply(model)
    return model


def dense_baseline(loaded: LoadedModel, device: torch.device | None = None) -> nn.Module:
    """The dense model that skipping is compared with: a copy with BatchNorm folded and activations fused
    in place, as ``convert`` does, so that only skipping is credited; freed maps kept in the process
    (``keep_freed_memory``), as for the skip model: a baseline that page-faults its maps every frame ran up
    to 40% slower (openpose-mbv2-14: 49 vs 35 ms a frame)."""
    keep_freed_memory()
    dense = use_onednn(fuse_activations(fold_batchnorms(loaded.module)))  # (see engine.onednn)
    return dense.to(device or torch.device("cpu")).eval()


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over frames."""

    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    frames: int = 0

    def ms_per_frame(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {
            "preprocess": 1000 * self.preprocess / n,
            "infer": 1000 * self.infer / n,
            "postprocess": 1000 * self.postprocess / n,
            "total": 1000 * (self.preprocess + self.infer + self.postprocess) / n,
        }


@dataclass
class Predictor:
    """Runs one model on frames: the three stages, with timers."""

    loaded: LoadedModel
    model: nn.Module
    input_size: tuple[int, int]
    score_threshold: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    times: StageTimes = field(default_factory=StageTimes)
    channels_last: bool = False  # hand the model its input in channels_last (see ``DenseComparison``)

    def __call__(self, frame: np.ndarray) -> tuple[dict, Letterbox]:
        spec = self.loaded.spec
        t0 = time.perf_counter()
        tensor, box = spec.preprocess(frame, self.input_size)
        tensor = tensor.to(self.device)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        with torch.no_grad():
            raw = self.model(tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        predictions = spec.postprocess(first_sample(raw), box, self.score_threshold)
        t3 = time.perf_counter()
        self.times.preprocess += t1 - t0
        self.times.infer += t2 - t1
        self.times.postprocess += t3 - t2
        self.times.frames += 1
        return predictions, box


@dataclass
class DenseComparison:
    """The dense model run alongside on the same frames: its predictions are the reference that fidelity
    is measured against (no video comes with labels), its time the one to compare with.
    """

    predictor: Predictor
    reference: list[dict] = field(default_factory=list)
    predicted: list[dict] = field(default_factory=list)

    @classmethod
    def alongside(cls, skip: Predictor) -> DenseComparison:
        """A dense predictor with ``skip``'s model, input size, score threshold and device: the dense
        baseline in channels_last, weights and input, the layout oneDNN runs fastest on every benchmark row
        (the unconverted model, NCHW, took ~200 ms a frame where this takes ~110 on openpose-mbv2-14: it
        flattered skipping)."""
        module = dense_baseline(skip.loaded, skip.device).to(memory_format=torch.channels_last)
        dense = Predictor(
            loaded=skip.loaded,
            model=module,
            input_size=skip.input_size,
            score_threshold=skip.score_threshold,
            device=skip.device,
            channels_last=True,
        )
        return cls(predictor=dense)

    def add(self, frame: np.ndarray, predicted: dict) -> dict:
        """Runs the dense model on ``frame``, keeps both predictions, returns the dense one."""
        reference, _ = self.predictor(frame)
        self.reference.append(reference)
        self.predicted.append(predicted)
        return reference

    def summary(self) -> dict:
        """``{"fidelity": {"metric", "value"}, "dense_time_ms_per_frame": ...}`` over the frames so far."""
        if not self.reference:
            return {}
        return {
            "fidelity": fidelity(self.predictor.loaded.spec.task, self.reference, self.predicted),
            "dense_time_ms_per_frame": self.predictor.times.ms_per_frame(),
        }


def first_sample(raw):
    """The outputs of sample 0, in the same structure (tensor, tuple or dict of tensors)."""
    if isinstance(raw, torch.Tensor):
        return raw[0:1]
    if isinstance(raw, (tuple, list)):
        return type(raw)(first_sample(r) for r in raw)
    if isinstance(raw, dict):
        return {k: first_sample(v) for k, v in raw.items()}
    return raw


def computed_map(model: nn.Module, box: Letterbox) -> np.ndarray:
    """Where the network computed on the last frame, in frame pixels: the share of layers (0..1) that
    recomputed each location, mapped back through the letterbox."""
    input_size = box.input_size
    maps = [
        F.interpolate(layer.last_computed[0:1].float(), size=input_size, mode="nearest")
        for _, layer in skip_layers(model)
        if layer.last_computed is not None
    ]
    heat = torch.stack(maps).mean(0)[0, 0].cpu().numpy()
    h, w = box.frame_size
    x0, y0 = int(round(box.pad_x)), int(round(box.pad_y))
    x1 = min(input_size[1], x0 + max(1, int(round(w * box.scale))))
    y1 = min(input_size[0], y0 + max(1, int(round(h * box.scale))))
    return cv2.resize(heat[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_NEAREST)


def annotate(
    frame: np.ndarray, predictions: dict, loaded: LoadedModel, heat: np.ndarray | None
) -> np.ndarray:
    out = overlay_mask(frame, heat) if heat is not None else frame
    if "boxes" in predictions:
        return draw_boxes(out, predictions["boxes"], loaded.spec.labels)
    from skipconv_cli.models.pose import COCO18_LIMBS

    return draw_persons(out, predictions["persons"], COCO18_LIMBS)


@dataclass
class RunOutputs:
    video: Path | None = None
    predictions: Path | None = None
    report: Path | None = None
    show_mask: bool = False


@dataclass
class RunResult:
    report: dict
    frames: int
    truncated: bool
    interrupted: bool


def iterate_predictions(
    source: FrameSource, predictor: Predictor
) -> Iterator[tuple[int, np.ndarray, dict, Letterbox]]:
    for index, frame in enumerate(source):
        predictions, box = predictor(frame)
        yield index, frame, predictions, box


def run_video(
    source: FrameSource,
    predictor: Predictor,
    outputs: RunOutputs,
    settings: SkipSettings,
    on_frame: Callable[[int, dict], None] | None = None,
    compare: DenseComparison | None = None,
) -> RunResult:
    """Processes every frame of ``source`` and writes the requested outputs as it goes.

    With ``compare``, the dense model also runs on every frame and the report gains ``"fidelity"``.

    On KeyboardInterrupt the video and JSON Lines written so far are closed cleanly and a report of the
    processed frames is written (marked ``"interrupted": true``) before the interrupt propagates.
    """
    reset_stats(predictor.model)
    frames = 0
    interrupted = False
    try:
        with ExitStack() as stack:
            video = stack.enter_context(VideoWriter(outputs.video, source.fps)) if outputs.video else None
            lines = stack.enter_context(JsonLinesWriter(outputs.predictions)) if outputs.predictions else None
            for index, frame, predictions, box in iterate_predictions(source, predictor):
                frames = index + 1
                if compare is not None:
                    compare.add(frame, predictions)
                if lines is not None:
                    lines.write({"frame": source.start + index, **predictions})  # the video's numbering
                if video is not None:
                    heat = computed_map(predictor.model, box) if outputs.show_mask else None
                    annotated = annotate(frame, predictions, predictor.loaded, heat)
                    video.write(draw_hud(annotated, hud_lines(predictor, settings)))
                if on_frame is not None:
                    on_frame(index, predictions)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        result = RunResult(
            report=run_report(predictor, settings, source, interrupted, compare),
            frames=frames,
            truncated=source.truncated,
            interrupted=interrupted,
        )
        if outputs.report is not None:
            write_json(outputs.report, result.report)
    return result


def hud_lines(predictor: Predictor, settings: SkipSettings) -> list[str]:
    stats = report(predictor.model)["macs"]
    mode = "dense" if settings.dense else f"{settings.gate} t={_threshold_label(settings)} b={settings.block}"
    ms = predictor.times.ms_per_frame()["total"]
    return [f"{predictor.loaded.name}  {mode}", f"MACs /{stats['reduction']:.2f}   {ms:.0f} ms/frame"]


def _threshold_label(settings: SkipSettings) -> str:
    return "per-layer" if isinstance(settings.threshold, Mapping) else f"{settings.threshold:g}"


def run_report(
    predictor: Predictor,
    settings: SkipSettings,
    source: FrameSource,
    interrupted: bool,
    compare: DenseComparison | None = None,
) -> dict:
    """``report()`` of the converted model plus what produced it (and its fidelity, with ``compare``)."""
    stats = report(predictor.model)
    return {
        **stats,
        "model": predictor.loaded.name,
        "task": predictor.loaded.spec.task,
        "weights_sha256": predictor.loaded.weights_sha256,
        "gate": None if settings.dense else settings.gate,
        "threshold": None if settings.dense else _threshold_json(settings.threshold),
        "block": settings.block,
        "backend": "plain" if settings.dense else settings.backend,
        "gates": None if settings.dense or settings.gates is None else str(settings.gates),
        "dense": settings.dense,
        "resolution": list(predictor.input_size),
        "input": source.name,
        "start": source.start,
        "time_ms_per_frame": predictor.times.ms_per_frame(),
        "interrupted": interrupted,
        "truncated": source.truncated,
        **(compare.summary() if compare is not None else {}),
    }


def _threshold_json(threshold: float | Mapping[str, float]) -> float | dict[str, float]:
    return dict(threshold) if isinstance(threshold, Mapping) else float(threshold)


def write_json(path: Path, data: dict) -> None:
    """Writes through a temp file and a rename, so a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
