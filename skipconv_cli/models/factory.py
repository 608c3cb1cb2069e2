"""One way to get a ready model: a built-in name or a user's ``module:function``, with its weights."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skipconv_cli.assets import resolve_weights, sha256_file
from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.registry import ModelSpec, Task, get_model_spec, list_models

DEFAULT_MODELS: dict[str, str] = {"detect": "yolox-nano", "pose": "openpose-mbv2-14"}


@dataclass
class LoadedModel:
    """A model in eval mode with what the pipeline and the reports need to know about it."""

    spec: ModelSpec
    module: nn.Module
    weights_sha256: str | None  # None: random or user-built weights

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_spec(model: str | None, task: Task | None) -> ModelSpec:
    """The spec for ``--model`` / ``--task``; a ``module:function`` borrows the task's built-in format."""
    if task is not None and task not in DEFAULT_MODELS:
        raise SkipconvError(f"unknown task {task!r}; tasks: {', '.join(DEFAULT_MODELS)}")
    if model is None:
        return get_model_spec(DEFAULT_MODELS[task or "detect"])
    if ":" in model:
        if task is None:
            raise SkipconvError(f"--model {model} needs --task, to know which output format it follows")
        base = get_model_spec(DEFAULT_MODELS[task])
        return dataclasses.replace(
            base, name=model, build=_import_builder(model), weights=None, load_weights=None
        )
    spec = get_model_spec(model)
    if task is not None and spec.task != task:
        same_task = ", ".join(s.name for s in list_models() if s.task == task)
        raise SkipconvError(f"model {model!r} is a {spec.task} model, not {task}; {task} models: {same_task}")
    return spec


def create_model(spec: ModelSpec, weights: Path | None = None) -> LoadedModel:
    """Builds the architecture and loads its published weights (or ``weights``)."""
    module = spec.build()
    sha = None
    if weights is not None or spec.weights is not None:
        if spec.load_weights is None:
            raise SkipconvError(f"model {spec.name!r} cannot load a weights file")
        path = resolve_weights(spec.weights or "", explicit=weights)
        try:
            spec.load_weights(module, path)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SkipconvError(f"{path} does not hold weights for {spec.name}: {e}") from e
        sha = sha256_file(path)
    return LoadedModel(spec=spec, module=module.eval(), weights_sha256=sha)


def _import_builder(target: str):
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`: the user's own modules live where they run
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SkipconvError(f"cannot import {target!r}: {e}") from e

    def build() -> nn.Module:
        built = factory()
        if not isinstance(built, nn.Module):
            raise SkipconvError(f"{target} returned {type(built).__name__}, not a torch.nn.Module")
        return built

    return build


def count_macs(module: nn.Module, input_size: tuple[int, int]) -> int:
    """Dense multiply-accumulates of one frame (FLOPs / 2, as torch's flop counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(1, 3, *input_size))
    return counter.get_total_flops() // 2
