"""`skipconv run` end to end through the real command line: outputs, reports and every kind of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from tests.conftest import skipconv


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def video_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    return count


def test_pose_run_skips_half_the_macs_on_either_backend(env: dict, tmp_path: Path) -> None:
    # the reference backend counts the algorithm's MACs; the sparse backend counts what it ran, which
    # includes layers it chose to run as plain convolutions because skipping them was slower
    report, lines, video = tmp_path / "r.json", tmp_path / "p.jsonl", tmp_path / "o.mp4"
    result = skipconv(
        "run", "sample:asl", "--task", "pose", "--gate", "output-norm", "--threshold", "0.3",
        "--max-frames", "40", "--backend", "reference", "--report", str(report), "--predictions", str(lines),
        "--output", str(video),
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["frames"] == 40
    assert data["model"] == "openpose-mbv2-14" and data["task"] == "pose"
    assert data["gate"] == "output-norm" and data["threshold"] == 0.3 and data["block"] == 1
    assert data["resolution"] == [368, 432]
    assert data["macs"]["reduction"] > 2.0, data["macs"]
    assert len(data["layers"]) == 159
    frames = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [f["frame"] for f in frames] == list(range(40))
    assert all(len(f["persons"]) == 1 for f in frames)  # the signer, in every frame
    assert all(len(p["keypoints"]) == 18 for f in frames for p in f["persons"])
    assert video_frames(video) == 40
    assert "per-layer sparsity" in result.stdout

    # the default backend is the fast one; where it runs a layer plain its output is the exact one, so it
    # stays at least as close to the dense model as the reference backend
    fast_report = tmp_path / "f.json"
    result = skipconv(
        "run", "sample:asl", "--task", "pose", "--gate", "output-norm", "--threshold", "0.3",
        "--max-frames", "40", "--report", str(fast_report), "--compare-dense",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fast = json.loads(fast_report.read_text())
    assert fast["backend"] == "sparse" and data["backend"] == "reference"
    assert 1.5 < fast["macs"]["reduction"] <= data["macs"]["reduction"], fast["macs"]  # 2.2-2.5 measured
    assert fast["fidelity"]["metric"] == "PCK@0.2" and fast["fidelity"]["value"] >= 90, fast["fidelity"]


def test_dense_run_reports_exactly_one(env: dict, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = skipconv(
        "run", "sample:cars", "--model", "light-person", "--dense", "--max-frames", "5",
        "--report", str(report), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["macs"]["reduction"] == 1.0
    assert data["dense"] is True and data["frames"] == 5 and data["backend"] == "plain"
    assert all(layer["macs_executed"] == layer["macs_dense"] for layer in data["layers"])


def test_detect_run_writes_boxes_and_mask_overlay(env: dict, tmp_path: Path) -> None:
    # from frame 1240 a person walks towards the camera (the clip's first thousand frames are an empty room)
    lines, video = tmp_path / "p.jsonl", tmp_path / "o.mp4"
    result = skipconv(
        "run", "sample:person", "--model", "light-person", "--block", "4", "--show-mask", "--start", "1240",
        "--max-frames", "8", "--predictions", str(lines), "--output", str(video), "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["block"] == 4 and data["frames"] == 8 and data["start"] == 1240
    frames = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [frame["frame"] for frame in frames] == list(range(1240, 1248))  # the video's frame numbers
    for frame in frames:
        assert len(frame["boxes"]) == 1, frame  # the walker
        for box in frame["boxes"]:
            x1, y1, x2, y2, score, cls = box
            assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 432 and 0 < score <= 1 and cls == 0
    assert video_frames(video) == 8


def test_own_model_through_module_function(env: dict, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = skipconv(
        "run", "sample:person", "--model", "tests.user_models:person_detector", "--task", "detect",
        "--size", "192", "--max-frames", "4", "--report", str(report), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["model"] == "tests.user_models:person_detector" and data["frames"] == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.mp4"], "does not exist"),
        (["pyproject.toml"], "is not a readable video"),
        (["sample:person", "--model", "resnet-9000"], "unknown model 'resnet-9000'"),
        (["sample:person", "--model", "yolox-nano", "--task", "pose"], "is a detect model, not pose"),
        (["sample:person", "--threshold", "-0.5"], "--threshold"),
        (["sample:person", "--block", "3"], "--block"),
        (["sample:person", "--task", "segment"], "--task"),
        (["sample:person", "--size", "100x100"], "multiples of 32"),
        (["sample:cars", "--start", "5000"], "sample:cars has 377 frames: start frame 5000 is past its end"),
        (["sample:cars", "--start", "-1"], "--start"),
        (["sample:cars", "--score-threshold", "-0.5"], "--score-threshold"),  # (every box, silently)
        (["sample:cars", "--score-threshold", "2"], "--score-threshold"),  # (no box, silently)
        (["sample:nothing"], "unknown sample"),
        (["sample:person", "--model", "tests.user_models:missing", "--task", "detect"], "cannot import"),
    ],
)
def test_bad_input_gives_one_line(env: dict, args: list[str], expected: str) -> None:
    line = one_error_line(skipconv("run", *args, env=env))
    assert expected in line


def test_empty_video_file(env: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "empty" in one_error_line(skipconv("run", str(empty), env=env))


def test_weights_with_wrong_checksum(env: dict, tmp_path: Path) -> None:
    bad = tmp_path / "weights"
    bad.mkdir()
    (bad / "light_person_detector.onnx").write_bytes(b"not the published file")
    line = one_error_line(
        skipconv("run", "sample:person", "--model", "light-person", env=env | {"SKIPCONV_WEIGHTS": str(bad)})
    )
    assert "sha256" in line


def test_truncated_video_keeps_the_frames_before_the_damage(
    env: dict, tmp_path: Path, videos_dir: Path
) -> None:
    # a fragmented mp4 (as the tool writes) cut in the middle: the frames before the cut stay readable
    from skipconv_cli.pipeline.video import VideoWriter, open_source

    whole = tmp_path / "whole.mp4"
    with VideoWriter(whole, fps=10) as writer:
        for frame in open_source(str(videos_dir / "one-by-one-person-detection.mp4"), max_frames=40):
            writer.write(frame)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    lines = tmp_path / "p.jsonl"
    result = skipconv("run", str(cut), "--model", "light-person", "--predictions", str(lines), env=env)
    line = one_error_line(result)
    assert "truncated" in line
    written = lines.read_text().splitlines()
    assert 0 < len(written) < 40
    assert [json.loads(x)["frame"] for x in written] == list(range(len(written)))


def test_ctrl_c_keeps_valid_outputs(env: dict, tmp_path: Path) -> None:
    lines, video, report = tmp_path / "p.jsonl", tmp_path / "o.mp4", tmp_path / "r.json"
    process = subprocess.Popen(
        [
            # a dense 416 px detector takes about a minute over the clip: still running when Ctrl-C comes
            sys.executable, "-m", "skipconv_cli.cli.main", "run", "sample:person", "--model", "yolox-nano",
            "--dense", "--predictions", str(lines), "--output", str(video), "--report", str(report),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and (not lines.exists() or len(lines.read_text().splitlines()) < 10):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "error: interrupted: outputs written so far are kept"
    ]
    frames = [json.loads(x) for x in lines.read_text().splitlines()]  # every line is valid JSON
    assert 10 <= len(frames) < 1394
    assert abs(video_frames(video) - len(frames)) <= 1
    data = json.loads(report.read_text())
    assert data["interrupted"] is True and data["frames"] >= 10


def test_help_has_examples() -> None:
    result = skipconv("run", "--help")
    assert result.returncode == 0
    assert "Examples" in result.stdout and "sample:person" in result.stdout


@pytest.mark.parametrize("command", ["run", "profile", "calibrate", "train-gates", "models"])
def test_help_reflows_its_prose_and_indents_its_examples(command: str) -> None:
    # a terminal wide enough for every paragraph: each shows on one line, whatever the source's wrapping
    result = skipconv(command, "--help", env={**os.environ, "COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    description = lines[lines.index(next(line for line in lines if line.startswith("Usage:"))) + 2 :]
    prose = description[: description.index("Examples:")]
    paragraphs = [line for line in prose if line]
    assert paragraphs and all(line.endswith((".", ")")) for line in paragraphs), paragraphs
    examples = [line for line in result.stdout.splitlines() if line.strip().startswith("skipconv ")]
    assert examples and all(line.startswith("   skipconv ") for line in examples), examples


def test_models_lists_builtins() -> None:
    result = skipconv("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"yolox-nano", "nanodet-m", "light-person", "openpose-mbv2-14", "hrnet-w32"} <= set(rows)
    assert rows["openpose-mbv2-14"]["task"] == "pose" and rows["openpose-mbv2-14"]["input_size"] == [368, 432]
    assert 4.0 < rows["openpose-mbv2-14"]["gmac"] < 4.4
    assert 0.45 < rows["yolox-nano"]["gmac"] < 0.6


def test_size_accepts_multiples_of_32_and_the_model_default() -> None:
    from skipconv_cli.errors import SkipconvError
    from skipconv_cli.pipeline.runner import parse_size

    assert parse_size(None, (368, 432)) == (368, 432)
    assert parse_size("368x432", (368, 432)) == (368, 432), "the pose models' own size, not a multiple of 32"
    assert parse_size("416", (368, 432)) == (416, 416)
    with pytest.raises(SkipconvError, match="multiples of 32"):
        parse_size("368x432", (416, 416))
