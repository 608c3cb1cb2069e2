"""Shared test fixtures: the real material in ../shared (never copied into the repo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

SHARED = Path(os.environ.get("SKIPCONV_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands run in-process set torch's thread count; numerics (oneDNN blocking) depend on it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "native-tiles", "torch"])
def kernel(request, monkeypatch) -> str:
    """Runs a test with the sparse backend's C++ step (ungrouped convs recomputed as pixels), the C++ step
    with tiles only, and its PyTorch tile path."""
    from skipconv_cli.engine.backends import native

    monkeypatch.setenv("SKIPCONV_NATIVE", "0" if request.param == "torch" else "1")
    monkeypatch.setenv("SKIPCONV_PIXELS", "0" if request.param == "native-tiles" else "1")
    native.extension.cache_clear()
    yield request.param
    native.extension.cache_clear()


def _require(path: Path) -> Path:
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing: CI must run the tests that need ../shared")
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "weights")


@pytest.fixture(scope="session")
def videos_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "videos")


def read_frames(
    path: Path, count: int, start: int = 0, size: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """BGR uint8 frames [start, start + count) of a video, optionally resized to (width, height)."""
    cap = cv2.VideoCapture(str(path))
    if start:
        cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    frames = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if size else frame)
    cap.release()
    assert len(frames) == count, f"{path} gave {len(frames)} of {count} frames"
    return frames


def skipconv(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the real command line, as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "skipconv_cli.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture(scope="session")
def env(weights_dir: Path, videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment for CLI runs: the shared weights and clips, and an empty cache."""
    cache = tmp_path_factory.mktemp("cache")
    return os.environ | {
        "SKIPCONV_WEIGHTS": str(weights_dir),
        "SKIPCONV_SAMPLES": str(videos_dir),
        "SKIPCONV_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
    }
