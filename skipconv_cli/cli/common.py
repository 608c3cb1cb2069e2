"""Setting a model up from the shared options: one place for what run, profile and calibrate share."""

from __future__ import annotations

from pathlib import Path

import torch

from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.factory import LoadedModel, create_model, resolve_spec
from skipconv_cli.pipeline.calibration import load_calibration
from skipconv_cli.pipeline.runner import SkipSettings


def load_model(model: str | None, task: str | None, weights: Path | None) -> LoadedModel:
    return create_model(resolve_spec(model, task), weights)


def torch_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SkipconvError(f"--device must be cpu or cuda; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SkipconvError("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def prepare_backend(settings: SkipSettings) -> None:
    """Loads the sparse backend's C++ kernel behind a spinner: on first use it is compiled (~35 s here),
    which a run would otherwise spend silent at its first frame."""
    if settings.backend_used != "sparse":
        return
    from rich.console import Console

    from skipconv_cli.engine.backends import native

    message = "loading the sparse backend's C++ kernel (compiled on first use, ~35 s)"
    with Console(stderr=True).status(message):
        native.extension()


def settings_from_options(
    loaded: LoadedModel,
    gate: str,
    threshold: float,
    block: int,
    reset_every: int | None,
    calibration: Path | None,
    dense: bool = False,
    backend: str = "sparse",
    gates: Path | None = None,
) -> SkipSettings:
    """The conversion settings; a calibration file brings its own gate, block and per-layer thresholds.

    A gates file (``--gates``) implies the Gumbel gate and must match the model, weights and block. With
    ``--gate gumbel`` and no file, the gates shipped for a built-in model are used when they match;
    otherwise the gates are untrained (open everywhere: exact, no saving).
    """
    thresholds: float | dict[str, float] = threshold
    if gates is not None:
        if calibration is not None:
            raise SkipconvError("--gates and --calibration exclude each other: gates decide by themselves")
        from skipconv_cli.pipeline.gates_file import load_gates

        load_gates(gates).check_matches(loaded.name, loaded.weights_sha256, block)
        gate = "gumbel"
    elif gate == "gumbel" and calibration is None:
        gates = _matching_shipped_gates(loaded, block)
    if calibration is not None:
        found = load_calibration(calibration)
        layer_names = [name for name, m in loaded.module.named_modules() if type(m) is torch.nn.Conv2d]
        found.check_matches(loaded.name, loaded.weights_sha256, layer_names)
        gate, block = found.gate, found.block
        thresholds = {name: found.thresholds.get(name, found.threshold) for name in layer_names}
    return SkipSettings(
        gate=gate,
        threshold=thresholds,
        block=block,
        reset_every=reset_every,
        dense=dense,
        backend=backend,
        gates=gates,
    )


def _matching_shipped_gates(loaded: LoadedModel, block: int) -> Path | None:
    from skipconv_cli.pipeline.gates_file import load_gates, shipped_gates

    path = shipped_gates(loaded.name)
    if path is None:
        return None
    found = load_gates(path)
    if (found.model, found.weights_sha256, found.block) != (loaded.name, loaded.weights_sha256, block):
        return None
    return path
