"""A/B of two builds of the C++ step in one process: the same model, frames and tuned crossovers, streams
alternating between the builds.

    SKIPCONV_WEIGHTS=../shared/weights SKIPCONV_SAMPLES=../shared/videos \\
        python bench/ab_kernel.py /tmp/variant.cpp --model hrnet-w32 --size 256 --threshold 0.316

A whole bench run moves by a few percent from one run to the next on a shared VM, and a machine can switch
between speeds for minutes at a time: two builds compared in separate runs tell the machine apart, not the
builds. Here each stream (a reset, its dense first frame, then frames 2..N timed) runs on one build, the next
on the other, so both see the same conditions. Prints, per build, ms per frame over frames 2..N (min and
median over the streams) and the part of it spent in the step and in the sums. Resolution: two builds of
the same source, HRNet-w32 at ~4.3x fewer MACs, gave medians 29.08 / 28.82 ms over 6 streams each (27.41 /
27.84 over 3): differences within ~1-2% are noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from skipconv_cli.engine import reset
from skipconv_cli.engine.backends import native
from skipconv_cli.models.factory import create_model, resolve_spec
from skipconv_cli.pipeline.runner import SkipSettings, skip_model
from skipconv_cli.pipeline.video import open_source

TIMED = ("skip_step", "add_marked")


def build(source: Path, tag: str) -> Any:
    return native.build(source, f"skipconv_ab_{tag}_{native.source_digest(source)}")


class Timed:
    """The extension the backend calls: one of the builds, its step and sums timed."""

    def __init__(self) -> None:
        self.module: Any = None
        self.seconds = dict.fromkeys(TIMED, 0.0)

    def __getattr__(self, name: str) -> Any:
        function = getattr(self.module, name)
        if name not in TIMED:
            return function

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            result = function(*args)
            self.seconds[name] += time.perf_counter() - started
            return result

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("b", type=Path, help="the other build's source")
    parser.add_argument("--a", type=Path, default=native.SOURCE, help="default: the package's kernel")
    parser.add_argument("--model", default="hrnet-w32")
    parser.add_argument("--clip", default="sample:person")
    parser.add_argument("--size", default="256", help="N or HxW")
    parser.add_argument("--threshold", type=float, default=0.316)
    parser.add_argument("--start", type=int, default=1150)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--streams", type=int, default=6, help="per build")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builds = {"A": build(args.a, "a"), "B": build(args.b, "b")}
    timed = Timed()
    timed.module = builds["A"]
    native.extension = lambda: timed  # (the backend looks the extension up on every call)
    loaded = create_model(resolve_spec(args.model, None))
    size = tuple(int(v) for v in args.size.split("x")) if "x" in args.size else (int(args.size),) * 2
    inputs = [
        loaded.spec.preprocess(f, size)[0]
        for f in open_source(args.clip, max_frames=args.frames, start=args.start)
    ]
    model = skip_model(
        loaded, SkipSettings(gate="output-norm", block=4, backend="sparse", threshold=args.threshold)
    )
    results: dict[str, list[tuple[float, dict[str, float]]]] = {"A": [], "B": []}
    with torch.no_grad():
        for x in inputs:  # warm-up, tuning (with build A)
            model(x)
        for stream in range(2 * args.streams):
            tag = "AB"[(stream + stream // 2) % 2]  # A B B A A B ...: neither build always runs first
            timed.module = builds[tag]
            reset(model)
            model(inputs[0])
            timed.seconds = dict.fromkeys(TIMED, 0.0)
            started = time.perf_counter()
            for x in inputs[1:]:
                model(x)
            frames = len(inputs) - 1
            results[tag].append(
                (
                    (time.perf_counter() - started) / frames * 1e3,
                    {k: v / frames * 1e3 for k, v in timed.seconds.items()},
                )
            )
    for tag, source in (("A", args.a), ("B", args.b)):
        frame = [r[0] for r in results[tag]]
        parts = ", ".join(f"{k} {statistics.median(r[1][k] for r in results[tag]):.2f}" for k in TIMED)
        median = statistics.median(frame)
        print(f"{tag} ({source.name}): ms per frame min {min(frame):.2f}, median {median:.2f} ({parts})")


if __name__ == "__main__":
    main()
