"""`skipconv run`: annotated video, predictions and a per-layer sparsity report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from skipconv_cli.cli import options as opt
from skipconv_cli.cli.common import load_model, prepare_backend, settings_from_options, torch_device
from skipconv_cli.errors import SkipconvError
from skipconv_cli.pipeline.runner import (
    DenseComparison,
    Predictor,
    RunOutputs,
    parse_size,
    run_video,
    skip_model,
)
from skipconv_cli.pipeline.video import open_source

EXAMPLES = """
Examples:

  skipconv run sample:person --task pose --gate output-norm --threshold 0.3 --output pose.mp4

  skipconv run traffic.mp4 --task detect --block 4 --predictions boxes.jsonl --report report.json

  skipconv run sample:person --task pose --start 1150 --max-frames 130 --predictions walk.jsonl

  skipconv run 0 --model light-person --show-mask --output cam.mp4     (camera 0)

  skipconv run clip.mp4 --model mypkg.models:build_net --task detect   (your own model)
"""


def run(
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
    max_frames: opt.MaxFrames = None,
    start: opt.Start = 0,
    size: opt.Size = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Annotated H.264 mp4.")] = None,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="JSON Lines, one object per frame.")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Per-layer sparsity report (JSON).")] = None,
    show_mask: Annotated[
        bool, typer.Option("--show-mask", help="Overlay a heatmap of where the network computed.")
    ] = False,
    dense: Annotated[
        bool,
        typer.Option("--dense", help="No skipping: every conv a plain convolution (the dense time)."),
    ] = False,
    compare_dense: Annotated[
        bool,
        typer.Option(
            "--compare-dense",
            help="Also run the dense model on every frame and report fidelity against it (AP or PCK).",
        ),
    ] = False,
    score_threshold: opt.ScoreThreshold = None,
    device: opt.Device = "cpu",
    backend: opt.Backend = opt.BackendName.sparse,
    threads: opt.Threads = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON instead of a table.")
    ] = False,
) -> None:
    """Run a model over a video, computing each conv layer only where the video changed."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # a bad input fails before the model loads
    source = open_source(input, max_frames=max_frames, start=start)
    loaded = load_model(model, task.value if task else None, weights)
    settings = settings_from_options(
        loaded,
        gate.value,
        threshold,
        block,
        reset_every,
        calibration,
        dense=dense,
        backend=backend.value,
        gates=gates,
    )
    prepare_backend(settings)
    torch_dev = torch_device(device)
    loaded.module.to(torch_dev)
    input_size = parse_size(size, loaded.spec.input_size)
    predictor = Predictor(
        loaded=loaded,
        model=skip_model(loaded, settings),
        input_size=input_size,
        score_threshold=loaded.spec.default_score_threshold if score_threshold is None else score_threshold,
        device=torch_dev,
    )
    outputs = RunOutputs(video=output, predictions=predictions, report=report, show_mask=show_mask)
    err = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[fps]:.1f} fps"),
        TextColumn("MACs /{task.fields[reduction]:.2f}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        bar = progress.add_task(loaded.name, total=source.expected_frames, fps=0.0, reduction=1.0)

        def on_frame(index: int, _: dict) -> None:
            ms = predictor.times.ms_per_frame()["total"]
            progress.update(
                bar, completed=index + 1, fps=1000.0 / ms if ms else 0.0, reduction=_reduction(predictor)
            )

        compare = DenseComparison.alongside(predictor) if compare_dense else None
        result = run_video(source, predictor, outputs, settings, on_frame=on_frame, compare=compare)

    if json_out:
        json.dump(result.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(Console(), result.report)
    if result.truncated:
        raise SkipconvError(
            f"{source.name} ended after {result.frames} of {source.frame_count} frames (truncated or "
            "damaged); the outputs hold the frames before the damage"
        )


def _reduction(predictor: Predictor) -> float:
    from skipconv_cli.engine import report as engine_report

    return engine_report(predictor.model)["macs"]["reduction"]


def print_report(console: Console, data: dict) -> None:
    """A rich table of per-layer sparsity, then the totals."""
    table = Table(
        title=f"{data['model']} — per-layer sparsity over {data['frames']} frames", show_lines=False
    )
    for column in ("layer", "kernel", "stride", "groups", "in→out", "GMAC dense", "active", "reduction"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in data["layers"]:
        reduction = layer["macs_dense"] / layer["macs_executed"] if layer["macs_executed"] else float("inf")
        table.add_row(
            layer["name"],
            "x".join(map(str, layer["kernel"])),
            "x".join(map(str, layer["stride"])),
            str(layer["groups"]),
            f"{layer['in_channels']}→{layer['out_channels']}",
            f"{layer['macs_dense'] / 1e9:.3f}",
            f"{100 * layer['active_fraction']:.1f}%",
            f"{reduction:.2f}x",
        )
    console.print(table)
    macs = data["macs"]
    ms = data["time_ms_per_frame"]["total"]
    console.print(
        f"[bold]{data['frames']} frames[/]  MACs {macs['dense'] / 1e9:.2f} → {macs['executed'] / 1e9:.2f} G "
        f"([bold green]{macs['reduction']:.2f}x fewer[/])  {ms:.1f} ms/frame",
        soft_wrap=True,
    )
    if "fidelity" in data:
        fid = data["fidelity"]
        dense_ms = data["dense_time_ms_per_frame"]["total"]
        console.print(
            f"fidelity vs dense: {fid['metric']} [bold]{fid['value']:.2f}[/]  (dense {dense_ms:.1f} ms/frame)"
        )
