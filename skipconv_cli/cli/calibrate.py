"""`skipconv calibrate`: per-layer thresholds giving the most skipping within an accuracy budget."""

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
from skipconv_cli.models.factory import LoadedModel
from skipconv_cli.pipeline.calibrate import (
    CalibrationResult,
    Evaluation,
    SearchSettings,
    calibrate_model,
    calibration_file,
    plot_tradeoff,
    prepare_clip,
)
from skipconv_cli.pipeline.runner import SkipSettings, parse_size
from skipconv_cli.pipeline.video import open_source

EXAMPLES = """
Examples:

  skipconv calibrate sample:person --task pose --start 250 --out pose.calibration.json --plot pose.png

  skipconv calibrate traffic.mp4 --model yolox-nano --max-drop 0.5 --block 4 --out yolox.calibration.json

  skipconv run traffic.mp4 --model yolox-nano --calibration yolox.calibration.json --compare-dense

  skipconv calibrate traffic.mp4 --model yolox-nano --gates yolox.gates.pt   # trained gates vs thresholds
"""


def calibrate(
    input: opt.Input,
    task: opt.Task = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    gate: opt.Gate = opt.GateName.output_norm,
    gates: opt.Gates = None,
    block: opt.Block = 1,
    size: opt.Size = None,
    max_drop: Annotated[
        float,
        typer.Option("--max-drop", help="Fidelity points (AP or PCK, dense = 100) the skipping may cost."),
    ] = 1.0,
    frames: Annotated[
        int, typer.Option("--frames", callback=opt._check_positive, help="Calibration frames.")
    ] = 100,
    start: opt.Start = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Calibration JSON to write (default: MODEL.calibration.json)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG plot of MAC reduction against fidelity.")
    ] = None,
    score_threshold: opt.ScoreThreshold = None,
    device: opt.Device = "cpu",
    backend: opt.Backend = opt.BackendName.reference,
    threads: opt.Threads = None,
) -> None:
    """Find the thresholds that skip the most while fidelity to the dense model stays within --max-drop.

    The dense model's predictions on the calibration frames are the reference (AP@[.5:.95] for detection,
    PCK@0.2 for pose; dense = 100). First the largest single threshold within budget is searched, then
    per-layer thresholds are raised where that costs the least fidelity. Apply the result with
    `skipconv run --calibration FILE`. With --gates FILE (or --gate gumbel: the gates shipped for the model),
    the trained Gumbel gates are measured on the same frames too, next to the thresholds found
    (the search itself runs on output-norm then).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    search_settings = SearchSettings(max_drop=max_drop)  # checks --max-drop before anything slow
    source = open_source(input, max_frames=frames, start=start)  # a bad input fails before the model loads
    loaded = load_model(model, task.value if task else None, weights)
    search_gate = gate.value
    if gates is not None or gate.value == "gumbel":
        gates = trained_gates(loaded, gates, block)
        search_gate = "output-norm" if gate.value == "gumbel" else gate.value
    torch_dev = torch_device(device)
    loaded.module.to(torch_dev)
    input_size = parse_size(size, loaded.spec.input_size)
    score = loaded.spec.default_score_threshold if score_threshold is None else score_threshold
    skip = SkipSettings(gate=search_gate, threshold=0.0, block=block, backend=backend.value)
    prepare_backend(skip)
    out = out or Path(f"{Path(loaded.name).name.replace(':', '_')}.calibration.json")
    console = Console()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        bar = progress.add_task("dense reference", total=frames, status="")
        clip = prepare_clip(
            loaded, source, input_size, score, torch_dev,
            on_frame=lambda n: progress.update(bar, completed=n),
        )  # fmt: skip
        progress.update(
            bar,
            description="search",
            completed=0,
            total=search_settings.max_evaluations,
            status=f"{len(clip.inputs)} frames cached",
        )

        def on_evaluation(point: Evaluation) -> None:
            progress.update(
                bar, advance=1, status=f"{point.label}: {point.reduction:.2f}x, fidelity {point.fidelity:.2f}"
            )

        result = calibrate_model(loaded, skip, clip, score, search_settings, on_evaluation, gates)

    print_tradeoff(console, result)
    calibration = calibration_file(result, loaded, skip, clip, max_drop)
    calibration.save(out)
    console.print(f"wrote {out}")
    if plot is not None:
        title = f"{loaded.name}, {clip.input_name} frames {start}-{start + len(clip.inputs) - 1}"
        plot_tradeoff(result, plot, title)
        console.print(f"wrote {plot}")


def trained_gates(loaded: LoadedModel, gates: Path | None, block: int) -> Path:
    """The gates file to measure: the one given (checked against the model), else the shipped one."""
    from skipconv_cli.pipeline.gates_file import load_gates

    if gates is None:
        gates = settings_from_options(loaded, "gumbel", 0.0, block, None, None).gates
        if gates is None:
            raise SkipconvError(
                f"no trained gates for {loaded.name} at block {block}: pass --gates FILE "
                "(made by skipconv train-gates)"
            )
    load_gates(gates).check_matches(loaded.name, loaded.weights_sha256, block)
    return gates


def print_tradeoff(console: Console, result: CalibrationResult) -> None:
    """The trade-off table (global sweep by threshold, then the per-layer search), then the outcome."""
    table = Table(title=f"MAC reduction vs fidelity ({result.metric}, budget ≥ {result.floor:g})")
    for column in ("search", "threshold", "MAC reduction", "fidelity", "within", "s"):
        table.add_column(column, justify="left" if column in ("search", "threshold") else "right")
    sweep = sorted((p for p in result.evaluations if p.phase == "global"), key=lambda p: p.threshold or 0.0)
    per_layer = [p for p in result.evaluations if p.phase == "per-layer"]
    for point in sweep + per_layer:
        style = "bold green" if point is result.best else None
        table.add_row(
            point.phase,
            f"{point.threshold:g}" if point.threshold is not None else point.label,
            f"{point.reduction:.2f}x",
            f"{point.fidelity:.2f}",
            "yes" if point.within(result.floor) else "no",
            f"{point.seconds:.1f}",
            style=style,
        )
    if result.gates is not None:
        point = result.gates
        table.add_row(
            "trained gates", point.label, f"{point.reduction:.2f}x", f"{point.fidelity:.2f}",
            "yes" if point.within(result.floor) else "no", f"{point.seconds:.1f}", style="bold cyan",
        )  # fmt: skip
    console.print(table)
    g, best = result.best_global, result.best
    console.print(
        f"global threshold {g.threshold:g}: [bold]{g.reduction:.2f}x[/] fewer MACs at {g.fidelity:.2f}; "
        f"per-layer: [bold green]{best.reduction:.2f}x[/] at {best.fidelity:.2f} "
        f"({100 * (result.per_layer_gain - 1):+.0f}%), {len(result.evaluations)} evaluations "
        f"in {result.seconds:.0f} s"
    )
