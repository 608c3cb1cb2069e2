"""Registry of built-in models: thin entrypoints plus one config per model (timm's pattern).

A model is an ``nn.Module`` whose ``forward`` takes a float tensor [N, 3, H, W] (already preprocessed) and
returns raw head outputs; decoding, NMS and grouping live outside ``forward`` in the spec's ``postprocess``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from skipconv_cli.errors import SkipconvError

Task = Literal["detect", "pose"]


@dataclass(frozen=True)
class Letterbox:
    """How a frame was mapped onto the network input: input = frame * scale + (pad_x, pad_y).

    ``input_size`` is kept because decoding needs the feature-map grid, which the raw outputs alone do not fix
    for non-square inputs (a 13x26 grid and a 26x13 grid have the same number of anchors).
    """

    scale: float
    pad_x: float
    pad_y: float
    frame_size: tuple[int, int]  # (height, width) of the original frame
    input_size: tuple[int, int]  # (height, width) of the network input


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to run one built-in model.

    Attributes:
        name: registry name, e.g. ``"yolox-nano"``.
        task: ``"detect"`` or ``"pose"``.
        input_size: default (height, width); the architecture accepts any multiple of 32.
        build: returns the architecture with random weights.
        weights: file name in ``weights/manifest.json`` (None: no public weights).
        load_weights: copies a published file's tensors into the module built by ``build``.
        preprocess: (BGR uint8 frame, (height, width)) -> (float tensor [1, 3, H, W], Letterbox).
        postprocess: (raw outputs of forward for one sample, Letterbox, score threshold) -> predictions
            dict for one frame: ``{"boxes": [[x1, y1, x2, y2, score, class], ...]}`` or
            ``{"persons": [{"keypoints": [[x, y, score] x 18], "score": s}, ...]}``, frame pixels.
        labels: class or keypoint names.
        license, source: for ``skipconv models``.
    """

    name: str
    task: Task
    input_size: tuple[int, int]
    build: Callable[[], nn.Module]
    preprocess: Callable[[np.ndarray, tuple[int, int]], tuple[torch.Tensor, Letterbox]]
    postprocess: Callable[[Any, Letterbox, float], dict]
    weights: str | None = None
    load_weights: Callable[[nn.Module, Path], None] | None = None
    labels: tuple[str, ...] = ()
    license: str = ""
    source: str = ""
    default_score_threshold: float = 0.3
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    _import_builtins()
    return list(_REGISTRY.values())


def get_model_spec(name: str) -> ModelSpec:
    _import_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise SkipconvError(f"unknown model {name!r}; built-in models: {known}") from None


def _import_builtins() -> None:
    # Model modules register themselves on import.
    from skipconv_cli.models import builtins  # noqa: F401
