"""Calibration: the most skipping for a stated accuracy budget.

The dense model's predictions on a clip are the reference (no labels exist). A candidate set of thresholds
is scored by running the converted model over the same cached frames from a fresh stream state and
measuring MAC reduction and fidelity (AP or PCK against the reference). Two searches:

1. Global: the largest single threshold whose fidelity stays within ``max_drop`` points of the dense
   model's 100: bracket from the engine's default by doubling or halving, then bisect on a log scale.
   Fidelity is not exactly monotone in the threshold, so the best point is the largest *measured* one
   within budget, not the bracket's end.
2. Per layer: layers are split into contiguous groups of about equal dense MACs (a generic stand-in for
   network stages that works for any model). Starting half a step below the global optimum, each round
   measures raising every group's threshold on its own, then applies together the raises with the most
   MACs saved per fidelity point lost that fit the budget (checked by one more evaluation). Every
   evaluation is a real measurement, so the answer is the best one measured within budget -- never worse
   than the global threshold.

Each evaluation costs one pass over the cached frames; everything else is cached once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from skipconv_cli.engine import report, reset, reset_stats, set_thresholds, skip_layers
from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.factory import LoadedModel
from skipconv_cli.models.registry import Letterbox
from skipconv_cli.pipeline.calibration import Calibration
from skipconv_cli.pipeline.fidelity import METRICS, fidelity
from skipconv_cli.pipeline.runner import SkipSettings, first_sample, skip_model
from skipconv_cli.pipeline.video import FrameSource


@dataclass(frozen=True)
class SearchSettings:
    """How hard the search looks: about 6 global and 15 per-layer evaluations (passes over the clip)."""

    max_drop: float = 1.0  # fidelity points below the dense model's 100
    start: float = 1.0  # first global threshold tried: about 2x fewer MACs on the sample clips
    bracket_factor: float = 2.0
    bracket_steps: int = 7  # at most this many doublings or halvings
    tolerance: float = 1.2  # bisect until the bracket's ends are this close (ratio)
    groups: int = 6
    raise_factor: float = 2.0  # per-group raise tried in a round
    min_factor: float = 1.2  # a group whose raise shrank below this is left alone
    rounds: int = 2
    min_gain: float = 0.01  # a raise saving less than this share of the executed MACs is not worth it
    max_evaluations: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.max_drop < 100:
            raise SkipconvError(f"--max-drop must be between 0 and 100 points; got {self.max_drop:g}")


@dataclass
class Evaluation:
    """One measured point: thresholds -> MAC reduction and fidelity on the calibration frames."""

    phase: str  # "global" or "per-layer"
    label: str
    thresholds: dict[str, float]
    reduction: float
    fidelity: float
    macs_executed: int
    layer_macs: dict[str, int]  # executed MACs per layer
    seconds: float
    threshold: float | None = None  # the global threshold, for global points

    def within(self, floor: float) -> bool:
        return self.fidelity >= floor


@dataclass
class CalibrationClip:
    """The calibration frames, preprocessed once, with the dense model's predictions on them."""

    inputs: list[tuple[torch.Tensor, Letterbox]]
    reference: list[dict]
    input_name: str
    first_frame: int
    input_size: tuple[int, int]


def prepare_clip(
    loaded: LoadedModel,
    source: FrameSource,
    input_size: tuple[int, int],
    score_threshold: float,
    device: torch.device,
    on_frame: Callable[[int], None] | None = None,
) -> CalibrationClip:
    """Reads the source's frames (from its ``start``, up to its ``max_frames``), preprocesses them and
    runs the dense model on them. Refuses a clip where the dense model finds nothing to compare against."""
    inputs, reference = [], []
    spec = loaded.spec
    first_frame = source.start
    with torch.inference_mode():
        for frame in source:
            tensor, box = spec.preprocess(frame, input_size)
            tensor = tensor.to(device)
            inputs.append((tensor, box))
            raw = loaded.module(tensor)
            reference.append(spec.postprocess(first_sample(raw), box, score_threshold))
            if on_frame is not None:
                on_frame(len(inputs))
    last = first_frame + len(inputs) - 1
    if len(inputs) < 2:
        raise SkipconvError(
            f"{source.name} has {len(inputs)} frame(s) from frame {first_frame}: calibration needs at least 2"
        )
    key = "boxes" if spec.task == "detect" else "persons"
    if not any(frame[key] for frame in reference):
        what = "object" if spec.task == "detect" else "person"
        raise SkipconvError(
            f"the dense {loaded.name} finds no {what} in frames {first_frame}-{last} of {source.name}: "
            "fidelity needs something to compare; choose other frames (--start) or another clip"
        )
    return CalibrationClip(inputs, reference, source.name, first_frame, input_size)


class Evaluator:
    """Scores thresholds on the cached clip: reset, run the converted model, postprocess, fidelity."""

    def __init__(self, loaded: LoadedModel, model: nn.Module, clip: CalibrationClip, score_threshold: float):
        self.loaded = loaded
        self.model = model
        self.clip = clip
        self.score_threshold = score_threshold
        self.layer_names = [name for name, _ in skip_layers(model)]
        self.count = 0
        self.dense_macs: dict[str, int] = {}

    def __call__(self, thresholds: dict[str, float], phase: str, label: str) -> Evaluation:
        start = time.perf_counter()
        spec = self.loaded.spec
        set_thresholds(self.model, thresholds)
        reset(self.model)
        reset_stats(self.model)
        predicted = []
        with torch.inference_mode():
            for tensor, box in self.clip.inputs:
                raw = self.model(tensor)
                predicted.append(spec.postprocess(first_sample(raw), box, self.score_threshold))
        stats = report(self.model)
        self.dense_macs = {layer["name"]: layer["macs_dense"] for layer in stats["layers"]}
        self.count += 1
        return Evaluation(
            phase=phase,
            label=label,
            thresholds=dict(thresholds),
            reduction=stats["macs"]["reduction"],
            fidelity=fidelity(spec.task, self.clip.reference, predicted)["value"],
            macs_executed=stats["macs"]["executed"],
            layer_macs={layer["name"]: layer["macs_executed"] for layer in stats["layers"]},
            seconds=time.perf_counter() - start,
        )


@dataclass
class CalibrationResult:
    best: Evaluation  # what the calibration file holds
    best_global: Evaluation
    evaluations: list[Evaluation] = field(default_factory=list)
    floor: float = 99.0
    metric: str = ""
    seconds: float = 0.0
    gates: Evaluation | None = None  # trained Gumbel gates measured on the same frames, for comparison

    @property
    def per_layer_gain(self) -> float:
        """Per-layer reduction over the best global threshold's (1.0: per-layer found nothing better)."""
        return self.best.reduction / self.best_global.reduction


class _Raise(NamedTuple):
    """A group's measured raise: MACs saved per fidelity point lost decides the order."""

    efficiency: float
    gain: int
    loss: float
    group: int
    point: Evaluation


class _Budget(Exception):
    """The evaluation budget is spent: stop searching, keep the best found."""


def search(
    evaluator: Evaluator,
    settings: SearchSettings,
    on_evaluation: Callable[[Evaluation], None] | None = None,
) -> CalibrationResult:
    """Global then per-layer search (see the module docstring); returns every measured point."""
    started = time.perf_counter()
    floor = 100.0 - settings.max_drop
    evaluations: list[Evaluation] = []
    names = evaluator.layer_names
    seen: dict[tuple[float, ...], Evaluation] = {}

    def measure(thresholds: dict[str, float], phase: str, label: str, tau: float | None = None) -> Evaluation:
        key = tuple(round(thresholds[n], 6) for n in names)
        if key in seen:  # e.g. raising every group at once lands back on a global point
            return seen[key]
        if len(evaluations) >= settings.max_evaluations:
            raise _Budget
        point = evaluator(thresholds, phase, label)
        point.threshold = tau
        evaluations.append(point)
        seen[key] = point
        if on_evaluation is not None:
            on_evaluation(point)
        return point

    global_points: dict[float, Evaluation] = {}

    def at(tau: float) -> Evaluation:
        tau = float(f"{tau:.4g}")  # readable thresholds in the file; the search never needs more digits
        # A threshold within 0.5% of one already measured is that one (e.g. 0.015625 vs 0.01563).
        tau = next((t for t in global_points if abs(t - tau) <= 0.005 * tau), tau)
        if tau not in global_points:
            global_points[tau] = measure(dict.fromkeys(names, tau), "global", f"τ={tau:g}", tau)
        return global_points[tau]

    try:
        _global_search(at, settings, floor)
    except _Budget:
        pass
    within = [p for p in global_points.values() if p.within(floor)]
    if not within:  # even the smallest threshold tried drops too much: 0 is exact
        within = [evaluator(dict.fromkeys(names, 0.0), "global", "τ=0")]
        within[0].threshold = 0.0
        evaluations.append(within[0])
    best_global = max(within, key=lambda p: p.reduction)
    best = best_global
    if best_global.threshold and len(names) > 1:
        try:
            _per_layer_search(evaluator, measure, best_global, settings, floor, at)
        except _Budget:
            pass
        candidates = [p for p in evaluations if p.within(floor)]
        best = max(candidates, key=lambda p: p.reduction)
    return CalibrationResult(
        best=best,
        best_global=best_global,
        evaluations=evaluations,
        floor=floor,
        metric=METRICS[evaluator.loaded.spec.task],
        seconds=time.perf_counter() - started,
    )


def _global_search(at: Callable[[float], Evaluation], settings: SearchSettings, floor: float) -> None:
    """Bracket the budget's edge by doubling/halving, then bisect on a log scale."""
    factor = settings.bracket_factor
    lo: float | None = None
    hi: float | None = None
    tau = settings.start
    if at(tau).within(floor):
        lo = tau
        for _ in range(settings.bracket_steps):
            tau *= factor
            if not at(tau).within(floor):
                hi = tau
                break
            lo = tau
    else:
        hi = tau
        for _ in range(settings.bracket_steps):
            tau /= factor
            if at(tau).within(floor):
                lo = tau
                break
            hi = tau
    if lo is None or hi is None:
        return
    while hi / lo > settings.tolerance:
        mid = math.sqrt(lo * hi)
        if at(mid).within(floor):
            lo = mid
        else:
            hi = mid


def layer_groups(names: list[str], dense_macs: dict[str, int], count: int) -> list[list[str]]:
    """Contiguous groups (in module order, roughly execution order) of about equal dense MACs."""
    count = max(1, min(count, len(names)))
    macs = np.array([max(dense_macs.get(n, 0), 1) for n in names], dtype=np.float64)
    edges = np.cumsum(macs) / macs.sum()
    group_of = np.minimum((edges * count - 1e-9).astype(int), count - 1)
    groups: list[list[str]] = [[] for _ in range(count)]
    for name, g in zip(names, group_of, strict=True):
        groups[g].append(name)
    return [g for g in groups if g]


def _per_layer_search(
    evaluator: Evaluator,
    measure: Callable[..., Evaluation],
    best_global: Evaluation,
    settings: SearchSettings,
    floor: float,
    at: Callable[[float], Evaluation],
) -> None:
    """Greedy per-group raises from one step below the global optimum (see the module docstring)."""
    groups = layer_groups(evaluator.layer_names, evaluator.dense_macs, settings.groups)
    # Half a step below the global optimum leaves fidelity to spend where it buys the most MACs; a whole
    # step would spend the first round climbing back to the global optimum.
    state = at(best_global.threshold / math.sqrt(settings.raise_factor))
    if not state.within(floor):
        state = best_global
    factors = [settings.raise_factor] * len(groups)
    for round_index in range(1, settings.rounds + 1):
        options = []
        for g, group in enumerate(groups):
            if factors[g] < settings.min_factor:
                continue
            thresholds = dict(state.thresholds)
            for name in group:
                thresholds[name] *= factors[g]
            point = measure(thresholds, "per-layer", f"round {round_index}: group {g + 1} x{factors[g]:.2g}")
            gain = state.macs_executed - point.macs_executed
            loss = max(state.fidelity - point.fidelity, 0.0)
            if not point.within(floor):
                factors[g] = math.sqrt(factors[g])  # too big a step for this group: try a smaller one
            elif gain > settings.min_gain * state.macs_executed:
                options.append(_Raise(gain / max(loss, 1e-3), gain, loss, g, point))
        if not options:
            return
        options.sort(key=lambda o: -o.efficiency)
        # Assume losses add up to pick a set, then measure it; drop the least efficient raise until it fits.
        chosen, spent = [], 0.0
        for option in options:
            if state.fidelity - spent - option.loss >= floor:
                chosen.append(option)
                spent += option.loss
        state = _apply_raises(state, chosen, groups, factors, measure, floor, round_index) or options[0].point


def _apply_raises(
    state: Evaluation,
    chosen: list[_Raise],
    groups: list[list[str]],
    factors: list[float],
    measure: Callable[..., Evaluation],
    floor: float,
    round_index: int,
) -> Evaluation | None:
    while len(chosen) > 1:
        thresholds = dict(state.thresholds)
        for option in chosen:
            for name in groups[option.group]:
                thresholds[name] *= factors[option.group]
        label = f"round {round_index}: groups {','.join(str(c.group + 1) for c in chosen)} together"
        point = measure(thresholds, "per-layer", label)
        if point.within(floor):
            return point
        chosen = chosen[:-1]
    return chosen[0].point if chosen else None


def calibration_file(
    result: CalibrationResult,
    loaded: LoadedModel,
    skip: SkipSettings,
    clip: CalibrationClip,
    max_drop: float,
) -> Calibration:
    """The :class:`Calibration` to save: per-layer thresholds, what they were measured to give, on what."""
    best, best_global = result.best, result.best_global
    return Calibration(
        model=loaded.name,
        weights_sha256=loaded.weights_sha256,
        gate=skip.gate,
        block=skip.block,
        threshold=float(best_global.threshold or 0.0),
        thresholds={name: float(f"{t:.6g}") for name, t in best.thresholds.items()},
        measured={
            "reduction": round(best.reduction, 4),
            "fidelity": {"metric": result.metric, "value": round(best.fidelity, 3)},
            "max_drop": max_drop,
            "global": {
                "threshold": best_global.threshold,
                "reduction": round(best_global.reduction, 4),
                "fidelity": round(best_global.fidelity, 3),
            },
            "per_layer_gain": round(result.per_layer_gain, 4),
            "evaluations": len(result.evaluations),
            "seconds": round(result.seconds, 1),
            "backend": skip.backend,
            **(
                {}
                if result.gates is None
                else {
                    "trained_gates": {
                        "file": result.gates.label,
                        "reduction": round(result.gates.reduction, 4),
                        "fidelity": round(result.gates.fidelity, 3),
                    }
                }
            ),
        },
        frames={
            "input": clip.input_name,
            "first": clip.first_frame,
            "count": len(clip.inputs),
            "resolution": list(clip.input_size),
        },
    )


def plot_tradeoff(result: CalibrationResult, path: Path, title: str) -> None:
    """PNG: fidelity against MAC reduction for the global sweep and the per-layer search."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sweep = sorted((p for p in result.evaluations if p.phase == "global"), key=lambda p: p.threshold or 0.0)
    ax.plot([p.reduction for p in sweep], [p.fidelity for p in sweep], "o-", color="tab:blue",
            label="one global threshold")  # fmt: skip
    for p in sweep:
        ax.annotate(f"{p.threshold:g}", (p.reduction, p.fidelity), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color="tab:blue")  # fmt: skip
    per_layer = [p for p in result.evaluations if p.phase == "per-layer"]
    if per_layer:
        ax.scatter([p.reduction for p in per_layer], [p.fidelity for p in per_layer], s=14,
                   color="tab:orange", alpha=0.7, label="per-layer candidates")  # fmt: skip
    ax.scatter([result.best.reduction], [result.best.fidelity], marker="*", s=220, color="tab:red", zorder=5,
               label=f"chosen: {result.best.reduction:.2f}x, {result.best.fidelity:.2f}")  # fmt: skip
    if result.gates is not None:
        learned = result.gates
        ax.scatter([learned.reduction], [learned.fidelity], marker="D", s=70, color="tab:green", zorder=5,
                   label=f"trained gates: {learned.reduction:.2f}x, {learned.fidelity:.2f}")  # fmt: skip
    ax.axhline(result.floor, color="grey", linestyle="--", linewidth=1, label=f"budget ({result.floor:g})")
    ax.set_xlabel("MAC reduction (dense / executed)")
    ax.set_ylabel(f"fidelity vs dense: {result.metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def calibrate_model(
    loaded: LoadedModel,
    skip: SkipSettings,
    clip: CalibrationClip,
    score_threshold: float,
    settings: SearchSettings,
    on_evaluation: Callable[[Evaluation], None] | None = None,
    gates: Path | None = None,
) -> CalibrationResult:
    """Converts ``loaded`` with ``skip`` and searches thresholds on ``clip``; with ``gates`` (a file from
    ``train-gates``), also measures those trained gates on the same frames, so the two can be compared."""
    if skip.gate == "gumbel":
        raise SkipconvError(
            "calibrate searches the thresholds of the norm gates (output-norm, input-norm); Gumbel gates are "
            "trained instead (skipconv train-gates) and only measured here"
        )
    model = skip_model(loaded, skip)
    evaluator = Evaluator(loaded, model, clip, score_threshold)
    result = search(evaluator, settings, on_evaluation)
    if gates is not None:
        learned = skip_model(loaded, replace(skip, gate="gumbel", gates=gates))
        result.gates = Evaluator(loaded, learned, clip, score_threshold)({}, "trained gates", str(gates))
        if on_evaluation is not None:
            on_evaluation(result.gates)
    return result
