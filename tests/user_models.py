"""A user's own model, as `--model tests.user_models:person_detector` imports it: built and loaded in the
user's code, with outputs in the built-in YOLOX format."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from skipconv_cli.models.yolox import build_light_person, load_light_person_weights


def person_detector() -> nn.Module:
    model = build_light_person()
    load_light_person_weights(model, Path(os.environ["SKIPCONV_WEIGHTS"]) / "light_person_detector.onnx")
    return model.eval()
