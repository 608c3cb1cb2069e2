"""`skipconv calibrate`: the search on a synthetic problem, then end to end on a short real clip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from skipconv_cli.pipeline.calibrate import Evaluation, SearchSettings, layer_groups, search
from skipconv_cli.pipeline.calibration import load_calibration

# -- the search, on a synthetic model: fast, no video ----------------------------------------------------


@dataclass
class SyntheticEvaluator:
    """Layers whose executed MACs fall and whose error grows with their threshold, at different rates:
    the per-layer search must find the layers where skipping is cheap."""

    dense: list[int] = field(default_factory=lambda: [40, 30, 20, 10, 10, 5, 5, 5])
    sensitivity: list[float] = field(default_factory=lambda: [0.05, 0.6, 0.1, 0.9, 0.05, 0.3, 0.02, 0.4])
    calls: int = 0

    def __post_init__(self) -> None:
        self.layer_names = [f"layer{i}" for i in range(len(self.dense))]
        self.dense_macs = {n: m * 1000 for n, m in zip(self.layer_names, self.dense, strict=True)}
        self.loaded = SimpleNamespace(spec=SimpleNamespace(task="detect"))

    def __call__(self, thresholds: dict[str, float], phase: str, label: str) -> Evaluation:
        self.calls += 1
        executed = {n: int(self.dense_macs[n] / (1 + 2 * thresholds[n])) for n in self.layer_names}
        loss = sum(s * thresholds[n] for n, s in zip(self.layer_names, self.sensitivity, strict=True))
        total = sum(executed.values())
        return Evaluation(
            phase,
            label,
            dict(thresholds),
            sum(self.dense_macs.values()) / total,
            100 - loss,
            total,
            executed,
            0.0,
        )


def test_search_finds_the_global_edge_and_a_better_per_layer_point() -> None:
    evaluator = SyntheticEvaluator()
    settings = SearchSettings(max_drop=1.0)
    result = search(evaluator, settings)
    # Fidelity falls linearly: 100 - 2.42 * tau, so the edge is at tau = 1/2.42 = 0.413.
    edge = 1.0 / sum(evaluator.sensitivity)
    assert edge / settings.tolerance <= result.best_global.threshold <= edge
    assert result.best.fidelity >= 99.0 and result.best_global.fidelity >= 99.0
    assert result.best.reduction > 1.15 * result.best_global.reduction
    assert len(result.evaluations) == evaluator.calls <= settings.max_evaluations
    # The largest, cheapest layer (a group of its own) ends highest; the most sensitive one lower.
    t = result.best.thresholds
    assert t["layer0"] == max(t.values()) > t["layer3"]


def test_search_keeps_the_evaluation_budget() -> None:
    evaluator = SyntheticEvaluator()
    result = search(evaluator, SearchSettings(max_drop=1.0, max_evaluations=7))
    assert evaluator.calls == len(result.evaluations) == 7
    assert result.best.fidelity >= 99.0


def test_layer_groups_are_contiguous_with_similar_macs() -> None:
    names = [f"l{i}" for i in range(10)]
    groups = layer_groups(names, {n: 10 for n in names}, 5)
    assert groups == [names[i : i + 2] for i in range(0, 10, 2)]
    assert sum(layer_groups(names, {"l0": 1000}, 4), []) == names  # one big layer: fewer groups, none lost


def test_max_drop_is_checked() -> None:
    from skipconv_cli.errors import SkipconvError

    with pytest.raises(SkipconvError, match="max-drop"):
        SearchSettings(max_drop=0)


# -- end to end on a real clip ---------------------------------------------------------------------------

START, FRAMES = 80, 10  # frames of the person clip where the light person detector finds someone


def skipconv(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skipconv_cli.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def env(weights_dir: Path, videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return os.environ | {
        "SKIPCONV_WEIGHTS": str(weights_dir),
        "SKIPCONV_SAMPLES": str(videos_dir),
        "SKIPCONV_CACHE": str(tmp_path_factory.mktemp("cache")),
    }


@pytest.fixture(scope="module")
def calibrated(env: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("calibration")
    path, plot = out / "light.json", out / "light.png"
    result = skipconv(
        "calibrate", "sample:person", "--model", "light-person", "--start", str(START),
        "--frames", str(FRAMES), "--max-drop", "1.0", "--threads", "1", "--out", str(path),
        "--plot", str(plot), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return path, plot, result.stdout


def test_calibration_file_holds_the_budget(calibrated: tuple[Path, Path, str]) -> None:
    path, plot, stdout = calibrated
    calibration = load_calibration(path)
    assert (
        calibration.model == "light-person" and calibration.gate == "output-norm" and calibration.block == 1
    )
    assert calibration.weights_sha256 and len(calibration.weights_sha256) == 64
    measured = calibration.measured
    assert measured["fidelity"]["metric"] == "AP@[.5:.95]"
    assert measured["fidelity"]["value"] >= 100 - 1.0
    assert measured["reduction"] >= measured["global"]["reduction"] > 1.0
    assert measured["global"]["threshold"] == calibration.threshold > 0
    assert calibration.frames == {
        "input": "sample:person",
        "first": START,
        "count": FRAMES,
        "resolution": [192, 192],
    }
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MAC reduction vs fidelity" in stdout and "per-layer" in stdout


def test_run_on_the_same_frames_measures_what_calibrate_measured(
    calibrated: tuple[Path, Path, str], videos_dir: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run pipeline with the file's thresholds reproduces the calibration's reduction and fidelity."""
    from skipconv_cli.cli.common import load_model, settings_from_options
    from skipconv_cli.pipeline.runner import DenseComparison, Predictor, skip_model

    from .conftest import read_frames

    monkeypatch.setenv("SKIPCONV_WEIGHTS", str(weights_dir))
    path = calibrated[0]
    torch.set_num_threads(1)
    loaded = load_model("light-person", None, None)
    # (calibrated on the reference backend, whose counts do not depend on timing)
    settings = settings_from_options(loaded, "input-norm", 0.3, 2, None, path, backend="reference")
    assert settings.gate == "output-norm" and settings.block == 1  # the file's, not the options'
    predictor = Predictor(
        loaded, skip_model(loaded, settings), (192, 192), loaded.spec.default_score_threshold
    )
    compare = DenseComparison.alongside(predictor)
    for frame in read_frames(videos_dir / "one-by-one-person-detection.mp4", FRAMES, start=START):
        compare.add(frame, predictor(frame)[0])
    from skipconv_cli.engine import report

    measured = load_calibration(path).measured
    assert report(predictor.model)["macs"]["reduction"] == pytest.approx(measured["reduction"], rel=1e-3)
    assert compare.summary()["fidelity"]["value"] == pytest.approx(measured["fidelity"]["value"], abs=1e-2)


def test_run_accepts_the_file(calibrated: tuple[Path, Path, str], env: dict, tmp_path: Path) -> None:
    path = calibrated[0]
    report = tmp_path / "r.json"
    result = skipconv(
        "run", "sample:person", "--model", "light-person", "--calibration", str(path), "--max-frames", "4",
        "--compare-dense", "--report", str(report), "--threads", "1", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["threshold"] == load_calibration(path).thresholds
    assert data["fidelity"]["metric"] == "AP@[.5:.95]" and 0 <= data["fidelity"]["value"] <= 100
    assert "fidelity vs dense" in result.stdout


BROKEN = [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {**d, "thresholds": {**d["thresholds"], next(iter(d["thresholds"])): "high"}}, "damaged"),
    (lambda d: {**d, "thresholds": [1, 2]}, "damaged"),
    (lambda d: {**d, "threshold": -1}, "damaged"),
    (lambda d: {**d, "block": 3}, "damaged"),
    (lambda d: {**d, "gate": "magic"}, "damaged"),
    (lambda d: {k: v for k, v in d.items() if k != "gate"}, "missing"),
    (lambda d: {**d, "format": "other/1"}, "not a skipconv calibration file"),
    (lambda d: {**d, "thresholds": {"no.such.layer": 1.0}}, "layers this model does not have"),
    (lambda d: {**d, "weights_sha256": "0" * 64}, "weights sha256"),
]


def broken_copy(calibrated: tuple[Path, Path, str], tmp_path: Path, edit) -> Path:
    edited = edit(json.loads(calibrated[0].read_text()))
    broken = tmp_path / "broken.json"
    broken.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    return broken


@pytest.mark.parametrize("edit, message", BROKEN)
def test_broken_files_are_refused_with_one_line(
    calibrated: tuple[Path, Path, str], tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch,
    edit, message: str,
) -> None:  # fmt: skip
    from skipconv_cli.cli.common import load_model, settings_from_options
    from skipconv_cli.errors import SkipconvError

    monkeypatch.setenv("SKIPCONV_WEIGHTS", str(weights_dir))
    loaded = load_model("light-person", None, None)
    with pytest.raises(SkipconvError) as error:
        settings_from_options(loaded, "output-norm", 0.3, 1, None, broken_copy(calibrated, tmp_path, edit))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_a_damaged_file(calibrated: tuple[Path, Path, str], env: dict, tmp_path: Path) -> None:
    broken = broken_copy(calibrated, tmp_path, BROKEN[1][0])
    result = skipconv(
        "run", "sample:person", "--model", "light-person", "--calibration", str(broken), env=env
    )
    assert "damaged" in one_error_line(result)


def test_other_model_is_refused(calibrated: tuple[Path, Path, str], env: dict) -> None:
    result = skipconv(
        "run", "sample:person", "--model", "yolox-nano", "--calibration", str(calibrated[0]), env=env
    )
    assert "calibration is for model 'light-person', not 'yolox-nano'" in one_error_line(result)


def test_calibrate_refuses_frames_with_nothing_to_compare(env: dict, tmp_path: Path) -> None:
    result = skipconv(
        "calibrate", "sample:person", "--model", "light-person", "--frames", "3",
        "--out", str(tmp_path / "c.json"), env=env,
    )  # fmt: skip
    assert "finds no object in frames 0-2" in one_error_line(result)
    assert not (tmp_path / "c.json").exists()


def test_calibrate_needs_trained_gates_for_the_gumbel_gate(env: dict, tmp_path: Path) -> None:
    result = skipconv("calibrate", "sample:person", "--model", "light-person", "--gate", "gumbel", env=env)
    assert "no trained gates for light-person" in one_error_line(result)


def test_calibrate_measures_the_shipped_gates_next_to_the_thresholds(env: dict, tmp_path: Path) -> None:
    path, plot = tmp_path / "people.json", tmp_path / "people.png"
    result = skipconv(
        "calibrate", "sample:person", "--model", "yolox-nano", "--gate", "gumbel",
        "--start", "250", "--frames", "6", "--threads", "2", "--out", str(path), "--plot", str(plot), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calibration = load_calibration(path)
    assert calibration.gate == "output-norm"  # the search runs on the norm gate; the gates are measured
    learned = calibration.measured["trained_gates"]
    assert learned["file"].endswith("weights/gates/yolox-nano.gates.pt")
    assert learned["reduction"] > 1.5 and 0 <= learned["fidelity"] <= 100
    assert "trained gates" in result.stdout and plot.stat().st_size > 0
