"""The sparse backend's CPU kernel: one C++ call per layer and frame (``skip_step.cpp``).

Why native code: with the pure-PyTorch tile path, a layer's frame took ~40 small tensor operations (residual,
|r| channel sum, box filter, block max, owner mapping, footprint, index arithmetic, gather, scatter). At a few
microseconds of dispatch each, that upkeep cost more than oneDNN's whole dense convolution of the small and
depthwise layers that fill mobile networks, so skipping lost even where most of the map was still. The C++
step walks each map once for the residual norm, works on one-byte maps for the gate and the footprint, copies
contiguous channels_last rows for the reference update, the gather and the write-back, and leaves the
arithmetic of the tiles to oneDNN (``at::conv2d`` on the stack of tiles); the output pixels to write are
multiplied by its own vector kernels on x86 CPUs with AVX-512 or AVX2 (``vector_width``), else by ``at::mm``
over their gathered receptive fields. It compiles for other CPUs too (plain loops there). The same
extension holds the sums and upsampling that follow the sparsity between layers (``engine.elementwise``).

The extension is compiled on first use with the machine's C++ compiler (``torch.utils.cpp_extension``; about
30 s, then cached by PyTorch). Where that fails (no compiler), or for what the kernel does not cover
(CUDA, float64, non-zero padding modes, a Gumbel gate in training), the layer runs the pure-PyTorch tile
path of ``sparse.py``; ``SKIPCONV_NATIVE=0`` forces that path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("skip_step.cpp")
PATH_IDLE, PATH_TILES, PATH_DENSE = 0, 1, 2  # what skip_step returns (3: a forced, timing-only step)


@functools.cache
def extension() -> Any | None:
    """The compiled kernel module, or None where it cannot be built (then the PyTorch path runs)."""
    if os.environ.get("SKIPCONV_NATIVE", "1") == "0":
        return None
    try:
        # the source's hash in the name: an edited kernel is rebuilt, never mixed up with an old build
        return build(SOURCE, f"skipconv_skip_step_{source_digest()}")
    except Exception as error:  # no compiler, no headers, no ninja: the PyTorch path still works
        warnings.warn(
            f"skipconv: the native CPU kernel could not be built ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); using the slower PyTorch tile path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build(source: Path, name: str) -> Any:
    """``source`` compiled and loaded as module ``name``, as the kernel is (``bench/ab_kernel.py`` builds a
    variant next to it this way)."""
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    flags = {"extra_cflags": ["-O3", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}
    return load(name=name, sources=[str(source)], verbose=False, **flags)


@functools.cache
def source_digest(source: Path = SOURCE) -> str:
    """A short hash of the kernel's source (or of a variant's, ``bench/ab_kernel.py``): names its build, and
    keys what was measured with it."""
    return hashlib.sha1(source.read_bytes()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch builds with ninja; the ``ninja`` package ships the binary, which may not be on PATH (a venv
    that was never activated)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def mean_abs(map: torch.Tensor) -> torch.Tensor:
    """The mean |value| of each sample, shaped [N, 1, ...] to broadcast against the map (a layer's output
    scale): one read in C++ for a dense CPU float32 map, else ``abs().mean()``."""
    dims = tuple(range(1, map.dim()))
    dense = map.is_contiguous() or (map.dim() == 4 and map.is_contiguous(memory_format=torch.channels_last))
    if map.device.type == "cpu" and map.dtype == torch.float32 and dense and map.numel() > 0:
        kernel = extension()
        if kernel is not None:
            return kernel.mean_abs(map.detach()).view(-1, *(1 for _ in dims))
    return map.detach().abs().mean(dims, keepdim=True)


# the vector kernels of the C++ pixel path, by name (SKIPCONV_VECTOR): floats per register
VECTOR_WIDTHS = {"avx512": 16, "avx2": 8, "none": 0}


def vector_width() -> int:
    """Floats per register of the C++ pixel path's own kernels (its packed products, its depthwise pixels):
    16 on an x86 CPU with AVX-512, 8 with AVX2 and FMA, 0 without (``at::mm`` and loops compiled for the
    baseline ISA). ``SKIPCONV_VECTOR=avx2`` or ``none`` asks for less than the CPU has: the tests of the
    paths other CPUs take, and A/B runs."""
    asked = VECTOR_WIDTHS.get(os.environ.get("SKIPCONV_VECTOR", "avx512"), 16)
    return min(asked, _cpu_vector_width())


@functools.cache
def _cpu_vector_width() -> int:
    kernel = extension()
    return int(kernel.vector_width()) if kernel is not None else 0


def packs_weights() -> bool:
    """Whether the pixel path multiplies weight panels packed for its vector kernel (``vector_width``
    channels a panel); ``SKIPCONV_PACKED=0`` turns them off (``at::mm`` on the weight itself: A/B runs, and
    the tests of the path CPUs without those kernels take)."""
    return os.environ.get("SKIPCONV_PACKED", "1") != "0" and vector_width() > 0


def kernel_name() -> str:
    """What runs the sparse backend's CPU steps, for reports: the C++ kernel with its widest vector code
    (as ``SKIPCONV_VECTOR`` names it: "avx512", "avx2", "none"; ", at::mm" where its products are MKL's), or
    "torch" (no kernel built: the PyTorch tile path). Speedups differ by it: on one CPU, HRNet-w32 at 4.3x
    fewer MACs ran 27.6 ms a frame with avx512, 42.9 with avx2, 55.6 with at::mm."""
    if extension() is None:
        return "torch"
    name = {width: name for name, width in VECTOR_WIDTHS.items()}[vector_width()]
    return name if packs_weights() else f"{name}, at::mm"


def supports(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel covers this layer and input (else the PyTorch tile path runs)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.padding_mode == "zeros"
        and not (layer.gate is not None and layer.training)  # a Gumbel gate in training samples
        and extension() is not None
    )
