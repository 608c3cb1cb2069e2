"""`skipconv train-gates`: learn Gumbel gates from unlabeled video (distillation against the dense model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from skipconv_cli.cli import options as opt
from skipconv_cli.cli.common import load_model, torch_device
from skipconv_cli.pipeline.runner import parse_size

EXAMPLES = """
Examples:

  skipconv train-gates sample:person@0-1100 --model openpose-mbv2-14 --size 192x224
      --eval sample:asl@0-89 --out pose.gates.pt        # how the shipped pose gates were made (12 min)

  skipconv train-gates car-detection.mp4 --model yolox-nano --size 256 --block 4 --out cars.gates.pt

  skipconv train-gates car-detection.mp4 --model yolox-nano --size 256 --out cars.gates.pt --resume

  skipconv run sample:person --model openpose-mbv2-14 --gate gumbel --gates cars.gates.pt
"""


def train_gates(
    videos: Annotated[
        list[str],
        typer.Argument(
            help="Training videos; PATH@START-STOP picks frames [START, STOP) (e.g. clip.mp4@0-700)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The gates file to write (torch .pt).")],
    task: opt.Task = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    beta: Annotated[
        float, typer.Option("--beta", help="Weight of the MAC term: larger skips more (Eq. 9).")
    ] = 0.1,
    block: opt.Block = 1,
    clip_len: Annotated[
        int,
        typer.Option("--clip-len", callback=opt._check_positive, help="Frames per clip (first is dense)."),
    ] = 4,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup",
            help="Frames run with the current gates (no gradient) between a clip's dense frame and its "
            "trained frames, so training sees the pending change a long stream builds up.",
        ),
    ] = 2,
    sharpen: Annotated[
        float,
        typer.Option(
            "--sharpen",
            help="Final factor on the gate logits while training (annealed from 1): sampled gates end up "
            "acting like the thresholded gates of inference.",
        ),
    ] = 10.0,
    start_threshold: Annotated[
        float,
        typer.Option(
            "--start-threshold",
            help="Gates start as the output-norm gate at this threshold (open nearly everywhere at 0.01).",
        ),
    ] = 0.01,
    steps: Annotated[
        int, typer.Option("--steps", callback=opt._check_positive, help="Optimizer steps.")
    ] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 0.05,
    batch: Annotated[int, typer.Option("--batch", callback=opt._check_positive, help="Clips per step.")] = 2,
    clips: Annotated[
        int,
        typer.Option("--clips", callback=opt._check_positive, help="Clips kept in memory (spread evenly)."),
    ] = 64,
    size: opt.Size = None,
    eval_videos: Annotated[
        list[str] | None,
        typer.Option(
            "--eval", help="Held-out PATH@START-STOP to measure on (default: the last 15% of each video)."
        ),
    ] = None,
    eval_frames: Annotated[
        int, typer.Option("--eval-frames", callback=opt._check_positive, help="Held-out frames at most.")
    ] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt.")] = False,
    finetune: Annotated[
        bool, typer.Option("--finetune", help="Train the backbone too (default: only the gates).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of clip sampling and Gumbel noise.")] = 0,
    device: opt.Device = "cpu",
    threads: opt.Threads = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the gates file's metadata as JSON.")
    ] = False,
) -> None:
    """Learn Gumbel gates (Eq. 8-9) on unlabeled video: keep the dense model's outputs, skip MACs.

    Each step runs clips of consecutive frames (the first dense, the rest with sampled gates) and minimises
    the distillation error against the dense model plus BETA x the expected MAC fraction. A checkpoint is
    written to OUT.ckpt as training goes; --resume continues from it. The gates are then measured at
    inference on held-out frames (MAC reduction, fidelity) and written to OUT with that metadata; use them
    with `skipconv run --gate gumbel --gates OUT`.
    """
    import torch

    from skipconv_cli.pipeline.train_gates import StepStats, TrainConfig, VideoRange
    from skipconv_cli.pipeline.train_gates import train_gates as train

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, task.value if task else None, weights)
    config = TrainConfig(
        videos=[VideoRange.parse(v) for v in videos],
        eval_videos=[VideoRange.parse(v) for v in eval_videos or []],
        input_size=parse_size(size, loaded.spec.input_size),
        beta=beta,
        block=block,
        clip_len=clip_len,
        warmup=warmup,
        sharpen=sharpen,
        start_threshold=start_threshold,
        steps=steps,
        lr=lr,
        batch=batch,
        clips=clips,
        eval_frames=eval_frames,
        finetune=finetune,
        seed=seed,
    )
    err = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  distill {task.fields[distill]:.4f}  MACs {task.fields[macs]:.1%}"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        bar = progress.add_task(f"{loaded.name} preparing", total=steps, loss=0.0, distill=0.0, macs=1.0)

        def on_step(stats: StepStats) -> None:
            progress.update(
                bar,
                completed=stats.step,
                description=loaded.name,
                loss=stats.loss,
                distill=stats.distill,
                macs=stats.mac_fraction,
            )

        def on_status(text: str) -> None:
            progress.update(bar, description=f"{loaded.name} {text}")

        gates = train(
            loaded,
            config,
            out,
            resume=resume,
            device=torch_device(device),
            on_step=on_step,
            on_status=on_status,
        )
    summary = {"out": str(out), "model": gates.model, "block": gates.block, "training": gates.training}
    summary["measured"] = gates.measured
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    measured = gates.measured
    fid = measured.get("fidelity")
    fid_text = f"{fid['metric']} {fid['value']:.1f}" if fid else "fidelity n/a"
    Console().print(
        f"[bold]{out}[/]: {gates.model}, block {gates.block}; held-out {measured.get('frames', 0)} frames: "
        f"MACs [bold green]{measured.get('macs_reduction', 1.0):.2f}x fewer[/], {fid_text}, "
        f"distillation error {measured.get('distillation_error', 0.0):.4f}"
    )
