"""Freed maps stay in the process: a model run frame after frame does not page-fault its activations anew."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Builds the pipeline's dense baseline of yolox-nano in a fresh process (the allocator's thresholds move
# with what a process freed before) and counts page faults per frame on frames of the cars clip.
FAULTS_PER_FRAME = """
import json, resource, sys, torch
from skipconv_cli.models.factory import create_model, resolve_spec
from skipconv_cli.pipeline.runner import dense_baseline
from skipconv_cli.pipeline.video import open_source
from skipconv_cli.engine import fold_batchnorms, fuse_activations, use_onednn

torch.set_num_threads(2)
loaded = create_model(resolve_spec("yolox-nano", None))
if sys.argv[1] == "pipeline":
    model = dense_baseline(loaded)
else:  # the same model built from the engine alone, the allocator left as it is
    model = use_onednn(fuse_activations(fold_batchnorms(loaded.module))).eval()
frames = [loaded.spec.preprocess(f, (416, 416))[0] for f in open_source("sample:cars", max_frames=8)]
faults = []
with torch.no_grad():
    for index, x in enumerate(frames):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        if index >= 3:  # after the first frames' one-off allocations
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_frame(env: dict, how: str) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_FRAME, how],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)
def test_pipeline_models_do_not_page_fault_their_maps_every_frame(env: dict) -> None:
    pipeline = faults_per_frame(env, "pipeline")
    engine_only = faults_per_frame(env, "engine")  # (on these machines ~700-3,000 a frame)
    # a 416x416 yolox-nano frame allocates ~15 MB of maps: ~3,700 faults if every page came in anew
    assert max(pipeline) < 100, f"pipeline {pipeline}, allocator as it was {engine_only}"
