"""Dense vs skip on the same frames in one process: end-to-end time, per-layer time, MACs, output error.

Both models see every frame in turn (dense, then skip) after a warm-up, so machine load affects both
alike; the ratio of speedup to MAC reduction says how much of the theoretical gain became real.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from skipconv_cli.engine import (
    FollowsSparsity,
    SkipConv2d,
    report,
    reset,
    reset_stats,
    skip_layers,
)
from skipconv_cli.engine.backends import native
from skipconv_cli.engine.onednn import OneDNNConv2d
from skipconv_cli.models.factory import LoadedModel
from skipconv_cli.pipeline.runner import SkipSettings, dense_baseline, skip_model


@dataclass
class LayerTimer:
    """Wall time spent inside each named module, via forward pre/post hooks."""

    seconds: dict[str, float] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)

    @classmethod
    def attach(cls, model: nn.Module, kinds: tuple[type, ...]) -> tuple[LayerTimer, list]:
        timer = cls()
        handles = []
        for name, module in model.named_modules():
            if type(module) in kinds:
                handles.append(module.register_forward_pre_hook(partial(timer._start, name)))
                handles.append(module.register_forward_hook(partial(timer._stop, name)))
        return timer, handles

    def _start(self, name: str, module: nn.Module, args: tuple) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._started[name]


START_FRAMES = 10  # frames of a stream's start left out of ``speedup_after_start``


def peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of module outputs alive at once during one dense forward (a measure of the dense model's
    activation memory; temporaries inside a single op are not counted)."""
    live: dict[int, int] = {}
    peak = 0

    def release(ptr: int) -> None:
        live.pop(ptr, None)

    def on_output(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal peak
        for t in _tensors(output):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in live:
                live[ptr] = t.untyped_storage().nbytes()
                weakref.finalize(t, release, ptr)
        peak = max(peak, sum(live.values()))

    handles = [m.register_forward_hook(on_output) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(x)
        del out
    finally:
        for handle in handles:
            handle.remove()
    return peak


def state_bytes_per_stream(model: nn.Module, streams: int = 1) -> int:
    """Bytes of stream state (reference inputs, outputs, backend buffers; the outputs of the sums and
    upsamplings that follow the sparsity) held per stream."""
    held = (m.state_bytes() for m in model.modules() if isinstance(m, (SkipConv2d, FollowsSparsity)))
    return sum(held) // streams


def weight_layout_bytes(model: nn.Module) -> int:
    """Bytes of the weight copies the sparse backend reads (one per layer, whatever the number of streams)."""
    return sum(m.weight_layout_bytes() for m in model.modules() if isinstance(m, SkipConv2d))


def _tensors(value: object) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _max_abs(a: object, b: object) -> tuple[float, float]:
    """Largest |a - b| and largest |a| over matching tensors of two outputs."""
    diff, scale = 0.0, 0.0
    for ta, tb in zip(_tensors(a), _tensors(b), strict=True):
        diff = max(diff, (ta - tb).abs().max().item())
        scale = max(scale, ta.abs().max().item())
    return diff, scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fastest_dense_layout(
    dense: nn.Module, inputs: list[torch.Tensor], device: torch.device
) -> tuple[nn.Module, str]:
    """The fairest baseline is the fastest dense one: oneDNN is often faster with channels_last weights
    and inputs (yolox-nano 416: 21-33 ms vs 41-44 ms NCHW), sometimes not. Times both on the warm-up
    frames and keeps the faster."""

    def seconds(model: nn.Module, layout: torch.memory_format) -> float:
        with torch.no_grad():
            model(inputs[0].contiguous(memory_format=layout))  # oneDNN primitives for this layout
            _sync(device)
            started = time.perf_counter()
            for x in inputs:
                model(x.contiguous(memory_format=layout))
            _sync(device)
        return time.perf_counter() - started

    nchw = seconds(dense, torch.contiguous_format)
    channels_last = dense.to(memory_format=torch.channels_last)  # in place: the same module
    if seconds(channels_last, torch.channels_last) < nchw:
        return channels_last, "channels_last"
    return dense.to(memory_format=torch.contiguous_format), "nchw"


def ran_as(backend: dict) -> str:
    """How a sparse-backend layer spent its frames, e.g. ``"tiles 70%"``: its most frequent path."""
    counts = {path: backend[f"{path}_frames"] for path in ("sparse", "idle", "plain", "dense")}
    total = sum(counts.values())
    if not total:
        return "-"
    path = max(counts, key=counts.get)
    return f"{'tiles' if path == 'sparse' else path} {100 * counts[path] / total:.0f}%"


def profile_model(
    loaded: LoadedModel,
    settings: SkipSettings,
    frames: Sequence[np.ndarray | Sequence[np.ndarray]],
    input_size: tuple[int, int],
    warmup: int = 3,
    device: torch.device | None = None,
    on_frame: Callable[[int], None] | None = None,
    layer_times: bool = True,
) -> dict:
    """Times the dense model and its Skip-Conv version on the same frames, interleaved. ``frames``: one frame
    per time step, or one per stream (a sequence of frames of the same size): the streams run as one batch,
    as several cameras would, and times are per batch.

    The first ``warmup`` frames run through both models untimed (allocator, oneDNN primitive caches,
    the sparse backend's tuning); then the stream restarts from the first frame, densely computed as in
    any stream, and every frame is timed. Per-layer times (``layer_times``) come from a second pass over
    the same frames, the stream restarted again, with a timer on every conv: its hooks cost each call a
    few microseconds (HRNet-w32's skip frames ~3 ms, 5%), which the end-to-end times leave out.
    """
    device = device or torch.device("cpu")
    dense = dense_baseline(loaded, device)
    skip = skip_model(loaded, settings)
    inputs = [batch_of(loaded, step, input_size).to(device) for step in frames]
    streams = inputs[0].shape[0]
    with torch.no_grad():
        for x in inputs[:warmup]:
            dense(x)
            skip(x)
    dense, dense_layout = fastest_dense_layout(dense, inputs[:warmup], device)
    if dense_layout == "channels_last":
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    dense_ms, skip_ms, worst_diff, scale = _interleaved(dense, skip, inputs, device, on_frame)
    stats = report(skip)
    modules = dict(skip_layers(skip))
    backends = {name: layer.backend_stats() for name, layer in modules.items()}
    n = len(inputs)
    dense_seconds, skip_seconds = {}, {}
    if layer_times:  # (the progress goes on counting: frame n + i of 2n)
        after = (lambda index: on_frame(n + index)) if on_frame is not None else None
        dense_seconds, skip_seconds = _layer_seconds(dense, skip, inputs, device, after)
    layers = []
    for entry in stats["layers"]:
        name = entry["name"]
        layers.append(
            {
                **entry,
                "dense_ms": 1000 * dense_seconds.get(name, 0.0) / n,
                "skip_ms": 1000 * skip_seconds.get(name, 0.0) / n,
                "ran_as": ran_as(backends[name]) if settings.backend == "sparse" else "reference",
                "backend": backends[name],
            }
        )
    dense_total, skip_total = statistics.fmean(dense_ms), statistics.fmean(skip_ms)
    speedup = dense_total / skip_total
    # A stream's first frames carry one-off costs (the dense first frame lays out the state, the first skip
    # frames probe every layer): what a long stream pays per frame shows after them.
    settled = START_FRAMES if n >= 2 * START_FRAMES else 0
    speedup_settled = statistics.fmean(dense_ms[settled:]) / statistics.fmean(skip_ms[settled:])
    peak = peak_activation_bytes(dense, inputs[0]) // streams  # (the batch's maps hold every stream's)
    state = state_bytes_per_stream(skip, streams)
    return {
        "model": loaded.name,
        "resolution": list(input_size),
        "frames": n,
        "streams": streams,
        "gate": settings.gate,
        "threshold": settings.threshold if not isinstance(settings.threshold, dict) else "per-layer",
        "block": settings.block,
        "backend": settings.backend,
        "threads": torch.get_num_threads(),
        "dense_layout": dense_layout,
        "device": str(device),
        # the sparse backend's CPU code here (vector width): speedups differ by it from CPU to CPU
        "cpu_kernel": native.kernel_name() if device.type == "cpu" and settings.backend == "sparse" else None,
        "time": {
            "dense_ms_per_frame": dense_total,
            "skip_ms_per_frame": skip_total,
            "dense_ms_median": statistics.median(dense_ms),
            "skip_ms_median": statistics.median(skip_ms),
            "speedup": speedup,
            "start_frames": settled,
            "speedup_after_start": speedup_settled,
        },
        "macs": stats["macs"],
        "realised": speedup / stats["macs"]["reduction"],
        "output_difference": {
            "max_abs": worst_diff,
            "relative_to_output_scale": worst_diff / max(scale, 1e-12),
        },
        "memory": {
            "dense_peak_activation_bytes": peak,  # (per stream, as the state)
            "state_bytes_per_stream": state,
            "state_over_dense_peak": state / max(peak, 1),
            "weight_layout_bytes": weight_layout_bytes(skip),
        },
        "layers": layers,
    }


def batch_of(
    loaded: LoadedModel, step: np.ndarray | Sequence[np.ndarray], input_size: tuple[int, int]
) -> torch.Tensor:
    """One time step's network input: a frame, or the frames of several streams stacked as a batch."""
    frames = [step] if isinstance(step, np.ndarray) else list(step)
    return torch.cat([loaded.spec.preprocess(frame, input_size)[0] for frame in frames])


def _interleaved(
    dense: nn.Module,
    skip: nn.Module,
    inputs: list[torch.Tensor],
    device: torch.device,
    on_frame: Callable[[int], None] | None = None,
) -> tuple[list[float], list[float], float, float]:
    """One stream through both models, frame by frame, the skip model's stream and statistics restarted:
    (dense ms, skip ms per frame, worst output difference, output scale)."""
    reset(skip)
    reset_stats(skip)
    dense_ms, skip_ms, worst_diff, scale = [], [], 0.0, 0.0
    with torch.no_grad():
        for index, x in enumerate(inputs):
            _sync(device)
            t0 = time.perf_counter()
            reference = dense(x)
            _sync(device)
            t1 = time.perf_counter()
            out = skip(x)
            _sync(device)
            t2 = time.perf_counter()
            dense_ms.append(1000 * (t1 - t0))
            skip_ms.append(1000 * (t2 - t1))
            diff, frame_scale = _max_abs(reference, out)
            worst_diff, scale = max(worst_diff, diff), max(scale, frame_scale)
            if on_frame is not None:
                on_frame(index)
    return dense_ms, skip_ms, worst_diff, scale


def _layer_seconds(
    dense: nn.Module,
    skip: nn.Module,
    inputs: list[torch.Tensor],
    device: torch.device,
    on_frame: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds spent in each conv of either model over the stream, in a pass of its own (see
    ``profile_model``)."""
    dense_timer, dense_handles = LayerTimer.attach(dense, (nn.Conv2d, OneDNNConv2d))
    skip_timer, skip_handles = LayerTimer.attach(skip, (SkipConv2d,))
    try:
        _interleaved(dense, skip, inputs, device, on_frame)
    finally:
        for handle in dense_handles + skip_handles:
            handle.remove()
    return dense_timer.seconds, skip_timer.seconds
