"""Trained Gumbel gates against the output-norm gate on held-out video, at equal fidelity (issue 6's target).

    SKIPCONV_WEIGHTS=../shared/weights SKIPCONV_SAMPLES=../shared/videos python bench/gates.py \
        weights/gates/openpose-mbv2-14.gates.pt --eval ../shared/videos/asl_gestures_walk.mkv@0-89

For each gates file: the gates' MAC reduction and fidelity on the held-out range, measured as ``skipconv run``
would (one stream per range, reference backend, so MAC counts are exact and repeatable); then output-norm
at every threshold of a grid on the same frames, at the same size and block. The output-norm baseline is the
best threshold *chosen on the held-out frames themselves* among those within 0.5 fidelity points of the
gates: an oracle no calibration on other footage can beat, so gates that beat it beat any calibrated
threshold. Writes bench/gates.json and bench/gates.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from skipconv_cli.engine import convert
from skipconv_cli.models.factory import create_model, resolve_spec
from skipconv_cli.pipeline.gates_file import load_gates
from skipconv_cli.pipeline.train_gates import VideoRange, evaluate

HERE = Path(__file__).resolve().parent
THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
EQUAL_FIDELITY = 0.5  # points: the "equal fidelity"


def compare(gates_path: Path, eval_range: VideoRange, max_frames: int | None) -> dict:
    gates = load_gates(gates_path)
    loaded = create_model(resolve_spec(gates.model, None), None)
    size = tuple(gates.training["input_size"])
    learned = convert(loaded.module, gate="gumbel", block=gates.block)
    gates.apply(learned)
    result = {
        "gates": str(gates_path),
        "model": gates.model,
        "block": gates.block,
        "input_size": list(size),
        "trained_on": gates.training["videos"],
        "beta": gates.training["beta"],
        "eval": eval_range.label(),
        "gumbel": evaluate(loaded, learned, [eval_range], size, torch.device("cpu"), max_frames),
        "output_norm": [],
    }
    for threshold in THRESHOLDS:
        model = convert(loaded.module, gate="output-norm", threshold=threshold, block=gates.block)
        measured = evaluate(loaded, model, [eval_range], size, torch.device("cpu"), max_frames)
        result["output_norm"].append({"threshold": threshold, **measured})
        print(f"  output-norm {threshold:g}: {measured['macs_reduction']:.2f}x, {measured['fidelity']}")
    return with_baselines(result)


def with_baselines(result: dict) -> dict:
    """Adds the output-norm thresholds to compare with: the most MACs saved within 0.5 fidelity points of the
    gates, and the most saved at no more distillation error than the gates (the raw outputs: a finer measure
    than a fidelity metric that a single flipped keypoint or box moves)."""
    ours = result["gumbel"]
    floor = ours["fidelity"]["value"] - EQUAL_FIDELITY
    fair = [m for m in result["output_norm"] if m["fidelity"]["value"] >= floor]
    result["best_output_norm"] = max(fair, key=lambda m: m["macs_reduction"]) if fair else None
    close = [m for m in result["output_norm"] if m["distillation_error"] <= ours["distillation_error"]]
    result["output_norm_equal_error"] = max(close, key=lambda m: m["macs_reduction"]) if close else None
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | trained on | held out | input, block | Gumbel: MAC reduction, fidelity | best output-norm "
        f"within {EQUAL_FIDELITY} pt (τ chosen on the held-out frames) | Gumbel / output-norm | output-norm "
        "at no more distillation error than Gumbel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g, best, equal_error = r["gumbel"], r["best_output_norm"], r["output_norm_equal_error"]
        metric = g["fidelity"]["metric"]
        trained = ", ".join(f"{Path(v['input']).name} {v['first']}-{v['last']}" for v in r["trained_on"])
        held = f"{Path(r['eval'].split('@')[0]).name} ({g['frames']} frames)"
        ours = (
            f"{g['macs_reduction']:.2f}x, {metric} {g['fidelity']['value']:.1f}, "
            f"error {g['distillation_error']:.4f}"
        )
        if best:
            fidelity = best["fidelity"]["value"]
            theirs = f"τ={best['threshold']:g}: {best['macs_reduction']:.2f}x, {metric} {fidelity:.1f}"
            ratio = f"{g['macs_reduction'] / best['macs_reduction']:.2f}"
        else:
            theirs, ratio = "none reaches that fidelity", "–"
        if equal_error:
            same_error = (
                f"τ={equal_error['threshold']:g}: {equal_error['macs_reduction']:.2f}x, "
                f"error {equal_error['distillation_error']:.4f}"
            )
        else:
            same_error = "none that close"
        size = "×".join(map(str, r["input_size"]))
        cells = (r["model"], trained, held, f"{size}, {r['block']}", ours, theirs, ratio, same_error)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gates", nargs="*", type=Path, help="gates files (from skipconv train-gates)")
    parser.add_argument(
        "--eval", action="append", default=[], help="held-out PATH@START-STOP, one per gates file"
    )
    parser.add_argument("--frames", type=int, default=None, help="held-out frames at most")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "gates")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from OUT.json")
    args = parser.parse_args()
    if args.render:
        results = [with_baselines(r) for r in json.loads(args.out.with_suffix(".json").read_text())]
        args.out.with_suffix(".md").write_text(markdown(results))
        print(markdown(results))
        return
    if not args.gates or len(args.eval) != len(args.gates):
        parser.error("give gates files and one --eval range per gates file")
    torch.set_num_threads(args.threads)
    results = []
    for path, held_out in zip(args.gates, args.eval, strict=True):
        print(f"{path} on {held_out}")
        results.append(compare(path, VideoRange.parse(held_out), args.frames))
    table = markdown(results)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
