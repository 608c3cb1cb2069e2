"""Regenerates the README's benchmark table: dense vs skip in the same run, 2 CPU threads.

    SKIPCONV_WEIGHTS=../shared/weights SKIPCONV_SAMPLES=../shared/videos python bench/run.py

Each row profiles one model on one clip with ``skipconv_cli.pipeline.profile.profile_model`` (interleaved
dense and skip frames after a warm-up). HRNet-w32 rows first search the threshold that gives the paper's
MAC reductions (2.51x, 4.33x, 7.92x), then time it. Writes bench/results.json and bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from skipconv_cli.engine import report, reset, reset_stats
from skipconv_cli.models.factory import create_model, resolve_spec
from skipconv_cli.pipeline.profile import batch_of, profile_model
from skipconv_cli.pipeline.runner import SkipSettings, skip_model
from skipconv_cli.pipeline.video import open_source

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    label: str
    model: str
    clip: str
    size: tuple[int, int]
    settings: SkipSettings
    start: int = 0
    target_reduction: float | None = None  # search the threshold that gives this MAC reduction
    paper_speedup: float | None = None
    frames: int | None = None  # this row's own frame count (else --frames)
    streams_from: tuple[int, ...] = ()  # several streams in one batch: the clip from each of these frames


def rows(frames: int) -> list[Row]:
    sparse = SkipSettings(gate="output-norm", block=4, backend="sparse")
    return [
        Row("openpose-mbv2-14, person clip", "openpose-mbv2-14", "sample:person", (368, 432),
            replace(sparse, threshold=0.1), start=1150),
        # the threshold of the README's pose example: a working point that skips
        Row("openpose-mbv2-14, person clip, τ 0.3", "openpose-mbv2-14", "sample:person", (368, 432),
            replace(sparse, threshold=0.3), start=1150),
        Row("yolox-nano 416, cars", "yolox-nano", "sample:cars", (416, 416), replace(sparse, threshold=0.05)),
        Row("yolox-nano 736x1280, cars", "yolox-nano", "sample:cars", (736, 1280),
            replace(sparse, threshold=0.05)),
        *[
            Row(f"hrnet-w32 256, person, ~{target}x MACs", "hrnet-w32", "sample:person", (256, 256), sparse,
                start=1150, target_reduction=target, paper_speedup=paper)
            for target, paper in ((2.51, 1.48), (4.33, 1.91), (7.92, 4.09))
        ],
        # a longer stream of the same clip: the person walks after the first 30 frames, then stands again
        Row("hrnet-w32 256, person, 130 frames", "hrnet-w32", "sample:person", (256, 256),
            replace(sparse, threshold=0.947), start=1150, frames=130),
        Row("openpose-mbv2-14, person, τ 0.3, 130 frames", "openpose-mbv2-14", "sample:person", (368, 432),
            replace(sparse, threshold=0.3), start=1150, frames=130),
        # four cameras in one batch (four segments of the clip): the per-layer overheads are paid once a batch
        Row("hrnet-w32 256, person, 4 streams in a batch", "hrnet-w32", "sample:person", (256, 256),
            replace(sparse, threshold=0.316), streams_from=(1150, 250, 600, 900)),
        Row("openpose-mbv2-14, person, τ 0.3, 4 streams in a batch", "openpose-mbv2-14", "sample:person",
            (368, 432), replace(sparse, threshold=0.3), streams_from=(1150, 250, 600, 900)),
        Row("yolox-nano 416, bikes (moving camera)", "yolox-nano", "sample:bikes", (416, 416),
            replace(sparse, threshold=0.05)),
        # the fallback's back-off settles over a longer stream: most of the clip
        Row("yolox-nano 416, bikes, 200 frames", "yolox-nano", "sample:bikes", (416, 416),
            replace(sparse, threshold=0.05), frames=200),
    ]  # fmt: skip


def load_frames(clip: str, start: int, count: int) -> list:
    return list(open_source(clip, max_frames=count, start=start))


def threshold_for_reduction(loaded, settings: SkipSettings, inputs: list, target: float) -> float:
    """Bisects log(threshold) until the MAC reduction over ``inputs`` is within 3% of ``target``."""
    model = skip_model(loaded, replace(settings, threshold=1.0))

    def reduction(threshold: float) -> float:
        from skipconv_cli.engine import set_thresholds

        set_thresholds(model, threshold)
        reset(model)
        reset_stats(model)
        with torch.no_grad():
            for x in inputs:
                model(x)
        return report(model)["macs"]["reduction"]

    low, high = math.log(0.01), math.log(100.0)
    best = 1.0
    for _ in range(14):
        middle = (low + high) / 2
        value = reduction(math.exp(middle))
        best = math.exp(middle)
        if abs(value / target - 1) < 0.03:
            break
        if value < target:
            low = middle
        else:
            high = middle
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run rows whose label contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for row in rows(args.frames):
        if args.only and args.only not in row.label:
            continue
        started = time.perf_counter()
        loaded = create_model(resolve_spec(row.model, None))
        count = row.frames or args.frames
        if row.streams_from:  # per time step, one frame of each stream
            frames = list(
                zip(*(load_frames(row.clip, start, count) for start in row.streams_from), strict=True)
            )
        else:
            frames = load_frames(row.clip, row.start, count)
        settings = row.settings
        if row.target_reduction is not None:
            inputs = [batch_of(loaded, step, row.size) for step in frames]
            settings = replace(
                settings, threshold=threshold_for_reduction(loaded, settings, inputs, row.target_reduction)
            )
        result = profile_model(loaded, settings, frames, row.size, warmup=3, layer_times=False)
        result |= {"label": row.label, "clip": row.clip, "paper_speedup": row.paper_speedup}
        result.pop("layers")
        results.append(result)
        t = result["time"]
        print(
            f"{row.label}: dense {t['dense_ms_per_frame']:.1f} ms, skip {t['skip_ms_per_frame']:.1f} ms, "
            f"speedup {t['speedup']:.2f}x, MACs {result['macs']['reduction']:.2f}x "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results, args))
    print(markdown(results, args))


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.frames} frames per row unless the row says otherwise, {args.threads} CPU threads, torch "
        f"{torch.__version__}, sparse kernel {results[0].get('cpu_kernel') if results else '-'}; dense and "
        "skip interleaved in the same run, after a warm-up; the dense baseline has BatchNorm folded, "
        "activations fused in place, freed memory kept in the process (no page faults a frame) and runs in "
        "its faster memory layout (dense layout column); 'after start': the speedup over the frames after "
        "the stream's first 10; rows with several streams run them as one batch (ms per batch, state per "
        "stream).",
        "",
        "| model, clip | input | gate, τ, block | dense ms | skip ms | speedup | after start | "
        "MAC reduction | realised | paper speedup | max diff (of scale) | state / dense peak | "
        "weight copies | dense layout |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, m = r["time"], r["macs"]
        h, w = r["resolution"]
        paper = f"{r['paper_speedup']:.2f}x" if r["paper_speedup"] else "–"
        lines.append(
            f"| {r['label']} | {h}×{w} | {r['gate']}, {r['threshold']:.3g}, {r['block']} | "
            f"{t['dense_ms_per_frame']:.1f} | {t['skip_ms_per_frame']:.1f} | {t['speedup']:.2f}x | "
            f"{t['speedup_after_start']:.2f}x | {m['reduction']:.2f}x | {100 * r['realised']:.0f}% | "
            f"{paper} | "
            f"{100 * r['output_difference']['relative_to_output_scale']:.2f}% | "
            f"{r['memory']['state_over_dense_peak']:.2f}x | "
            f"{r['memory'].get('weight_layout_bytes', 0) / 2**20:.1f} MiB | {r['dense_layout']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
