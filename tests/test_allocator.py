"""Freed maps stay in the process: a model run frame after frame does not page-fault its activations anew."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Builds the pipeline's dense baseline of yolox-nano in a fresh process (the allocator's thresholds move
# with what a process freed before) and counts page faults per frame on frames of the cars clip, in batches
# of the given size (a batch of 24 has maps over 32 MB, more than glibc's largest mmap threshold).
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
batch = int(sys.argv[2])
frames = [loaded.spec.preprocess(f, (416, 416))[0] for f in open_source("sample:cars", max_frames=8)]
frames = [torch.cat([frame] * batch) for frame in frames]
faults = []
with torch.no_grad():
    for index, x in enumerate(frames):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        if index >= 3:  # after the first frames' one-off allocations
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_frame(env: dict, how: str, batch: int) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_FRAME, how, str(batch)],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)
@pytest.mark.parametrize("batch", [1, 24])
def test_pipeline_models_do_not_page_fault_their_maps_every_frame(env: dict, batch: int) -> None:
    pipeline = faults_per_frame(env, "pipeline", batch)
    engine_only = faults_per_frame(env, "engine", batch)  # (batch 24: ~16,000-48,000 a frame here)
    # a 416x416 yolox-nano frame allocates ~15 MB of maps, ~3,700 pages: over five frames, less than a third
    # of one frame's (the heap grows now and then: one frame took 338 faults once)
    assert sum(pipeline) < 1000 * batch, f"pipeline {pipeline}, allocator as it was {engine_only}"
