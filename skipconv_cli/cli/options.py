"""Options shared by several commands, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class TaskName(str, Enum):
    detect = "detect"
    pose = "pose"


class GateName(str, Enum):
    output_norm = "output-norm"
    input_norm = "input-norm"
    gumbel = "gumbel"


class BackendName(str, Enum):
    reference = "reference"
    sparse = "sparse"


def _check_threshold(value: float) -> float:
    if value < 0 or value != value:
        raise typer.BadParameter(f"must be a number >= 0, got {value}")
    return value


def _check_block(value: int) -> int:
    if value not in (1, 2, 4, 8):
        raise typer.BadParameter(f"must be 1, 2, 4 or 8, got {value}")
    return value


def _check_positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be >= 1, got {value}")
    return value


Input = Annotated[
    str,
    typer.Argument(
        help="Video file, sample:NAME (sample:person, sample:cars, ...), camera index or stream URL."
    ),
]
Task = Annotated[
    TaskName | None, typer.Option("--task", "-t", help="detect or pose (picks the default model).")
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Built-in model name (see `skipconv models`) or module:function of your own."
    ),
]
Weights = Annotated[
    Path | None, typer.Option("--weights", help="Weights file (default: the published file).")
]
Gate = Annotated[
    GateName, typer.Option("--gate", "-g", help="Where to recompute: output-norm, input-norm, gumbel.")
]
Threshold = Annotated[
    float,
    typer.Option(
        "--threshold",
        callback=_check_threshold,
        help="Scale-free gate threshold; 0 is exact, larger skips more.",
    ),
]
Block = Annotated[
    int, typer.Option("--block", "-b", callback=_check_block, help="Gate block size: 1, 2, 4 or 8.")
]
ResetEvery = Annotated[
    int | None,
    typer.Option(
        "--reset-every", callback=_check_positive, help="Recompute densely every N frames (default never)."
    ),
]
Calibration = Annotated[
    Path | None, typer.Option("--calibration", help="Per-layer thresholds written by `skipconv calibrate`.")
]
Gates = Annotated[
    Path | None,
    typer.Option(
        "--gates",
        help="Gumbel gates from `skipconv train-gates` (implies --gate gumbel; default with --gate gumbel: "
        "the file shipped for the model in weights/gates/, if any).",
    ),
]
MaxFrames = Annotated[
    int | None, typer.Option("--max-frames", "-n", callback=_check_positive, help="Stop after N frames.")
]
Start = Annotated[
    int,
    typer.Option(
        "--start", min=0, help="First frame to read, counted from 0 (skip frames with nothing in them)."
    ),
]
Size = Annotated[
    str | None,
    typer.Option("--size", help="Network input HEIGHTxWIDTH, multiples of 32 (default: the model's)."),
]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Backend = Annotated[
    BackendName,
    typer.Option(
        "--backend",
        help="sparse (fast: recomputes only what can change) or reference (masked dense, exact counts).",
    ),
]
ScoreThreshold = Annotated[
    float | None,
    typer.Option(
        "--score-threshold",
        min=0.0,
        max=1.0,
        help="Minimum detection/person score, 0-1 (default: the model's).",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", callback=_check_positive, help="torch CPU threads (default: torch's)."),
]
