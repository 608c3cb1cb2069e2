"""Asset resolution: local folders, cache, checked downloads from a local HTTP server, the real manifests."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from skipconv_cli import assets
from skipconv_cli.errors import SkipconvError

REPO = Path(__file__).resolve().parents[1]


class _Server:
    """A static file server on 127.0.0.1 that counts the GET requests it answers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        serve = functools.partial(self.httpd.serve_forever, poll_interval=0.02)
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "www"
    root.mkdir()
    s = _Server(root)
    yield s
    s.close()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Test manifests and cache under tmp_path, no env folders, an empty verification memo."""
    manifests = tmp_path / "manifests"
    (manifests / "weights").mkdir(parents=True)
    (manifests / "samples").mkdir(parents=True)
    monkeypatch.setenv("SKIPCONV_MANIFEST_DIR", str(manifests))
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SKIPCONV_WEIGHTS", raising=False)
    monkeypatch.delenv("SKIPCONV_SAMPLES", raising=False)
    monkeypatch.setattr(assets, "_verified", {})
    return manifests


def _publish(server: _Server, manifests: Path, name: str, data: bytes, **override: object) -> dict:
    """Serve ``data`` as ``name`` and list it in the test weights manifest."""
    (server.root / name).write_bytes(data)
    entry = {
        "url": f"{server.url}/{name}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "license": "MIT",
        "source": "test",
        **override,
    }
    path = manifests / "weights" / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[name] = entry
    path.write_text(json.dumps(manifest))
    return entry


def _cache_files(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache" / "weights"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_is_checked_and_cached(server: _Server, isolated: Path, tmp_path: Path) -> None:
    data = os.urandom(2_500_000)  # more than one read chunk
    _publish(server, isolated, "net.onnx", data)

    path = assets.resolve_weights("net.onnx")
    assert path == tmp_path / "cache" / "weights" / "net.onnx"
    assert path.read_bytes() == data
    assert server.requests == ["/net.onnx"]
    assert _cache_files(tmp_path) == ["net.onnx"]  # no temp file left behind

    assert assets.resolve_weights("net.onnx") == path
    assets._verified.clear()  # a new process: the cached file is hashed again, still not downloaded
    assert assets.resolve_weights("net.onnx") == path
    assert server.requests == ["/net.onnx"]


def test_progress_without_terminal(
    server: _Server, isolated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    _publish(server, isolated, "a.bin", b"x" * 1000)
    assets.resolve_weights("a.bin")
    assert "downloading a.bin" in capsys.readouterr().err


def test_progress_bar_on_a_forced_terminal(
    server: _Server, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal and draws the bar
    _publish(server, isolated, "b.bin", b"y" * 3_000_000)
    assert assets.resolve_weights("b.bin").stat().st_size == 3_000_000


def test_wrong_checksum_leaves_nothing(server: _Server, isolated: Path, tmp_path: Path) -> None:
    _publish(server, isolated, "bad.onnx", b"real content", sha256="0" * 64)
    with pytest.raises(SkipconvError) as err:
        assets.resolve_weights("bad.onnx")
    msg = str(err.value)
    assert "bad.onnx" in msg and "0" * 64 in msg and hashlib.sha256(b"real content").hexdigest() in msg
    assert "\n" not in msg
    assert _cache_files(tmp_path) == []


def test_wrong_size_leaves_nothing(server: _Server, isolated: Path, tmp_path: Path) -> None:
    _publish(server, isolated, "short.onnx", b"12345", size=99)
    with pytest.raises(SkipconvError, match="short.onnx.*5 bytes, expected 99"):
        assets.resolve_weights("short.onnx")
    assert _cache_files(tmp_path) == []


def test_http_404_is_one_clear_error(server: _Server, isolated: Path, tmp_path: Path) -> None:
    _publish(server, isolated, "gone.onnx", b"abc")
    (server.root / "gone.onnx").unlink()
    with pytest.raises(SkipconvError) as err:
        assets.resolve_weights("gone.onnx")
    msg = str(err.value)
    assert msg.startswith("could not download gone.onnx from http://127.0.0.1")
    assert "404" in msg and "$SKIPCONV_WEIGHTS" in msg and "--weights" in msg
    assert err.value.__cause__ is not None
    assert _cache_files(tmp_path) == []


def test_offline_is_one_clear_error(isolated: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (isolated / "weights" / "manifest.json").write_text(
        json.dumps({"x.onnx": {"url": f"http://127.0.0.1:{port}/x.onnx", "sha256": "0" * 64, "size": 1}})
    )
    with pytest.raises(SkipconvError, match=r"could not download x.onnx from .*refused.*SKIPCONV_WEIGHTS"):
        assets.resolve_weights("x.onnx")


def test_no_public_url(isolated: Path) -> None:
    manifest = {"f32.onnx": {"url": None, "sha256": "0"}}
    (isolated / "weights" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SkipconvError, match="f32.onnx has no public download URL"):
        assets.resolve_weights("f32.onnx")


def test_unknown_file(isolated: Path) -> None:
    (isolated / "weights" / "manifest.json").write_text("{}")
    with pytest.raises(SkipconvError, match="nope.onnx is not in the weights manifest"):
        assets.resolve_weights("nope.onnx")


def test_explicit_path(tmp_path: Path) -> None:
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"fine-tuned")
    assert assets.resolve_weights("yolox_nano_416.onnx", explicit=mine) == mine
    with pytest.raises(SkipconvError, match="does not exist"):
        assets.resolve_weights("yolox_nano_416.onnx", explicit=tmp_path / "missing.onnx")


def test_env_folder_with_real_weights(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SKIPCONV_MANIFEST_DIR", raising=False)  # the real manifest
    monkeypatch.setenv("SKIPCONV_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_verified", {})
    calls: list[Path] = []
    real_sha = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: calls.append(p) or real_sha(p))

    path = assets.resolve_weights("yolox_nano_416.onnx")
    assert path == weights_dir / "yolox_nano_416.onnx"
    assert assets.resolve_weights("yolox_nano_416.onnx") == path
    assert len(calls) == 1  # verified once per process
    assert not (tmp_path / "cache").exists()  # nothing downloaded or copied


def test_corrupt_local_copy_names_both_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKIPCONV_MANIFEST_DIR", raising=False)
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "nanodet_m_320.onnx").write_bytes(b"not the model")
    monkeypatch.setenv("SKIPCONV_WEIGHTS", str(folder))
    with pytest.raises(SkipconvError) as err:
        assets.resolve_weights("nanodet_m_320.onnx")
    msg = str(err.value)
    assert "nanodet_m_320.onnx" in msg
    assert "88e9fb97a54bb0030127ad323a10f88b4531b6aa82617e7ef79e35ffcc9bb3e1" in msg
    assert hashlib.sha256(b"not the model").hexdigest() in msg


def test_samples_by_name_stem_and_file(
    videos_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SKIPCONV_MANIFEST_DIR", raising=False)
    monkeypatch.setenv("SKIPCONV_SAMPLES", str(videos_dir))
    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path / "cache"))
    expected = videos_dir / "car-detection.mp4"
    for name in ("cars", "sample:cars", "car-detection", "car-detection.mp4"):
        assert assets.resolve_sample(name) == expected
    assert set(assets.sample_names()) == {"person", "cars", "bottles", "asl", "bikes"}
    with pytest.raises(SkipconvError, match="unknown sample 'dogs'; samples: asl, bikes"):
        assets.resolve_sample("dogs")


def test_sample_download_uses_the_same_mechanism(server: _Server, isolated: Path, tmp_path: Path) -> None:
    (server.root / "clip.mp4").write_bytes(b"frames")
    entry = {"name": "clip", "url": f"{server.url}/clip.mp4", "sha256": hashlib.sha256(b"frames").hexdigest()}
    (isolated / "samples" / "manifest.json").write_text(json.dumps({"clip.mp4": entry}))
    assert assets.resolve_sample("clip") == tmp_path / "cache" / "samples" / "clip.mp4"


def _check_manifest(manifest: dict[str, dict], folder: Path) -> None:
    on_disk = {p.name for p in folder.iterdir() if p.is_file()}
    assert set(manifest) == on_disk
    for name, entry in manifest.items():
        path = folder / name
        assert entry["size"] == path.stat().st_size, name
        assert entry["sha256"] == assets.sha256_file(path), name
        assert entry["license"] and entry["source"], name
        url = entry["url"]
        assert url is None or url.startswith("https://raw.githubusercontent.com/"), name
        if url is not None:
            assert len(url.split("/")[5]) == 40, f"{name}: URL must pin a commit"


def test_real_weights_manifest_matches_shared(weights_dir: Path) -> None:
    manifest = json.loads((REPO / "weights" / "manifest.json").read_text())
    _check_manifest(manifest, weights_dir)
    no_url = sorted(n for n, e in manifest.items() if e["url"] is None)
    assert no_url == [f"tfpose_mobilenetv2_dm{d}_368x432_f32.onnx" for d in ("05", "10", "14")]
    assert all(manifest[n].get("note") for n in no_url)


def test_real_samples_manifest_matches_shared(videos_dir: Path) -> None:
    manifest = json.loads((REPO / "samples" / "manifest.json").read_text())
    _check_manifest(manifest, videos_dir)
    assert all(e["url"] for e in manifest.values())
