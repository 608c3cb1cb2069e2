"""Calibration files: per-layer thresholds found for one model, applied by ``run --calibration``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from skipconv_cli.errors import SkipconvError

FORMAT = "skipconv-calibration/1"
GATES = ("output-norm", "input-norm", "gumbel")


@dataclass
class Calibration:
    """What ``skipconv calibrate`` found, and for which model it holds."""

    model: str
    weights_sha256: str | None
    gate: str
    block: int
    threshold: float  # the best global threshold
    thresholds: dict[str, float]  # per layer, after the greedy per-layer search
    measured: dict = field(default_factory=dict)  # reduction, fidelity, ... on the calibration frames
    frames: dict = field(default_factory=dict)  # input, first frame, count, resolution
    format: str = FORMAT

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    def check_matches(self, model: str, weights_sha256: str | None, layer_names: list[str]) -> None:
        """Refuses a calibration made for another model, other weights or other layers."""
        check_same_model(
            "calibration", (self.model, self.weights_sha256), (model, weights_sha256), "calibrate"
        )
        unknown = sorted(set(self.thresholds) - set(layer_names))
        if unknown:
            raise SkipconvError(
                f"calibration names layers this model does not have: {', '.join(unknown[:3])}"
            )


def check_same_model(
    what: str, saved: tuple[str, str | None], current: tuple[str, str | None], redo: str
) -> None:
    """Refuses a file (calibration, gates) made for another model or other weights than the ones loaded."""
    (saved_model, saved_sha), (model, sha) = saved, current
    if saved_model != model:
        raise SkipconvError(f"{what} is for model {saved_model!r}, not {model!r}")
    if saved_sha != sha:
        raise SkipconvError(
            f"{what} was made with weights sha256 {str(saved_sha)[:12]}…, these are {str(sha)[:12]}…: "
            f"{redo} again for these weights"
        )


def load_calibration(path: Path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise SkipconvError(f"calibration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipconvError(f"calibration file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SkipconvError(f"{path} is not a skipconv calibration file (format {FORMAT!r} expected)")
    try:
        calibration = Calibration(**data)
    except TypeError as e:
        raise SkipconvError(f"calibration file {path} has missing or unexpected fields: {e}") from e
    problem = _problem(calibration)
    if problem:
        raise SkipconvError(f"calibration file {path} is damaged: {problem}; calibrate again")
    return calibration


def _problem(c: Calibration) -> str | None:
    """What is wrong with a loaded file's values (hand-edited or truncated files), or None."""
    if not isinstance(c.model, str) or not c.model:
        return "'model' must be a model name"
    if c.weights_sha256 is not None and not isinstance(c.weights_sha256, str):
        return "'weights_sha256' must be a string or null"
    if c.gate not in GATES:
        return f"'gate' must be one of {', '.join(GATES)}, not {c.gate!r}"
    if isinstance(c.block, bool) or c.block not in (1, 2, 4, 8):
        return f"'block' must be 1, 2, 4 or 8, not {c.block!r}"
    if not isinstance(c.thresholds, dict):
        return "'thresholds' must map layer names to numbers"
    for name, value in [("threshold", c.threshold), *c.thresholds.items()]:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            return f"threshold of {name!r} is {value!r}, not a finite number >= 0"
    if not isinstance(c.measured, dict) or not isinstance(c.frames, dict):
        return "'measured' and 'frames' must be objects"
    return None
