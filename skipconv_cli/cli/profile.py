"""`skipconv profile`: MACs and measured time, dense vs skip, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from skipconv_cli.cli import options as opt
from skipconv_cli.cli.common import load_model, prepare_backend, settings_from_options, torch_device
from skipconv_cli.errors import SkipconvError
from skipconv_cli.pipeline.profile import profile_model
from skipconv_cli.pipeline.runner import parse_size, write_json
from skipconv_cli.pipeline.video import open_source

EXAMPLES = """
Examples:

  skipconv profile sample:person --task pose --threshold 1 --block 4 --threads 2

  skipconv profile sample:person --model hrnet-w32 --size 256 --start 1150 --max-frames 30 --block 4

  skipconv profile sample:cars --model yolox-nano --size 736x1280 --json profile.json

  skipconv profile sample:person --model hrnet-w32 --size 256 --max-frames 30 --streams 4   (4 cameras)
"""


def profile(
    input: opt.Input,
    task: opt.Task = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    gate: opt.Gate = opt.GateName.output_norm,
    threshold: opt.Threshold = 0.3,
    block: opt.Block = 1,
    reset_every: opt.ResetEvery = None,
    calibration: opt.Calibration = None,
    gates: opt.Gates = None,
    max_frames: opt.MaxFrames = 50,
    start: opt.Start = 0,
    size: opt.Size = None,
    device: opt.Device = "cpu",
    backend: opt.Backend = opt.BackendName.sparse,
    threads: opt.Threads = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed frames before measuring.")] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON.")] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Layers shown in the table (by dense time).")] = 25,
    streams: Annotated[
        int,
        typer.Option(
            "--streams",
            min=1,
            help="Run N consecutive segments of the input (--max-frames each) as one batch, as N cameras.",
        ),
    ] = 1,
) -> None:
    """Measure dense vs skip on the same frames, interleaved, in one process.

    Reports end-to-end ms/frame for both, the speedup (also after the stream's first 10 frames, which
    carry its set-up), the MAC reduction, how much of it became real (speedup / reduction), per-layer dense
    time vs skip time vs MACs, and the output difference. The dense model has BatchNorm folded, activations
    fused in place and its faster memory layout.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    source = open_source(input, max_frames=max_frames * streams, start=start)
    loaded = load_model(model, task.value if task else None, weights)
    settings = settings_from_options(
        loaded, gate.value, threshold, block, reset_every, calibration, backend=backend.value, gates=gates
    )
    prepare_backend(settings)
    input_size = parse_size(size, loaded.spec.input_size)
    frames = list(source)
    if streams > 1:
        if len(frames) < streams * max_frames:
            raise SkipconvError(
                f"{source.name} has {len(frames)} frames from frame {start}: --streams {streams} needs "
                f"{streams} x --max-frames {max_frames}"
            )
        segments = [frames[k * max_frames : (k + 1) * max_frames] for k in range(streams)]
        frames = list(zip(*segments, strict=True))  # per time step, one frame per stream
    if len(frames) <= warmup:
        per_stream = " per stream" if streams > 1 else ""
        raise SkipconvError(
            f"{source.name} has {len(frames)} frames{per_stream}; profile needs more than --warmup {warmup}"
        )
    err = Console(stderr=True)
    with Progress(
        TextColumn("[bold]profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as progress:  # fmt: skip
        bar = progress.add_task("profile", total=2 * len(frames))  # timed pass, per-layer pass
        result = profile_model(
            loaded, settings, frames, input_size, warmup=warmup, device=torch_device(device),
            on_frame=lambda i: progress.update(bar, completed=i + 1),
        )  # fmt: skip
    result |= {"input": source.name, "start": start}
    print_profile(Console(), result, top)
    if json_path is not None:
        write_json(json_path, result)
        err.print(f"wrote {json_path}")


def print_profile(console: Console, result: dict, top: int) -> None:
    height, width = result["resolution"]
    table = Table(title=f"{result['model']} {height}x{width}: slowest dense layers")
    for column in ("layer", "kernel", "groups", "GMAC", "active", "ran as", "dense ms", "skip ms", "speedup"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in sorted(result["layers"], key=lambda entry: -entry["dense_ms"])[:top]:
        speed = layer["dense_ms"] / layer["skip_ms"] if layer["skip_ms"] else float("inf")
        table.add_row(
            layer["name"], "x".join(map(str, layer["kernel"])), str(layer["groups"]),
            f"{layer['macs_dense'] / result['frames'] / 1e9:.4f}", f"{100 * layer['active_fraction']:.1f}%",
            layer["ran_as"], f"{layer['dense_ms']:.2f}", f"{layer['skip_ms']:.2f}", f"{speed:.2f}x",
        )  # fmt: skip
    console.print(table)
    t, macs = result["time"], result["macs"]
    unit = "frame" if result["streams"] == 1 else f"batch of {result['streams']} streams"
    console.print(
        f"[bold]dense {t['dense_ms_per_frame']:.1f} ms/{unit}, skip {t['skip_ms_per_frame']:.1f} ms/{unit}: "
        f"[green]{t['speedup']:.2f}x faster[/], MACs {macs['reduction']:.2f}x fewer "
        f"({100 * result['realised']:.0f}% of the MAC reduction realised)[/]",
        soft_wrap=True,
    )
    if result.get("cpu_kernel"):
        console.print(f"sparse backend's CPU kernel: {result['cpu_kernel']}")
    if t["start_frames"]:
        console.print(
            f"after the stream's first {t['start_frames']} frames (state set-up, first probes): "
            f"{t['speedup_after_start']:.2f}x faster",
            soft_wrap=True,
        )
    diff = result["output_difference"]
    memory = result["memory"]
    console.print(
        f"output difference vs dense: max {diff['max_abs']:.3g} "
        f"({diff['relative_to_output_scale']:.2%} of the output scale); "
        f"state {memory['state_bytes_per_stream'] / 2**20:.1f} MiB per stream = "
        f"{memory['state_over_dense_peak']:.2f}x the dense peak activations "
        f"(and {memory['weight_layout_bytes'] / 2**20:.1f} MiB of weights copied in the sparse path's "
        "layout, once for all streams)",
        soft_wrap=True,
    )
