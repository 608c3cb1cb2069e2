"""Video I/O on real clips: reading, bad inputs, damaged files, the writer (also interrupted), drawing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from skipconv_cli.errors import SkipconvError
from skipconv_cli.pipeline import annotate
from skipconv_cli.pipeline.video import JsonLinesWriter, VideoWriter, open_source

REPO = Path(__file__).resolve().parents[1]


def _count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    """Frames cv2 decodes from ``path`` and their (height, width): an independent reader for the writer."""
    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    cap.release()
    return n, size


@pytest.fixture(scope="module")
def car_clip_30(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames of car-detection.mp4 re-encoded by VideoWriter (fragmented mp4)."""
    out = tmp_path_factory.mktemp("clip") / "cars30.mp4"
    src = open_source(str(videos_dir / "car-detection.mp4"), max_frames=30)
    with VideoWriter(out, src.fps) as w:
        for frame in src:
            w.write(frame)
    return out


# --- reading ---------------------------------------------------------------------------------------------


def test_reads_ten_frames_lazily(videos_dir: Path) -> None:
    src = open_source(str(videos_dir / "one-by-one-person-detection.mp4"), max_frames=10)
    assert src.frame_size == (432, 768)
    assert src.fps == pytest.approx(10.0)
    assert src.frame_count == 1394
    assert src.expected_frames == len(src) == 10
    frames = iter(src)
    assert isinstance(frames, types.GeneratorType)
    got = list(frames)
    assert len(got) == 10 == src.frames_read
    assert all(f.shape == (432, 768, 3) and f.dtype == np.uint8 for f in got)
    assert not src.truncated
    # A file source can be read again (it is reopened) and gives the same frames.
    again = list(src)
    assert len(again) == 10 and np.array_equal(again[9], got[9])


def test_start_reads_from_that_frame_exactly(videos_dir: Path) -> None:
    path = str(videos_dir / "car-detection.mp4")
    every = list(open_source(path, max_frames=25))
    src = open_source(path, max_frames=5, start=20)
    assert src.start == 20 and src.expected_frames == 5
    got = list(src)
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, every[20:], strict=True))
    assert np.array_equal(list(src)[0], every[20])  # read again: from the same frame
    # near the end, the frames left bound what an iteration yields
    tail = open_source(path, start=370)
    assert tail.expected_frames == 7 and len(list(tail)) == 7 and not tail.truncated


def test_start_past_the_end_and_negative(videos_dir: Path) -> None:
    path = str(videos_dir / "car-detection.mp4")
    with pytest.raises(SkipconvError, match="has 377 frames: start frame 377 is past its end"):
        open_source(path, start=377)
    with pytest.raises(SkipconvError, match="has 377 frames: start frame 5000 is past its end"):
        open_source(path, start=5000)
    with pytest.raises(SkipconvError, match="start frame must be 0 or more"):
        open_source(path, start=-1)


def test_sample_spec(videos_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKIPCONV_MANIFEST_DIR", raising=False)
    monkeypatch.setenv("SKIPCONV_SAMPLES", str(videos_dir))
    src = open_source("sample:cars", max_frames=2)
    assert src.name == "sample:cars" and src.frame_count == 377 and len(list(src)) == 2


def test_missing_file() -> None:
    with pytest.raises(SkipconvError, match="video file nowhere/clip.mp4 does not exist"):
        open_source("nowhere/clip.mp4")


def test_text_file_named_mp4(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are not frames\n" * 100)
    with pytest.raises(SkipconvError, match="notes.mp4 is not a readable video"):
        open_source(str(fake))


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(SkipconvError, match="empty.mp4 is an empty file"):
        open_source(str(empty))


def test_directory_and_bad_max_frames(tmp_path: Path) -> None:
    with pytest.raises(SkipconvError, match="is not a file"):
        open_source(str(tmp_path))
    with pytest.raises(SkipconvError, match="max frames"):
        open_source(str(tmp_path), max_frames=0)


def test_truncated_fragmented_mp4_yields_frames_before_the_damage(car_clip_30: Path, tmp_path: Path) -> None:
    full = list(open_source(str(car_clip_30)))
    assert len(full) == 30
    data = car_clip_30.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    src = open_source(str(cut))
    got = list(src)
    assert 0 < len(got) < 30
    for a, b in zip(got, full[: len(got)], strict=True):
        assert np.array_equal(a, b)
    if src.frame_count is not None and src.frame_count > len(got):
        assert src.truncated


def test_truncated_original_mp4(videos_dir: Path, tmp_path: Path) -> None:
    data = (videos_dir / "car-detection.mp4").read_bytes()
    cut = tmp_path / "cars40.mp4"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    src = open_source(str(cut))
    n = sum(1 for _ in src)
    assert 0 < n < 377
    assert src.truncated


# --- writing ---------------------------------------------------------------------------------------------


def test_writer_round_trip(car_clip_30: Path) -> None:
    n, size = _count_frames(car_clip_30)
    assert (n, size) == (30, (432, 768))
    src = open_source(str(car_clip_30))
    assert src.fps == pytest.approx(12.5)


def test_writer_keeps_content_and_pads_odd_sizes(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:101, 0:75]
    frame = np.dstack([xx * 3, yy * 2, np.full_like(xx, 128)]).astype(np.uint8)
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, fps=10) as w:
        for _ in range(5):
            w.write(frame)
    assert w.frames_written == 5
    back = list(open_source(str(out)))
    assert len(back) == 5 and back[0].shape == (102, 76, 3)
    assert np.abs(back[2][:101, :75].astype(int) - frame).mean() < 4


def test_writer_without_frames_writes_nothing(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "none.mp4", fps=25):
        pass
    assert not (tmp_path / "none.mp4").exists()


def test_writer_rejects_a_size_change(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "x.mp4", fps=25) as w:
        w.write(np.zeros((32, 32, 3), np.uint8))
        with pytest.raises(ValueError, match="differs from the first frame"):
            w.write(np.zeros((16, 32, 3), np.uint8))


def test_ffmpeg_failure_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "is_a_dir.mp4"
    target.mkdir()
    with pytest.raises(SkipconvError, match="ffmpeg .*is_a_dir.mp4"):
        with VideoWriter(target, fps=25) as w:
            for _ in range(200):
                w.write(np.zeros((64, 64, 3), np.uint8))


_WRITER_SCRIPT = """
import sys, time
import numpy as np
from skipconv_cli.pipeline.video import VideoWriter

w = VideoWriter(sys.argv[1], fps=10)
try:
    with w:
        i = 0
        while True:
            w.write(np.full((48, 64, 3), i % 256, np.uint8))
            i += 1
            if i == 20:
                print(w._proc.pid, flush=True)
            time.sleep(0.005 if i < 20 else 0.02)
except KeyboardInterrupt:
    print("interrupted", w.frames_written, flush=True)
    raise
"""


def _start_writer(tmp_path: Path) -> tuple[subprocess.Popen[str], int, Path]:
    out = tmp_path / "interrupted.mp4"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER_SCRIPT), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a job in a terminal
        cwd=REPO,
    )
    assert child.stdout is not None
    ffmpeg_pid = int(child.stdout.readline())
    return child, ffmpeg_pid, out


def test_ctrl_c_leaves_a_playable_mp4(tmp_path: Path) -> None:
    child, _, out = _start_writer(tmp_path)
    time.sleep(0.2)
    os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    stdout, err = child.communicate(timeout=20)
    assert "KeyboardInterrupt" in err
    written = int(stdout.split()[-1])
    n, size = _count_frames(out)
    assert size == (48, 64)
    # Every frame handed to the writer is in the file (one more if the signal came between the pipe write
    # and the counter): ffmpeg did not get the SIGINT and finished after Python closed its stdin.
    assert written > 20 and written <= n <= written + 1


def test_killed_parent_leaves_a_playable_mp4(tmp_path: Path) -> None:
    child, ffmpeg_pid, out = _start_writer(tmp_path)
    child.kill()  # no Python cleanup at all: ffmpeg sees EOF on its stdin and finishes the file
    child.communicate(timeout=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(ffmpeg_pid):
        time.sleep(0.05)
    n, _ = _count_frames(out)
    assert n >= 20


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_json_lines_flushed_per_line(tmp_path: Path) -> None:
    path = tmp_path / "preds.jsonl"
    with JsonLinesWriter(path) as w:
        w.write({"frame": np.int64(0), "boxes": np.array([[1.5, 2, 3, 4, 0.9, 0]])})
        assert json.loads(path.read_text()) == {"frame": 0, "boxes": [[1.5, 2.0, 3.0, 4.0, 0.9, 0.0]]}
        w.write({"frame": 1, "score": np.float32(0.5)})
    lines = path.read_text().splitlines()
    assert [json.loads(ln)["frame"] for ln in lines] == [0, 1]


# --- drawing ---------------------------------------------------------------------------------------------


def test_drawing_returns_new_frames(videos_dir: Path) -> None:
    frame = next(iter(open_source(str(videos_dir / "car-detection.mp4"), max_frames=1)))
    before = frame.copy()
    boxes = [[100, 50, 300, 200, 0.87, 2], [0, 0, 20, 20, 0.3, 99]]
    boxed = annotate.draw_boxes(frame, boxes, ["a", "b", "car"])
    keypoints = [[200.0, 100.0, 0.9], [220.0, 150.0, 0.8], [0.0, 0.0, 0.0], [float("nan"), 5.0, 0.9]]
    posed = annotate.draw_persons(frame, [{"keypoints": keypoints, "score": 0.8}], [(0, 1), (1, 2), (2, 3)])
    mask = np.zeros((27, 48), np.float32)
    mask[5:10, 5:20] = 1.0
    heat = annotate.overlay_mask(frame, mask)
    hud = annotate.draw_hud(frame, ["12.3 fps", "MACs saved 81%"])
    assert np.array_equal(frame, before)  # inputs untouched
    for out in (boxed, posed, heat, hud):
        assert out.shape == frame.shape and out.dtype == np.uint8
        assert not np.array_equal(out, frame)
    assert np.array_equal(annotate.draw_persons(frame, [], [(0, 1)]), frame)
    assert np.array_equal(annotate.draw_hud(frame, []), frame)
