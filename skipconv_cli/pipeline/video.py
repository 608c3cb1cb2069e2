"""Video in and out: a lazy frame source, an H.264 writer that survives Ctrl-C, and a JSON-lines writer.

Frames are BGR uint8 arrays [H, W, 3] throughout (OpenCV's layout, which the built-in models expect).

* :func:`open_source` reads a file, a ``sample:NAME``, a camera index or a stream URL; frames come from a
  generator so memory stays constant on long streams.
* :class:`VideoWriter` pipes raw frames to the ffmpeg binary shipped by imageio-ffmpeg. It writes a
  *fragmented* mp4 and keeps ffmpeg out of the terminal's process group, so Ctrl-C reaches only Python, which
  then closes ffmpeg's stdin: every frame written so far ends up in a playable file.
* :class:`JsonLinesWriter` writes one JSON object per line, flushed at once, so an interrupted run leaves a
  valid file too.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

# FFmpeg inside OpenCV logs every damaged packet to stderr; errors here are reported as one line instead.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2
import numpy as np

from skipconv_cli.errors import SkipconvError

_FALLBACK_FPS = 30.0
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class FrameSource:
    """A video file, camera or stream, iterated lazily as BGR uint8 frames.

    Build it with :func:`open_source`, which checks that at least one frame decodes. Attributes:

    * ``fps``: frames per second from the container (30 when the source does not say).
    * ``frame_size``: (height, width) of the frames.
    * ``frame_count``: frames the container announces, or None (cameras, streams, unknown).
    * ``start``: the first frame yielded (frames before it are decoded and dropped: an exact seek).
    * ``max_frames``: iteration stops after this many frames from ``start`` (None: all).
    * ``frames_read``: frames yielded by the latest iteration.
    * ``truncated``: True once an iteration of a file ended before the announced frame count (a damaged or
      cut file): the frames before the damage were yielded, and the caller may warn.
    * ``is_live``: a camera or stream, which can be iterated only once.
    """

    def __init__(
        self,
        name: str,
        target: str | int,
        capture: cv2.VideoCapture,
        first_frame: np.ndarray,
        max_frames: int | None = None,
        start: int = 0,
    ) -> None:
        self.name = name
        self.start = start
        self.is_live = isinstance(target, int) or bool(_URL.match(str(target)))
        self.max_frames = max_frames
        self.frame_size: tuple[int, int] = (int(first_frame.shape[0]), int(first_frame.shape[1]))
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and 0 < fps < 1000 else _FALLBACK_FPS
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        known = not self.is_live and math.isfinite(count) and count > 0
        self.frame_count: int | None = int(count) if known else None
        self.frames_read = 0
        self.truncated = False
        self._target = target
        self._capture: cv2.VideoCapture | None = capture
        self._first: np.ndarray | None = first_frame
        self._iterated = False

    def __len__(self) -> int:
        """Frames an iteration will yield if the file is intact; raises TypeError when unknown (live)."""
        total = self.expected_frames
        if total is None:
            raise TypeError(f"{self.name} has no known frame count")
        return total

    @property
    def expected_frames(self) -> int | None:
        """min(frame_count - start, max_frames), or None when neither is known: what a progress bar should
        show."""
        after_start = None if self.frame_count is None else max(self.frame_count - self.start, 0)
        known = [n for n in (after_start, self.max_frames) if n is not None]
        return min(known) if known else None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield frames one at a time; a file can be iterated again (it is reopened), a live source cannot."""
        if self._iterated:
            if self.is_live:
                raise SkipconvError(f"{self.name} is a live source and can be read only once")
            capture, first = _open_capture(self._target, self.name, self.start)
        else:
            capture, first = self._capture, self._first
            self._capture, self._first = None, None
        self._iterated = True
        return self._frames(capture, first)

    def _frames(self, capture: cv2.VideoCapture, first: np.ndarray) -> Iterator[np.ndarray]:
        self.frames_read = 0
        limit = self.max_frames
        try:
            frame: np.ndarray | None = first
            while frame is not None and (limit is None or self.frames_read < limit):
                self.frames_read += 1
                yield frame
                if limit is not None and self.frames_read >= limit:
                    break
                frame = _read(capture)
        finally:
            capture.release()
        expected = self.expected_frames
        if not self.is_live and expected is not None and self.frames_read < expected:
            self.truncated = True

    def close(self) -> None:
        """Release the capture if the source was never iterated (iteration releases it itself)."""
        if self._capture is not None:
            self._capture.release()
            self._capture, self._first = None, None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.frame_size
        return f"FrameSource({self.name!r}, {w}x{h}, fps={self.fps:g}, frame_count={self.frame_count})"


def open_source(spec: str, max_frames: int | None = None, start: int = 0) -> FrameSource:
    """Open a video path, ``sample:NAME``, camera index (``"0"``) or stream URL (``rtsp://…``, ``http://…``),
    to be read from frame ``start`` (counted from 0).

    Decodes the first frame at once (and the frames up to ``start``), so a file that is not a video, or
    one that ends before ``start``, fails here with a one-line error rather than in the middle of a run.

    Raises:
        SkipconvError: the file is missing, empty, not a readable video, has no frames, or none from
            ``start`` on.
    """
    if max_frames is not None and max_frames < 1:
        raise SkipconvError(f"max frames must be at least 1, got {max_frames}")
    if start < 0:
        raise SkipconvError(f"the start frame must be 0 or more, got {start}")
    target: str | int
    if spec.startswith("sample:"):
        from skipconv_cli.assets import resolve_sample

        path = resolve_sample(spec)
        target, name = str(path), spec
    elif spec.isdigit():
        target, name = int(spec), f"camera {spec}"
    elif _URL.match(spec):
        target, name = spec, spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise SkipconvError(f"video file {spec} does not exist")
        if not path.is_file():
            raise SkipconvError(f"{spec} is not a file")
        if path.stat().st_size == 0:
            raise SkipconvError(f"{spec} is an empty file (0 bytes), not a readable video")
        target, name = str(path), spec
    capture, first = _open_capture(target, name, start)
    return FrameSource(name, target, capture, first, max_frames, start)


def _open_capture(target: str | int, name: str, start: int = 0) -> tuple[cv2.VideoCapture, np.ndarray]:
    """The opened capture and its frame ``start``, decoded."""
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        what = "camera could not be opened" if isinstance(target, int) else "is not a readable video"
        raise SkipconvError(f"{name} {what}")
    first = _read(capture)
    if first is None:
        capture.release()
        raise SkipconvError(f"{name} is not a readable video (no frame could be decoded)")
    if start:
        # grab() decodes each frame but skips its conversion to BGR (~0.5 ms a frame here). Seeking with
        # CAP_PROP_POS_FRAMES is faster, and exact on the sample clips, but not with every codec and
        # container (B-frames, variable frame rates: opencv/opencv#9053), and a wrong frame goes unnoticed
        decoded = 1
        while decoded < start and capture.grab():
            decoded += 1
        first = _read(capture) if decoded == start else None
        if first is None:
            capture.release()
            raise SkipconvError(f"{name} has {decoded} frames: start frame {start} is past its end")
    return capture, first


def _read(capture: cv2.VideoCapture) -> np.ndarray | None:
    """Next frame, or None at the end or at damage that the decoder cannot get past."""
    try:
        ok, frame = capture.read()
    except cv2.error:
        return None
    if not ok or frame is None or frame.size == 0:
        return None
    if frame.ndim == 2:  # some cameras deliver grey frames
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    return frame


class VideoWriter:
    """Writes BGR uint8 frames to an H.264 mp4 via ffmpeg; the file stays playable if the run is cut short.

    ffmpeg is started at the first frame (its size fixes the video size). Odd widths or heights are padded by
    one black pixel, since yuv420p needs even dimensions. A writer closed before any frame creates no file.

    Args:
        path: output file (``.mp4``); parent folders are created.
        fps: frame rate written into the file.
        crf: x264 quality (lower is better, 23 is x264's default).
        keyframe_interval_s: seconds between keyframes; each keyframe starts a new mp4 fragment, so this
            bounds what a hard kill of ffmpeg itself could lose.

    Example:
        >>> with VideoWriter("out.mp4", fps=source.fps) as writer:  # doctest: +SKIP
        ...     for frame in source:
        ...         writer.write(frame)
    """

    def __init__(self, path: str | Path, fps: float, crf: int = 23, keyframe_interval_s: float = 2.0) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps}")
        self.path = Path(path)
        self.fps = float(fps)
        self.crf = crf
        self.keyframe_interval_s = keyframe_interval_s
        self.frame_size: tuple[int, int] | None = None
        self.frames_written = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._closed = False

    def _command(self, width: int, height: int) -> list[str]:
        import imageio_ffmpeg

        gop = max(1, round(self.fps * self.keyframe_interval_s))
        return [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", f"{self.fps:g}",
            "-i", "pipe:0",
            "-an", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", str(self.crf), "-pix_fmt", "yuv420p",
            "-g", str(gop),
            "-movflags", "frag_keyframe+empty_moov+default_base_moof",
            "-f", "mp4", str(self.path),
        ]  # fmt: skip

    def _start(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = tempfile.TemporaryFile()
        try:
            # start_new_session: a terminal Ctrl-C goes to the foreground process group; ffmpeg must not get
            # it, or it would stop mid-fragment. Python gets KeyboardInterrupt and closes stdin instead.
            self._proc = subprocess.Popen(
                self._command(width, height),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                start_new_session=True,
            )
        except OSError as e:
            self._stderr.close()
            raise SkipconvError(f"could not start ffmpeg to write {self.path}: {e}") from e
        self.frame_size = (height, width)

    def write(self, frame: np.ndarray) -> None:
        """Append one BGR uint8 frame [H, W, 3]; every frame must have the size of the first."""
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is closed")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        if self._proc is None:
            self._start(h, w)
        elif (h, w) != self.frame_size:
            raise ValueError(f"frame size {(h, w)} differs from the first frame's {self.frame_size}")
        stdin = self._proc.stdin if self._proc is not None else None
        if stdin is None:
            raise ValueError(f"ffmpeg for {self.path} has no stdin")
        try:
            stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, OSError) as e:
            raise SkipconvError(f"ffmpeg stopped while writing {self.path}: {self._ffmpeg_error()}") from e
        self.frames_written += 1

    def close(self) -> None:
        """Close ffmpeg's stdin and wait for it to finish the file; raises if ffmpeg failed."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass  # ffmpeg already gone: its exit code and stderr below say why
            rc = proc.wait()
            if rc != 0:
                why = self._ffmpeg_error()
                raise SkipconvError(f"ffmpeg failed writing {self.path} (exit code {rc}): {why}")
        finally:
            self._stderr.close()

    def _ffmpeg_error(self) -> str:
        """Last line of ffmpeg's stderr, for a one-line error."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            lines = []
        return lines[-1].strip() if lines else "no message from ffmpeg"

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except SkipconvError:
            if exc_type is None:
                raise  # otherwise the original exception (e.g. KeyboardInterrupt) is the one to report


class JsonLinesWriter:
    """One JSON object per line, flushed at once, so an interrupted run leaves a valid file.

    numpy scalars and arrays are converted to plain numbers and lists.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise SkipconvError(f"could not write {self.path}: {e.strerror}") from e
        self.lines_written = 0

    def write(self, obj: dict) -> None:
        """Append ``obj`` as one line and flush it to the OS."""
        self._file.write(json.dumps(obj, default=_to_json, separators=(",", ":")) + "\n")
        self._file.flush()
        self.lines_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonLinesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
