"""The C++ kernel also compiles for CPUs other than x86 (ARM servers, Apple silicon): there it runs its plain
loops and at::mm, where a build that failed would fall back to the much slower PyTorch tile path. CI runs on
x86 only, so the non-x86 branch is compiled here with the x86 one switched off."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from skipconv_cli.engine.backends import native


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (the kernel is not built either)")
def test_the_kernel_compiles_without_its_x86_code(tmp_path: Path) -> None:
    source = native.SOURCE.read_text()
    assert source.count("#if defined(__x86_64__)") >= 2, "the x86 parts this test switches off"
    portable = tmp_path / "skip_step_portable.cpp"
    portable.write_text(source.replace("#if defined(__x86_64__)", "#if 0"))
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}"
    ]
    result = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=portable", *includes, str(portable)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
