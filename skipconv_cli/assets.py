"""Finding pretrained weights and sample videos: local folders first, then the cache, then a checked download.

Both kinds of asset go through one function, :func:`_resolve`, so weights and samples share the same order,
checksum policy and error messages:

1. a directory named by an environment variable (``$SKIPCONV_WEIGHTS`` / ``$SKIPCONV_SAMPLES``), so offline
   machines and CI can point at files they already have;
2. the user cache (``$SKIPCONV_CACHE/<kind>``, else ``$XDG_CACHE_HOME/skipconv/<kind>``, else
   ``~/.cache/skipconv/<kind>``);
3. a download from the public URL in the repository's manifest (``weights/manifest.json`` or
   ``samples/manifest.json``), written to a temporary name in the cache, checked for size and sha256, then
   renamed into place with ``os.replace`` so a crash or a bad file never leaves a half-written asset behind.

A file found locally is checked against the manifest's sha256 once per process (hashing a few MB each time a
model is built would be wasted work in tests and benchmarks).

The manifests live next to the package (editable install is the documented install); tests point
``$SKIPCONV_MANIFEST_DIR`` at a folder holding their own ``weights/`` and ``samples/`` manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from skipconv_cli.errors import SkipconvError

_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Kind:
    """What differs between weights and samples: folder name, env variable and the hint in error messages."""

    folder: str
    env_var: str
    hint: str


WEIGHTS = _Kind("weights", "SKIPCONV_WEIGHTS", "put the file in $SKIPCONV_WEIGHTS or pass --weights")
SAMPLES = _Kind("samples", "SKIPCONV_SAMPLES", "put the file in $SKIPCONV_SAMPLES or pass a video path")

# (resolved path, size, mtime_ns) -> sha256 hex: a file is hashed at most once per process.
_verified: dict[tuple[str, int, int], str] = {}


def manifest_dir() -> Path:
    """The folder that holds ``weights/manifest.json`` and ``samples/manifest.json``."""
    override = os.environ.get("SKIPCONV_MANIFEST_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1]


def load_manifest(kind: str) -> dict[str, dict]:
    """The manifest of ``kind`` ("weights"/"samples"): file name -> {url, sha256, size, license, source}."""
    path = manifest_dir() / kind / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SkipconvError(f"asset manifest {path} is missing; reinstall skipconv from its repo") from None
    except json.JSONDecodeError as e:
        raise SkipconvError(f"asset manifest {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise SkipconvError(f"asset manifest {path} must map file names to entries")
    return data


def cache_dir(kind: str) -> Path:
    """Where downloaded assets of ``kind`` are kept between runs."""
    root = os.environ.get("SKIPCONV_CACHE")
    if root:
        return Path(root).expanduser() / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "skipconv" / kind


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large files never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(file_name: str, explicit: Path | None = None) -> Path:
    """Path of a pretrained weights file, downloading it into the cache if needed.

    Args:
        file_name: the name in ``weights/manifest.json`` (e.g. ``"yolox_nano_416.onnx"``).
        explicit: a path the user passed (``--weights``). It must exist and is used as is, without a
            checksum: it may be the user's own fine-tuned file.

    Raises:
        SkipconvError: the explicit path is missing, a local copy fails its checksum, or the download fails.
    """
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise SkipconvError(f"weights file {explicit} does not exist")
        return explicit
    return _resolve(WEIGHTS, file_name)


def sample_names() -> dict[str, str]:
    """Short sample name -> file name, e.g. ``{"person": "one-by-one-person-detection.mp4", ...}``."""
    return {entry.get("name", Path(f).stem): f for f, entry in load_manifest(SAMPLES.folder).items()}


def resolve_sample(name: str) -> Path:
    """Path of a sample video named by its short name (``person``), file stem or file name.

    Accepts the ``sample:`` prefix of the CLI's input syntax, so ``resolve_sample("sample:cars")`` works too.
    """
    name = name.removeprefix("sample:")
    manifest = load_manifest(SAMPLES.folder)
    names = sample_names()
    if name in names:
        file_name = names[name]
    else:
        matches = [f for f in manifest if name in (f, Path(f).stem)]
        if not matches:
            known = ", ".join(sorted(names))
            raise SkipconvError(f"unknown sample {name!r}; samples: {known}")
        file_name = matches[0]
    return _resolve(SAMPLES, file_name)


def _resolve(kind: _Kind, file_name: str) -> Path:
    """The shared lookup: env folder → cache → download; every copy is checked against the manifest."""
    entry = load_manifest(kind.folder).get(file_name)
    env_dir = os.environ.get(kind.env_var)
    candidates = [Path(env_dir).expanduser() / file_name] if env_dir else []
    cache = cache_dir(kind.folder)
    candidates.append(cache / file_name)
    for path in candidates:
        if path.is_file():
            if entry is not None:
                _check_local(path, entry["sha256"])
            return path
    if entry is None:
        raise SkipconvError(f"{file_name} is not in the {kind.folder} manifest nor on disk; {kind.hint}")
    if not entry.get("url"):
        raise SkipconvError(f"{file_name} has no public download URL; {kind.hint}")
    return _download(entry["url"], cache / file_name, entry["sha256"], entry.get("size"), kind.hint)


def _check_local(path: Path, expected: str) -> None:
    """Raise if ``path`` does not hash to ``expected``; remembers good files for the rest of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    actual = _verified.get(key) or sha256_file(path)
    if actual != expected:
        raise SkipconvError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
            "delete or replace the file"
        )
    _verified[key] = actual


def _download(url: str, dest: Path, expected_sha: str, expected_size: int | None, hint: str) -> Path:
    """Download ``url`` to ``dest`` atomically: temp file in the same folder, size + sha256 check, rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or expected_size
                    _copy_with_progress(resp, out, h, total, dest.name)
            except urllib.error.HTTPError as e:
                cause = f"HTTP {e.code} {e.reason}"
                raise SkipconvError(f"could not download {dest.name} from {url}: {cause}; {hint}") from e
            except (urllib.error.URLError, OSError) as e:
                cause = getattr(e, "reason", None) or e
                raise SkipconvError(f"could not download {dest.name} from {url}: {cause}; {hint}") from e
        size = tmp.stat().st_size
        if expected_size is not None and size != expected_size:
            raise SkipconvError(
                f"download of {dest.name} from {url} is incomplete or wrong: "
                f"{size} bytes, expected {expected_size}"
            )
        actual = h.hexdigest()
        if actual != expected_sha:
            raise SkipconvError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 {expected_sha}, "
                f"got {actual}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    st = dest.stat()
    _verified[(str(dest.resolve()), st.st_size, st.st_mtime_ns)] = expected_sha
    return dest


def _copy_with_progress(resp: IO[bytes], out: IO[bytes], h: Any, total: int | None, label: str) -> None:
    """Stream the response into ``out`` and the hash, with a rich progress bar on a terminal.

    When stderr is not a terminal (CI logs, pipes) one line is printed instead of a bar that would not redraw.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        print(f"downloading {label} ...", file=sys.stderr, flush=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"downloading {label}", total=total)
        while chunk := resp.read(_CHUNK):
            out.write(chunk)
            h.update(chunk)
            progress.advance(task, len(chunk))
