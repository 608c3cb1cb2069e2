"""Micro-benchmark: one Skip-Conv layer, sparse backend against dense oneDNN, at fixed active fractions.

For each representative layer and each fraction of active 8x8 output blocks, prints the median time of
- ``dense``: ``F.conv2d`` on an NCHW input (what an unconverted model runs) and on a channels_last input
  (oneDNN's fast layout; the fair baseline),
- ``tiles``: the sparse backend's gather -> batched conv -> scatter alone,
- ``layer``: a whole sparse-backend frame of a ``SkipConv2d`` (residual, gate, owner mapping, reference
  update, tiles, bookkeeping, output copy), with the dense fallback disabled (``crossover=1``) and with the
  auto-tuned crossover (``auto``), and the reference backend's frame for comparison,
and the speed-up of ``layer``/``auto`` over the channels_last dense conv.

Run: ``python bench/layers.py [--threads 2] [--repeats 15] [--clock wall|thread]``. Timings on a shared
machine are noisy: the medians of ``--repeats`` runs are reported. When other processes load the CPU, two
threads wait on each other's time slices and wall times jump in multiples of the scheduler tick; then
``--threads 1 --clock thread`` (CPU time of this thread only) gives the cost that does not depend on load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skipconv_cli.engine import SkipConv2d
from skipconv_cli.engine.backends import sparse

BLOCK = 8
FRACTIONS = (0.05, 0.10, 0.25, 0.50)


@dataclass(frozen=True)
class LayerSpec:
    name: str
    cin: int
    cout: int
    kernel: int
    size: tuple[int, int]
    stride: int = 1
    groups: int = 1


LAYERS = (
    LayerSpec("3x3 C32 184x216", 32, 32, 3, (184, 216)),
    LayerSpec("3x3/2 C32->64 184x216", 32, 64, 3, (184, 216), stride=2),
    LayerSpec("1x1 C96->24 92x108", 96, 24, 1, (92, 108)),
    LayerSpec("1x1 C24->144 92x108", 24, 144, 1, (92, 108)),
    LayerSpec("dw3x3 C144 92x108", 144, 144, 3, (92, 108), groups=144),
    LayerSpec("3x3 C256 48x48", 256, 256, 3, (48, 48)),
)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def make_layer(spec: LayerSpec, backend: str, crossover: float | None) -> SkipConv2d:
    conv = nn.Conv2d(spec.cin, spec.cout, spec.kernel, spec.stride, spec.kernel // 2, groups=spec.groups)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight, std=0.1)
    layer = SkipConv2d.from_conv(conv, gate="input-norm", threshold=0.0, block=BLOCK, backend=backend)
    layer.crossover = crossover
    return layer.eval()


def frames_pair(layer: SkipConv2d, spec: LayerSpec, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames that differ exactly on the inputs owned by a random ``fraction`` of the output blocks."""
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(1, spec.cin, *spec.size, generator=generator)
    out_hw = [(n + 2 * (spec.kernel // 2) - spec.kernel) // spec.stride + 1 for n in spec.size]
    blocks = [-(-n // BLOCK) for n in out_hw]
    count = max(1, round(fraction * blocks[0] * blocks[1]))
    chosen = torch.randperm(blocks[0] * blocks[1], generator=generator)[:count]
    gate = torch.zeros(blocks[0] * blocks[1], dtype=torch.bool)
    gate[chosen] = True
    gate = gate.view(1, 1, *blocks).repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
    gate = gate[..., : out_hw[0], : out_hw[1]]
    # change only inputs that no output outside the chosen blocks reads, so exactly those blocks fire
    ones = torch.ones(1, 1, spec.kernel, spec.kernel)
    read_outside = F.conv_transpose2d(
        (~gate).float(), ones, stride=spec.stride, padding=spec.kernel // 2,
        output_padding=spec.size[0] - ((out_hw[0] - 1) * spec.stride - 2 * (spec.kernel // 2) + spec.kernel),
    )  # fmt: skip
    if read_outside.shape[-1] != spec.size[1]:
        raise ValueError(f"{spec.name}: unsupported geometry for the benchmark")
    changes = (read_outside == 0) & layer._owned_inputs(gate, torch.Size(spec.size))
    b = a + changes * (0.5 + torch.rand(a.shape, generator=generator))
    return a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)


def layer_ms(layer: SkipConv2d, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """A skip frame, alternating a/b so that the same blocks change on every frame."""
    layer.reset()
    layer(a)
    state = {"next": b}

    def step() -> None:
        x = state["next"]
        layer(x)
        state["next"] = a if x is b else b

    step()  # tuning (if any) happens on the first skip frame
    return median_ms(step, repeats)


def dense_conv(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    """What the unconverted layer runs: oneDNN's dense convolution."""
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def tiles_ms(layer: SkipConv2d, a: torch.Tensor, fraction: float, repeats: int) -> float:
    layer.reset()
    layer(a)
    plan = layer._sparse_state.plan
    total = plan.tiles_per_sample
    count = max(1, round(fraction * total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(2))[:count]
    tiles_x = len(plan.cols.starts)
    tiles = torch.stack([torch.zeros_like(chosen), chosen // tiles_x, chosen % tiles_x], 1)
    return median_ms(lambda: sparse.recompute_tiles(layer, layer._sparse_state, tiles), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SKIPCONV_CACHE", tempfile.mkdtemp(prefix="skipconv-bench-"))
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, block {BLOCK}, median of {args.repeats} runs")
    print(f"times in ms ({args.clock} clock); x dense = dense / layer, x auto = dense / auto")
    header = (
        f"{'layer':24} {'active':>6} {'nchw':>7} {'dense':>7} {'tiles':>7} {'layer':>7} {'auto':>7} "
        f"{'ref':>7} {'x dense':>8} {'x auto':>7}"
    )
    print(header + "\n" + "-" * len(header))
    with torch.no_grad():
        for spec in LAYERS:
            sparse_layer = make_layer(spec, "sparse", crossover=1.0)
            auto_layer = make_layer(spec, "sparse", crossover=None)
            reference = make_layer(spec, "reference", crossover=None)
            x = torch.rand(1, spec.cin, *spec.size)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            nchw = median_ms(lambda x=x, layer=sparse_layer: dense_conv(layer, x), args.repeats)
            dense = median_ms(lambda x=x_cl, layer=sparse_layer: dense_conv(layer, x), args.repeats)
            for fraction in FRACTIONS:
                a, b = frames_pair(sparse_layer, spec, fraction)
                tiles = tiles_ms(sparse_layer, a, fraction, args.repeats)
                full = layer_ms(sparse_layer, a, b, args.repeats)
                auto = layer_ms(auto_layer, a, b, args.repeats)
                ref = layer_ms(reference, a, b, args.repeats)
                print(
                    f"{spec.name:24} {fraction:>6.0%} {nchw:7.2f} {dense:7.2f} {tiles:7.2f} {full:7.2f} "
                    f"{auto:7.2f} {ref:7.2f} {dense / full:8.2f} {dense / auto:7.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
