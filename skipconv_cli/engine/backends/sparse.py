"""Block-sparse execution of a Skip-Conv frame: gather active tiles, one batched conv, write back.

Why recompute instead of accumulating: the layer's invariant is ``z = W * x_ref + b`` at every output. So
after ``x_ref`` takes its new values, *any* output tile can simply be recomputed from the updated reference
input; outputs of the tile that did not change get the value they already had. That makes the sparse path
exact (no ``z += ...`` float accumulation, no bias bookkeeping) and lets a tile be larger than the set of
outputs that really changed (halo, border tiles) at no cost in accuracy.

State per layer (all on the input's device, channels_last so that a gathered pixel is ``C`` contiguous
floats and oneDNN/cuDNN get their preferred layout):
- ``x_pad``: the reference input, padded once as the conv pads it (zero borders stay zero; other padding
  modes are refreshed after each update), [N, C, H + 2p, W + 2p].
- ``z``: the output ``W * x_ref + b``, [N, C_out, H_out, W_out].

Per frame: residual and gate (shared with the reference backend, so both take the same decisions), the
owned inputs take their new value (``torch.where`` into ``x_pad``), then either
- sparse: the execution tiles (``tile`` x ``tile`` outputs, at least the gate's block) holding a gated
  output, each widened to the footprint of the inputs its outputs own, are gathered with their input halo
  from ``x_pad`` with one ``index_select``, convolved with padding 0 in one ``F.conv2d`` call, and written
  into ``z`` with one ``index_copy_``; or
- dense: ``z = conv(x_pad)`` when more tiles (pixel path: blocks) are active than the layer's measured
  crossover.
On the CPU one C++ call does all of that (``native.py``, ``skip_step.cpp``), and for ungrouped and depthwise
convs it recomputes the outputs to write one pixel each instead of tiles (``WeightLayouts``); elsewhere the
PyTorch ops below.

Which frames skip at all (auto-tuned layers): a layer whose gate alone costs about its convolution runs plain
convolutions with no state ("plain"); after a busy frame (dense recompute, or slower than the plain conv) a
layer runs 2, 8, 32, 64 plain frames before it tries again ("back-off"), its state left as it was.
The layer hands out ``z`` itself (``hand_out``): valid until its next frame, checked by version counter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from skipconv_cli.engine import onednn
from skipconv_cli.engine.activations import NONE as NO_ACTIVATION
from skipconv_cli.engine.activations import activate_
from skipconv_cli.engine.backends import native
from skipconv_cli.engine.gates import support_sum
from skipconv_cli.engine.macs import conv_macs, macs_per_output_position, norm_gate_macs

if TYPE_CHECKING:
    from skipconv_cli.engine.skip_conv import SkipConv2d

EXEC_TILE = 8  # execution tile (outputs per side) for k > 1 kernels when the gate's block is smaller
TUNE_FRACTIONS = (0.1, 0.3, 0.6)  # active-tile fractions timed by the auto-tuner
TUNE_MARGIN = 0.9  # run sparse only where it is predicted at least ~10% faster than dense
TUNE_REPEATS = 3
CROSSOVER_REPEATS = 5  # timed runs per point of a crossover, the shortest kept (see measure_crossover)
MEASUREMENT = 4  # how crossovers are measured: a new one is in the tuning key, so old caches are not read
# written before each timed run on the CPU, so that the run finds the layer's state and weights as it does
# inside the model, where every other layer ran in between (see _measured_time): 4x what the layer holds, at
# most this (larger than a core's L2)
EVICT_BYTES = 16 << 20
# a layer whose crossover is lower runs plain dense convolutions: no gate, no state (the gate alone costs
# about what its convolution does). On the pixel path a crossover counts blocks, and a block's written
# footprint is up to ~2x its outputs: 0.1 sent HRNet-w32 layers that pay on a calm scene to plain.
PLAIN_BELOW = 0.05
BACKOFF_LIMIT = 64  # at most this many plain frames after a frame that needed the dense recompute
BACKOFF_FIRST = 2  # plain frames after a first busy frame (a passing flash costs little skipping)
# the back-off grows this much per busy probe: on a moving camera (bikes.mp4, 200 frames) growing by 4
# instead of 2 probes 6 times instead of 8, each probe costing about two plain frames
BACKOFF_GROWTH = 4
# one back-off frame in this many times the plain convolution (``plain_frame``). What a back-off frame costs
# beyond the convolution is Python, paid at in-model prices (~3x what it costs hot): with every frame timed
# and the full input check (``input_unchanged``) on fresh maps, yolox-nano on the moving camera ran 5.9%
# slower than dense, 5.0% without (frames 10-200 of bikes.mp4, six A/B runs in one process, Xeon).
PLAIN_TIMED_EVERY = 4


# -- geometry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisPlan:
    """Execution tiles along one axis: tile j recomputes outputs [start_j, start_j + size)."""

    starts: tuple[int, ...]
    size: int  # outputs per tile
    patch: int  # padded input positions per tile (with the halo)
    stride: int


def axis_plan(
    in_size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int, tile: int
) -> AxisPlan:
    """Tiles of ``tile`` outputs, each widened to every output its gated outputs can change.

    An output in tile j owns some inputs (``owner_index``); when it fires those inputs change, and so do the
    outputs that read them (the footprint). The tile is the hull of that footprint, then all tiles get the
    largest size so that they stack into one batch; a tile that would run past the end is shifted back.
    Recomputing extra outputs is harmless: they get ``W * x_ref`` again.
    """
    from skipconv_cli.engine.skip_conv import owner_index  # avoid a cycle at import time

    owners = owner_index(in_size, out_size, kernel, stride, padding, dilation)
    reach = dilation * (kernel - 1)
    count = math.ceil(out_size / tile)
    lo = [j * tile for j in range(count)]
    hi = [min((j + 1) * tile, out_size) - 1 for j in range(count)]
    for q, owner in enumerate(owners):
        j = owner // tile
        first = max(0, math.ceil((q + padding - reach) / stride))
        last = min(out_size - 1, (q + padding) // stride)
        readers = [o for o in range(first, last + 1) if (q + padding - o * stride) % dilation == 0]
        if readers:
            lo[j], hi[j] = min(lo[j], readers[0]), max(hi[j], readers[-1])
    size = min(out_size, max(h - lo_ + 1 for lo_, h in zip(lo, hi, strict=True)))
    starts = tuple(min(lo_, out_size - size) for lo_ in lo)
    return AxisPlan(starts=starts, size=size, patch=(size - 1) * stride + reach + 1, stride=stride)


@dataclass
class Plan:
    """Index tables for one (layer geometry, input size, device): built once, reused every frame."""

    tile: int
    rows: AxisPlan
    cols: AxisPlan
    padded_hw: tuple[int, int]
    out_hw: tuple[int, int]
    in_row_offsets: torch.Tensor  # [tiles_y, patch_h]: flat offsets (row * W_pad) of each tile's rows
    in_cols: torch.Tensor  # [tiles_x, patch_w]
    out_row_offsets: torch.Tensor  # [tiles_y, size_h]: row * W_out
    out_cols: torch.Tensor  # [tiles_x, size_w]
    tile_rows: torch.Tensor  # first output row of each tile (the C++ step's tables)
    tile_cols: torch.Tensor

    @property
    def tiles_per_sample(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    @property
    def outputs_per_tile(self) -> int:
        return self.rows.size * self.cols.size


def execution_tile(layer: SkipConv2d) -> int:
    """1x1 kernels have no halo: run them at the gate's own granularity (pixels for block 1)."""
    if layer.kernel_size == (1, 1):
        return layer.block
    return max(layer.block, EXEC_TILE)


def build_plan(layer: SkipConv2d, in_hw: tuple[int, int], out_hw: tuple[int, int], device) -> Plan:
    """The layer's plan; layers of the same geometry share one (its tensors are only read)."""
    geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, execution_tile(layer))
    return _cached_plan(geometry, tuple(in_hw), tuple(out_hw), torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_plan(geometry: tuple, in_hw: tuple[int, int], out_hw: tuple[int, int], device) -> Plan:
    kernel, stride, padding, dilation, tile = geometry
    axes = [
        axis_plan(n_in, n_out, k, s, p, d, tile)
        for n_in, n_out, k, s, p, d in zip(in_hw, out_hw, kernel, stride, padding, dilation, strict=True)
    ]
    rows, cols = axes
    padded_hw = (in_hw[0] + 2 * padding[0], in_hw[1] + 2 * padding[1])

    def table(axis: AxisPlan, length: int, step: int, scale: int) -> torch.Tensor:
        starts = torch.tensor(axis.starts, dtype=torch.long, device=device) * step
        return (starts[:, None] + torch.arange(length, device=device)) * scale

    return Plan(
        tile=tile,
        rows=rows,
        cols=cols,
        padded_hw=padded_hw,
        out_hw=out_hw,
        in_row_offsets=table(rows, rows.patch, rows.stride, padded_hw[1]),
        in_cols=table(cols, cols.patch, cols.stride, 1),
        out_row_offsets=table(rows, rows.size, 1, out_hw[1]),
        out_cols=table(cols, cols.size, 1, 1),
        tile_rows=torch.tensor(rows.starts, dtype=torch.long),
        tile_cols=torch.tensor(cols.starts, dtype=torch.long),
    )


# -- state and frames ---------------------------------------------------------------------------------


@dataclass
class NativeMaps:
    """One-byte and one-channel maps of the C++ step, reused every frame, and its index tables."""

    gate: torch.Tensor  # uint8 [N, Hb, Wb]: the gate per block of the last frame
    mark: torch.Tensor  # uint8 [N, H_out, W_out]: 0 untouched, 1 recomputed, 2 recomputed and written
    r_abs: torch.Tensor  # float [N, H, W]: |x - x_ref| summed over channels
    owned: torch.Tensor  # uint8 [N, H, W]: inputs that took their new value
    # the step's arguments that do not change from frame to frame, looked up once (a frame's Python
    # overhead is paid by every layer: ~300 of them in HRNet-w32)
    layer_args: tuple = ()  # weight, bias, kernel, stride, padding, dilation, groups, activation
    plan_args: tuple = ()  # block, owner tables, tile tables, tile sizes
    gate_macs: int = 0  # per stream and frame
    outputs: int = 0  # output positions per stream
    source: tuple = ()  # what last_gate / last_computed read: ("native", self)
    thresholds: tuple | None = None  # (threshold, scale tensor, per-stream limits): recomputed on change
    # a learned (Gumbel) gate's weights on |r| per channel, read when the stream's state is laid out
    channel_weights: torch.Tensor | None = None
    # the weight as the pixel path reads it (see ``WeightLayouts``): set, the step recomputes output pixels
    # instead of tiles
    pixel_weight: torch.Tensor | None = None
    vectors: int = 0  # floats per register of the C++ kernels the step runs (``native.vector_width``)


class Revision:
    """How many times a layer's output ``z`` changed in place: the layer's output tensor carries it
    (``skipconv_revision``), so that the next layer can tell that its input has not changed since its
    last frame, or where it changed: ``marks`` (the C++ step's mark map, 2 where the last write wrote)
    describe revision ``marked`` (see ``writes_since_scan``)."""

    __slots__ = ("number", "marks", "marked")

    def __init__(self) -> None:
        self.number = 0
        self.marks: torch.Tensor | None = None
        self.marked = -1


def revision_of(t: torch.Tensor) -> Revision | None:
    return getattr(t, "skipconv_revision", None)


UNKNOWN_CHANGE = object()  # what ``change_since`` returns when a change is not known
Seen = tuple  # (tensor by weak reference, its revision number): see ``seen_now``


def seen_now(t: torch.Tensor) -> Seen | None:
    """What ``change_since`` needs to tell, later, how ``t`` changed from now; None when ``t`` has no
    revision. The tensor is held by weak reference: a layer in back-off would otherwise keep a replaced
    map alive."""
    revision = getattr(t, "skipconv_revision", None)  # (``revision_of`` inline: ~1000 calls a frame)
    return (weakref.ref(t), revision.number) if revision is not None else None


def change_since(t: torch.Tensor, seen: Seen | None) -> object:
    """How ``t`` changed since ``seen`` (``seen_now`` of a tensor then): None when it is that tensor,
    unchanged; the mark map of its one write since; ``UNKNOWN_CHANGE`` otherwise (another tensor, one
    without a revision, more writes, a write that kept no marks). The one check behind a layer's
    incremental scan (``writes_since_scan``), the early end of a back-off (``input_unchanged``) and the ops
    that follow the sparsity (``elementwise``)."""
    revision = getattr(t, "skipconv_revision", None)  # (``revision_of``, inline: see ``seen_now``)
    if seen is None or revision is None or t is not seen[0]():
        return UNKNOWN_CHANGE
    if revision.number == seen[1]:
        return None
    if revision.number == seen[1] + 1 and revision.marked == revision.number:
        return revision.marks
    return UNKNOWN_CHANGE


def state_without_stream(module: nn.Module) -> dict:
    """``module.__dict__`` as ``module.reset()`` leaves it, the module itself untouched: what a Skip-Conv
    layer or an op that follows the sparsity pickles (``torch.save`` of a whole model, ``copy.deepcopy``).
    The stream state refers to other modules' maps by weak reference, which cannot be pickled, and a copy
    starts a new stream anyway."""
    live = module.__dict__.copy()
    module.reset()
    fresh = module.__dict__.copy()
    module.__dict__.clear()
    module.__dict__.update(live)
    return fresh


@dataclass
class SparseState:
    x_pad: torch.Tensor
    x_ref: torch.Tensor  # the unpadded interior: a view into x_pad
    z: torch.Tensor
    plan: Plan
    # ``memory_key`` of the layer and its input, made once a stream (env reads and ~15 string parts): made
    # again by the tuning lookups, a stream's first skip frame took 14.2 ms (openpose-mbv2-14) and 16.7 ms
    # (HRNet-w32) instead of 8.9 and 9.1 (medians of 8 streams)
    key: str = ""
    crossover: float = 1.0  # fraction of active units (``units_per_sample``) above which dense is faster
    tuned: bool = False
    residual: torch.Tensor | None = None  # scratch buffer reused every frame (PyTorch path)
    maps: NativeMaps | None = None  # set when the C++ step runs this layer
    # After a frame that needed the dense recompute, the next ``plain_left`` frames run the plain dense
    # convolution with no gate and leave the state alone: it stays a valid state (z = W * x_ref + b), only
    # older, so the next skip frame gates against it as usual, the change since then being pending.
    # ``backoff`` grows while the layer stays busy (moving camera, scene cut). (Keeping the plain frames'
    # tensors to copy them into the state was measured slower: the allocator could no longer reuse their
    # memory, and yolox-nano's elementwise ops ran ~20% slower.)
    backoff: int = 0
    plain_left: int = 0
    probing: bool = False  # the next skip frame is the first after plain frames (see ``judge``)
    plain_input: Seen | None = None  # the input at the last plain frame (``seen_now``)
    switch_taken: bool = False  # the last frame took the burst of the layer before going plain (``judge``)
    dense_seconds: float | None = None  # what the plain convolution takes here (CPU, auto-tuned layers)
    timed_seconds: float | None = None  # what it took when timed at tuning (``plain_seconds``)
    sparse_seconds: float | None = None  # the recent sparse frames' time, on average (see ``judge``)
    plain_forever: bool = False  # tuned so: the gate costs what the convolution does; no state is kept
    z_version: int | None = None  # z's version counter when it was handed out (see ``hand_out``)
    tile_batches: set[int] = field(default_factory=set)  # tile counts convolved so far (see ``judge``)
    revision: Revision = field(default_factory=Revision)  # of z (see ``Revision``)
    # (the input seen, the gate limits) at the last C++ step that left r_abs right for that input, and
    # whether that step was idle (see ``writes_since_scan``)
    scanned: tuple[Seen, torch.Tensor] | None = None
    last_idle: bool = False

    def __post_init__(self) -> None:
        if self.x_ref is not None:
            self.describe(self.x_ref, self.z)
            self.take_output(self.z)

    def take_output(self, z: torch.Tensor) -> None:
        """``z`` becomes the state's output: marked as state (``convert``'s output hook copies a model
        output that is a layer's state) and carrying the state's revision."""
        z.skipconv_state = True
        z.skipconv_revision = self.revision
        self.z = z

    def describe(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.input_key = (x.shape, x.dtype, x.device)
        self.inference = out.is_inference()
        # what a plain frame leaves for the overlays: every output computed
        self.dense_source = ("dense", (x.shape[0], tuple(out.shape[-2:]), x.device))

    @classmethod
    def plain(cls, x: torch.Tensor, out: torch.Tensor, crossover: float) -> SparseState:
        """The state of a layer already tuned to plain dense convolutions: nothing but its input's shape."""
        state = cls(x_pad=None, x_ref=None, z=None, plan=None, crossover=crossover, tuned=True)  # type: ignore[arg-type]
        state.plain_forever = True
        state.describe(x, out)
        return state

    def matches(self, x: torch.Tensor) -> bool:
        same = self.input_key == (x.shape, x.dtype, x.device)
        # state made under inference_mode cannot be updated in place outside it: start afresh
        return same and (not self.inference or torch.is_inference_mode_enabled())

    def go_plain(self) -> None:
        """From now on plain dense convolutions: the reference input, output and maps are released."""
        self.plain_forever = True
        self.x_pad = self.x_ref = self.z = self.residual = self.maps = None  # type: ignore[assignment]


def _pad(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    if layer.padding == (0, 0):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)


def _interior(layer: SkipConv2d, x_pad: torch.Tensor) -> torch.Tensor:
    ph, pw = layer.padding
    return x_pad[..., ph : x_pad.shape[-2] - ph, pw : x_pad.shape[-1] - pw]


def _conv(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's conv on an already padded input."""
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)


def activate(layer: SkipConv2d, t: torch.Tensor) -> torch.Tensor:
    """The layer's fused activation, in place (see ``engine.activations``)."""
    if layer.fused_activation is not None:
        activate_(t, layer.fused_activation)
    return t


def channels_last_weight(layer: SkipConv2d) -> None:
    """oneDNN reorders an NCHW weight on every call with a channels_last input: measured 3x slower convs
    on yolox-nano. The whole sparse path is channels_last, so the weight is too (same values)."""
    weight = layer.weight
    if weight.dim() == 4 and not weight.is_contiguous(memory_format=torch.channels_last):
        weight.data = weight.data.contiguous(memory_format=torch.channels_last)


def dense_frame(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    """First frame of a stream (or a reset): everything computed, state laid out for gathering."""
    channels_last_weight(layer)
    key = memory_key(layer, x)
    known = _MEMORY_CACHE.get(key, 1.0) if layer.crossover is None else 1.0
    if layer.always_plain:
        known = 0.0
    if known < PLAIN_BELOW:  # tuned to plain convolutions before (an earlier stream): no state to lay out
        out = plain_conv(layer, x)
        layer._sparse_state = SparseState.plain(x, out, known)
        layer._dense_bookkeeping(x, out, gated=False)
        layer._backend_counters["dense_frames"] += x.shape[0]
        layer._backend_counters["macs_run"] += x.shape[0] * conv_macs(layer, tuple(out.shape[-2:]))
        return out
    x_pad = _pad(layer, x.detach()).contiguous(memory_format=torch.channels_last)
    if x_pad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        # no padding and already channels_last: x_pad would alias x, which the caller still owns and
        # which other layers reading the same tensor would also store; the in-place reference updates
        # of one layer would then hide the change from the others
        x_pad = x_pad.clone(memory_format=torch.channels_last)
    z = _conv(layer, x_pad).contiguous(memory_format=torch.channels_last)
    layer._dense_bookkeeping(x, z)  # the output scale is the convolution's, before any activation
    activate(layer, z)
    plan = build_plan(layer, tuple(x.shape[-2:]), tuple(z.shape[-2:]), x.device)
    state = SparseState(x_pad=x_pad, x_ref=_interior(layer, x_pad), z=z, plan=plan, key=key)
    if native.supports(layer, x):
        state.maps = native_maps(layer, plan, x)
        record_taken_input(layer, state, x)
    layer._sparse_state = state
    layer._backend_counters["dense_frames"] += x.shape[0]
    layer._backend_counters["macs_run"] += x.shape[0] * dense_macs(layer, plan)
    return hand_out(layer, state)


def hand_out(layer: SkipConv2d, state: SparseState) -> torch.Tensor:
    """The layer's output is its state ``z`` itself, valid until the layer's next frame: a map-sized copy
    per layer and frame cost more than a whole depthwise convolution. A downstream op that writes into it
    bumps its version counter; the next frame then repairs ``z`` and the layer hands out copies from then
    on. (``convert`` turns in-place activation modules out-of-place and copies a model's own outputs when
    they are state, so a caller never holds one across frames.) Inference tensors have no version
    counter: they are always copied.
    """
    if layer.copy_outputs or state.z.is_inference():
        out = state.z.clone()
        if layer.fused_activation is not None:
            out.skipconv_activation = layer.fused_activation
        return out
    state.z_version = state.z._version
    return state.z


def repair_output(layer: SkipConv2d, state: SparseState) -> None:
    """``z`` was written into downstream: recompute it from the intact reference input (the invariant
    ``z = W * x_ref + b`` and the pending change survive), and hand out copies from now on."""
    state.z.copy_(activate(layer, _conv(layer, state.x_pad)))
    state.revision.number += 1
    layer.copy_outputs = True
    layer._backend_counters["macs_run"] += state.z.shape[0] * dense_macs(layer, state.plan)


def skip_frame(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    state = layer._sparse_state
    if not state.tuned:  # after the first dense frame, so that tuning runs on real data
        tune(layer, state, x)
    plain = plain_frame_if_due(layer, state, x)
    return plain if plain is not None else step_frame(layer, state, x)


def step_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> torch.Tensor:
    """A skip frame of a tuned layer whose frame is not plain."""
    if state.z_version is not None and state.z._version != state.z_version:
        repair_output(layer, state)
    maps = state.maps
    started = time.perf_counter()
    if maps is None:
        out, path, tiles = torch_skip_frame(layer, state, x)
    else:
        limits = gate_limits(layer, maps)
        since = writes_since_scan(state, x, limits) if state.scanned is not None else None
        if since is not None and since[0] == 0 and state.last_idle:
            # the same input as at an idle step, unchanged since, under the same limits: idle again, and the
            # C++ step's scan of input and reference (the whole cost of an idle frame) is not needed
            layer._native_bookkeeping(x.shape[0], maps, 0)
            count_frame(layer, state, native.PATH_IDLE, 0)
            state.backoff = 0
            return hand_out(layer, state)
        out, path, tiles = native_skip_frame(layer, state, x, since, limits)
    judge(layer, state, path, time.perf_counter() - started, tiles)
    return out


def writes_since_scan(
    state: SparseState, x: torch.Tensor, limits: torch.Tensor
) -> tuple[int, torch.Tensor | None] | None:
    """How the input changed since this layer's last C++ step, when that is known: (0, None) when it is
    the same output tensor of the layer before, unchanged; (1, marks) when that layer wrote into it once,
    where its mark map says; None otherwise (another tensor, new gate limits, more writes, no step).

    Known changes let the step scan incrementally: only the marked pixels' residual is recomputed and only
    the blocks they reach (and the last step's fired blocks) are gated again, the same gates as a full scan
    for a pass over a byte map; with no change after an idle step the frame is idle without any scan. The
    simplest sparsity that follows from layer to layer (conv -> fused activation -> conv links)."""
    seen, scanned_limits = state.scanned
    if limits is not scanned_limits:  # (the gate limits of this frame: ``gate_limits``)
        return None
    change = change_since(x, seen)
    if change is UNKNOWN_CHANGE:
        return None
    return (0, None) if change is None else (1, change)


def tune(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> None:
    state.crossover = layer.crossover if layer.crossover is not None else crossover_for(layer, state)
    state.tuned = True
    if layer.crossover is not None:
        return  # a fixed crossover pins the path: no plain frames, nothing timed
    if state.crossover < PLAIN_BELOW:
        state.go_plain()
        layer.__dict__.pop(WEIGHT_LAYOUTS, None)  # (nor the weight's copy, kept across streams otherwise)
    elif state.x_pad.device.type == "cpu":
        state.dense_seconds = state.timed_seconds = plain_seconds(layer, x, state.key)


def plain_seconds(layer: SkipConv2d, x: torch.Tensor, key: str | None = None) -> float:
    """What a plain frame takes here: timed once per process and layer geometry. Timing it on the first
    skip frame of every stream ran each convolution twice more there (HRNet-w32: that frame took 2.5x a
    dense frame); plain frames keep each stream's own estimate current from then on.

    It times the call plain frames make (``plain_conv`` on the unpadded input), three times: timing the
    convolution of the padded input once, oneDNN's one-off set-up for the plain frames' shape and a
    single slow run went into the estimate; yolox-nano's layers started at up to 5x their plain time
    (948 vs 186 us), judged their slower sparse frames as paying, and never ran the plain frames that
    would have corrected it."""
    key = key or memory_key(layer, x)
    if key not in _PLAIN_SECONDS:
        _PLAIN_SECONDS[key] = _measured_time(lambda: plain_conv(layer, x), x.device, layer=layer, warm=x)
    return _PLAIN_SECONDS[key]


def judge(layer: SkipConv2d, state: SparseState, path: int, seconds: float, tiles: int) -> None:
    """Backs off to plain frames after a busy frame: one that needed the dense recompute or, on the CPU,
    when the layer's sparse frames take longer than the plain convolution (measured at tuning and on plain
    frames), on average: an exponential average of their times, so that one slow frame (timing noise, a
    passing burst of motion) does not stop a layer whose other frames pay. Backing off after any slower
    frame cost openpose-mbv2-14 τ 0.3 1.17x → 1.10x and HRNet-w32 τ 0.583 1.79x → 1.74x (A/B, same frames)
    and gained nothing on the moving camera. The time rule also catches what the tuned crossover got
    wrong: it was measured once, on a machine that may have been busy then. Back-off grows while the layer
    stays busy and starts over after a cheap frame.

    On the tile path, the first frame with a given number of tiles is not timed against the plain
    convolution: oneDNN builds a kernel for each new batch size first (~0.3 ms, more than a whole small
    layer), and judging that one-off cost sent every layer of yolox-nano into back-off on its first skip
    frame.

    Nor is the first skip frame after a back-off (the probe): the state was taken anew on the frame before
    (``resync_frame``) with no record of where the input changed since, so its scan is a full one, which
    for a layer whose convolution costs about its scan is slower than the plain convolution every time.
    Judged, such a layer never came back from back-off, and the layers after it, reading its fresh output,
    scanned whole and backed off in turn: openpose-mbv2-14 ran at 1.3x (2.5x fewer MACs) or at 2.0x (6x)
    from one run to the next, whichever way its layers went first.

    Nor is a busy frame whose input switched from the state the layer before handed out to a fresh map:
    that layer went plain, and the burst of its pending change is taken once (``native_skip_frame``)
    instead of sending this layer into back-off, and the next one, down the network. openpose-mbv2-14
    τ 0.3, 6 A/B runs: 4.6-5.3x → 5.0-6.6x fewer MACs, 2.26x → 2.48x after 10 frames on average."""
    if layer.crossover is not None:  # a fixed crossover pins the path: no plain frames
        return
    probe, state.probing = state.probing, False
    if state.switch_taken:
        state.switch_taken = False
        return
    if probe and path != native.PATH_DENSE:
        return  # (the back-off stays as it is: the next frame is judged)
    too_slow = False
    if path == native.PATH_TILES and state.dense_seconds is not None:
        # (a matrix product builds no kernel per batch size)
        on_tiles = state.maps is None or state.maps.pixel_weight is None
        if on_tiles and tiles not in state.tile_batches:
            state.tile_batches.add(tiles)
        else:
            average = state.sparse_seconds
            average = seconds if average is None else 0.7 * average + 0.3 * seconds
            state.sparse_seconds = average
            too_slow = average > state.dense_seconds
    if path == native.PATH_DENSE or too_slow:
        state.backoff = min(BACKOFF_LIMIT, max(BACKOFF_FIRST, BACKOFF_GROWTH * state.backoff))
        state.plain_left = state.backoff
        state.sparse_seconds = None
    else:
        state.backoff = 0


def torch_skip_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The skip frame in PyTorch ops (any device): residual, gate, owned inputs, tiles or dense recompute."""
    plan = state.plan
    x_ref = state.x_ref
    # The residual goes into a buffer kept across frames: a fresh map-sized allocation per frame costs
    # page faults that were measured to take longer than the subtraction itself.
    if state.residual is None or state.residual.shape != x.shape:
        state.residual = torch.empty_like(x, memory_format=torch.channels_last)
    residual = torch.sub(x, x_ref, out=state.residual)
    # |r| in place: the same values as channel_abs_sum without a second map-sized tensor (every gate,
    # the learned one included, reads only |r|)
    abs_sum = residual.abs_().sum(1, keepdim=True)
    gate = layer._gate(residual, abs_sum)  # shared with the reference backend: the same decisions
    owned = layer._owned_inputs(gate, x.shape[-2:])

    active = F.max_pool2d(gate.to(x.dtype), plan.tile, plan.tile, ceil_mode=True)[:, 0] > 0
    tiles = active.nonzero()  # [K, 3]: (sample, tile row, tile col); the one host sync per frame
    count = tiles.shape[0]
    busy = count > state.crossover * plan.tiles_per_sample * x.shape[0]
    # a busy frame takes every input (and so computes every output), as the C++ step counts it
    layer._skip_bookkeeping(x, torch.ones_like(owned) if busy else owned, tuple(state.z.shape[-2:]))
    if busy:
        path = native.PATH_DENSE
    elif count:
        update_reference(layer, state, x, owned)
        refresh_borders(layer, state)
        # Only outputs whose support saw a changed input take the recomputed value. Elsewhere the
        # recomputation equals the stored z up to rounding, and writing that rounding noise would make the
        # next layer's residual non-zero there (the reference backend leaves those outputs bit-identical).
        changed = support_sum((owned & (abs_sum > 0)).to(x.dtype), layer) > 0
        recompute_tiles(layer, state, tiles, changed)
        state.revision.number += 1
        path = native.PATH_TILES
    else:
        path = native.PATH_IDLE
    count_frame(layer, state, path, count, count * plan.outputs_per_tile)
    out = busy_frame(layer, state, x) if path == native.PATH_DENSE else hand_out(layer, state)
    return out, path, count


def count_frame(layer: SkipConv2d, state: SparseState, path: int, tiles: int, outputs_run: int = 0) -> None:
    """Backend counters of a skip frame; ``outputs_run``: the output positions the convolution computed."""
    counters, n, plan = layer._backend_counters, state.z.shape[0], state.plan
    if path == native.PATH_DENSE:
        counters["dense_frames"] += n
        counters["macs_run"] += n * dense_macs(layer, plan)
    elif path == native.PATH_TILES:
        counters["sparse_frames"] += n
        counters["tiles"] += tiles
        counters["macs_run"] += outputs_run * macs_per_output_position(layer)
    else:
        counters["idle_frames"] += n


def plain_frame_if_due(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> torch.Tensor | None:
    """A plain frame when the layer is tuned plain or backing off, else None (``SkipConv2d.forward``
    calls this first: plain frames should cost what an ``nn.Conv2d`` call costs)."""
    if state.plain_forever:
        return plain_frame(layer, state, x)
    left = state.plain_left
    if left <= 0:
        return None
    if left == 1 or input_unchanged(state, x):
        state.plain_left = 0
        return resync_frame(layer, state, x)
    state.plain_left = left - 1
    # every few frames the estimate is refreshed (CUDA runs asynchronously: never)
    return plain_frame(layer, state, x, timed=left % PLAIN_TIMED_EVERY == 0 and x.is_cpu)


def input_unchanged(state: SparseState, x: torch.Tensor) -> bool:
    """Whether ``x`` is the tensor the back-off's last plain frame read, not written since: the layer before
    had nothing to do, the scene has calmed down, and the back-off ends early (the frame resyncs the
    state). A back-off grown long while a person walked (32-64 frames) otherwise kept HRNet-w32's layers
    on plain frames through the calm that followed, every layer before them idle."""
    seen = seen_now(x)
    if seen is None:  # a fresh map, the layer before ran plain: the common case, decided early
        state.plain_input = None
        return False
    last, state.plain_input = state.plain_input, seen
    return change_since(x, last) is None


def resync_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> torch.Tensor:
    """The last frame of a back-off: a plain frame whose input and output become the state, as on a busy
    frame (``take_frame``); the next frame, the first skip frame again (the probe, see ``judge``), then
    gates one frame's change.

    Left alone during the back-off, the state was as old as the back-off was long, and the probe gated
    all the change since then: on a static camera with a person walking, more than the crossover after a
    few frames, so the probe was busy, the back-off grew, and the next probe, older still, was busy again.
    Over 120 frames of the person clip, HRNet-w32's 32x32 layers ran ~100 plain frames each at τ 0.947
    (idle on 15-25 of the others)."""
    take_frame(layer, state, x)
    state.plain_input, state.probing = None, True
    layer._plain_bookkeeping(x.shape[0], state.dense_source)
    return hand_out(layer, state)


def plain_conv(layer: SkipConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's convolution, nothing else, in the layout of the whole sparse path.

    It runs on every plain frame of every plain layer, so it reads the parameters from ``_parameters``
    (``nn.Module.__getattr__`` costs ~0.5 us a lookup) and calls ``F.conv2d`` directly: with the lean
    bookkeeping, a model whose layers all run plain went from 5% slower than the dense model to 2%
    (yolox-nano, 416x416; a bare ``F.conv2d`` forward: 0.7%)."""
    x = x.contiguous(memory_format=torch.channels_last)
    params = layer._parameters
    if layer.padding_mode != "zeros":
        out = layer._conv_forward(x, params["weight"], params["bias"])
    else:
        weight, bias = params["weight"], params["bias"]
        out = onednn.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return activate(layer, out)


def plain_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor, timed: bool = False) -> torch.Tensor:
    """The plain dense convolution: no gate, the state left as it is (counted as a dense frame)."""
    if not timed:
        out = plain_conv(layer, x)
    else:  # keeps the estimate that ``judge`` compares skip frames with up to date
        started = time.perf_counter()
        out = plain_conv(layer, x)
        seconds = time.perf_counter() - started
        previous = state.dense_seconds
        average = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        # Slow plain frames (the VM, a page fault) must not raise the estimate past twice what it was timed
        # at: a layer whose estimate is too high judges its slower sparse frames as paying and never runs
        # the plain frames that would correct it (yolox-nano on the moving camera: a 1x1 layer estimated
        # at 883 us, 246 us real, ran 526 us sparse frames for the rest of the clip).
        state.dense_seconds = min(average, 2 * state.timed_seconds) if state.timed_seconds else average
    layer._plain_bookkeeping(x.shape[0], state.dense_source)
    return out


# -- the C++ step ---------------------------------------------------------------------------------------


def native_maps(layer: SkipConv2d, plan: Plan, x: torch.Tensor) -> NativeMaps:
    n, _, h, w = x.shape
    ho, wo = plan.out_hw
    block = layer.block
    rows, cols = layer._owner_tensors((h, w), (ho, wo), x.device)
    byte = {"dtype": torch.uint8, "device": x.device}
    maps = NativeMaps(
        gate=torch.zeros((n, -(-ho // block), -(-wo // block)), **byte),
        mark=torch.zeros((n, ho, wo), **byte),
        r_abs=torch.zeros((n, h, w), dtype=torch.float32, device=x.device),
        owned=torch.zeros((n, h, w), **byte),
        layer_args=(
            layer.weight, layer.bias, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, *(layer.fused_activation or (NO_ACTIVATION, 0.0, 0.0)),
        ),
        plan_args=(
            block, rows, cols, plan.tile_rows, plan.tile_cols, plan.tile, plan.rows.size, plan.cols.size
        ),
        gate_macs=norm_gate_macs(layer, (h, w), (ho, wo)),
        outputs=ho * wo,
    )  # fmt: skip
    if layer.gate is not None:
        maps.channel_weights = layer.gate.channel_log_weight.detach().exp().float().contiguous()
    layouts = weight_layouts(layer)
    maps.pixel_weight, maps.vectors = layouts.pixel_weight, layouts.vectors
    maps.source = ("native", maps)
    return maps


def pixel_path(layer: SkipConv2d) -> bool:
    """Whether the C++ step recomputes this layer's outputs as pixels (ungrouped and depthwise convs; else as
    tiles); ``SKIPCONV_PIXELS=0`` turns the pixel path off (A/B measurements)."""
    depthwise = layer.groups == layer.in_channels == layer.out_channels
    return (layer.groups == 1 or depthwise) and os.environ.get("SKIPCONV_PIXELS", "1") != "0"


@dataclass(frozen=True)
class WeightLayouts:
    """What the C++ step reads of the weight beyond the weight itself, derived once per weight and kept
    across streams and resets: laid out again on every stream's first frame, it cost yolox-nano's ~5 ms
    and HRNet-w32's ~70 ms (its 114 MB of weights copied).

    ``pixel_weight``: the weight as the pixel path reads it: for an ungrouped conv [C_out, kh * kw * C] (the
    channels_last weight itself) or, where the step multiplies packed panels (AVX-512 or AVX2), those
    (``packed_panels``, a copy); [kh * kw, C] for a depthwise one (a copy). There the outputs to write are
    recomputed one pixel each (their receptive fields times the weight in one matrix product; depthwise:
    tap rows times weights) instead of as tiles of a batched convolution. Measured on HRNet-w32's and the
    mobile models' ungrouped layers at 5-30% active outputs: 1.5-4x faster than the tiles, which cover
    whole 8x8 tiles for 4x4 blocks, convolve a halo, and run oneDNN on stacks of small patches. Other
    grouped convs keep the tiles (None).
    """

    key: tuple  # the weight's storage, version and the path: a changed weight is laid out again
    pixel_weight: torch.Tensor | None  # (see above)
    vectors: int  # the C++ kernels' register width in floats, the packed panels' (``native.vector_width``)
    mean_abs_weight: torch.Tensor  # ||W||_1 / its size, of the output-norm gate (``gate_limits``)


WEIGHT_LAYOUTS = "_weight_layouts"  # the layer's attribute that holds them


def weight_layouts(layer: SkipConv2d) -> WeightLayouts:
    weight = layer.weight
    pixels = pixel_path(layer)
    packed = pixels and layer.groups == 1 and native.packs_weights()
    vectors = native.vector_width()
    key = (weight.data_ptr(), weight._version, weight.device, pixels, packed, vectors)
    known = layer.__dict__.get(WEIGHT_LAYOUTS)
    if known is not None and known.key == key:
        return known
    with torch.no_grad():
        matrix = None
        if pixels:
            w = weight.detach().float()
            if layer.groups == 1:  # [C_out, kh * kw * C]: a view of the channels_last weight, no copy
                matrix = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
                if packed:
                    matrix = packed_panels(matrix, vectors)
            else:
                matrix = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0]).contiguous()
        mean_abs = weight.detach().abs().mean().clamp_min(1e-30)
    layouts = WeightLayouts(key, matrix, vectors, mean_abs)
    layer.__dict__[WEIGHT_LAYOUTS] = layouts
    return layouts


def packed_panels(matrix: torch.Tensor, panel: int) -> torch.Tensor:
    """[C_out, K] as the C++ step's packed product reads it: [ceil(C_out / panel), K, panel], the output
    channels beyond C_out zero (``panel``: the kernel's register width, 16 floats for AVX-512, 8 for AVX2)."""
    out_channels, k = matrix.shape
    panels = -(-out_channels // panel)
    padded = matrix.new_zeros(panels * panel, k)
    padded[:out_channels] = matrix
    return padded.view(panels, panel, k).transpose(1, 2).contiguous()


def weight_layout_bytes(layer: SkipConv2d) -> int:
    """Bytes of the weight's copy the pixel path reads (held for all streams, across resets; none where it
    reads the weight itself)."""
    layouts = layer.__dict__.get(WEIGHT_LAYOUTS)
    matrix = layouts.pixel_weight if layouts is not None else None
    if matrix is None or matrix.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr():
        return 0
    return matrix.untyped_storage().nbytes()


def gate_limits(layer: SkipConv2d, maps: NativeMaps) -> torch.Tensor:
    """Per-stream limits on the support norm of r: the gates of ``SkipConv2d._gate`` solved for it."""
    scale = layer._in_scale if layer.gate_type == "input-norm" else layer._out_scale
    # a learned gate: output-norm (with channel weights, applied by the step) at its learned threshold
    threshold = layer.threshold if layer.gate is None else math.exp(float(layer.gate.log_threshold))
    cached = maps.thresholds
    if cached is None or cached[0] != threshold or cached[1] is not scale:
        if layer.gate_type == "input-norm":
            limits = threshold * scale
        else:  # output-norm: mean|W| * support > threshold * mean|z|
            limits = threshold * scale / weight_layouts(layer).mean_abs_weight
        maps.thresholds = (threshold, scale, limits.reshape(-1).float().contiguous())
    return maps.thresholds[2]


def native_step(
    layer: SkipConv2d,
    state: SparseState,
    x: torch.Tensor,
    forced: torch.Tensor | None = None,
    incremental: bool = False,
    marks: torch.Tensor | None = None,
    limits: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """(active tiles, outputs computed as counted, path, output positions the convolution ran); ``limits``:
    ``gate_limits`` when the caller has them."""
    maps = state.maps
    limits = gate_limits(layer, maps) if limits is None else limits
    return native.extension().skip_step(
        x, state.x_pad, state.z, *maps.layer_args, limits, maps.channel_weights,
        *maps.plan_args,
        state.crossover, maps.gate, maps.mark, maps.r_abs, maps.owned, forced, incremental, marks,
        maps.pixel_weight, maps.vectors,
    )  # fmt: skip


def native_skip_frame(
    layer: SkipConv2d,
    state: SparseState,
    x: torch.Tensor,
    since: tuple | None = None,
    limits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """A skip frame in one C++ step (which takes ``x`` in any layout); ``since``: what ``writes_since_scan``
    knows of the input; ``limits``: ``gate_limits``, when the caller has them."""
    marks = since[1] if since is not None else None
    tiles, computed, path, outputs_run = native_step(
        layer, state, x, incremental=since is not None, marks=marks, limits=limits
    )
    own = state.revision
    if path == native.PATH_TILES:
        own.number += 1
    # the mark map now describes this step: the write of a tiles step, for the next layer's scan
    own.marks, own.marked = (state.maps.mark, own.number) if path == native.PATH_TILES else (None, -1)
    seen = seen_now(x)
    # the layer before handed out its state last frame and a fresh map now: it went plain, and its exact
    # output differs from the state it handed out by all the change its gates had left pending (not on the
    # probe after a back-off, whose record is the resync's: a busy probe backs off as it did before there
    # was one)
    switched = seen is None and state.scanned is not None and not state.probing
    scanned = (seen, state.maps.thresholds[2]) if seen is not None else None
    state.scanned = scanned if path != native.PATH_DENSE else None  # (a busy frame leaves r_abs stale)
    state.last_idle = path == native.PATH_IDLE
    layer._native_bookkeeping(x.shape[0], state.maps, computed)
    count_frame(layer, state, path, tiles, outputs_run)
    if path != native.PATH_DENSE:
        return hand_out(layer, state), path, tiles
    # a burst that is the layer before's is taken once, and skipping goes on from the exact input
    state.switch_taken = switched
    return busy_frame(layer, state, x, take=switched), path, tiles


def busy_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor, take: bool = False) -> torch.Tensor:
    """The output of a busy frame (more active units than the crossover): the plain convolution's.

    With an auto-tuned crossover a back-off follows (see ``judge``), whose last frame takes the state
    anew (``resync_frame``): the state is left as it is (valid, only older) and nothing is copied into it.
    A pinned crossover has no back-off, and a burst the layer before passed on (``take``) none is wanted:
    the layer takes the frame (``take_frame``)."""
    if layer.crossover is None and not take:
        return plain_conv(layer, x)
    take_frame(layer, state, x)
    return hand_out(layer, state)


def take_frame(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> None:
    """The layer takes the whole frame as its new reference and computes its output densely, as on a dense
    frame; the state stays exact (a busy frame with a pinned crossover or one that took the burst of the
    layer before going plain, the last frame of a back-off).

    Cheaper than a masked full recompute (updating only the gated inputs, then writing only the outputs
    they change), which cost 2-4x the plain convolution on yolox-nano's layers: here it is one input copy
    and the convolution, whose output becomes the state. Outputs no input change reached may differ from
    their old values by rounding; a downstream gate above 0 ignores such differences.
    """
    state.x_ref.copy_(x)
    refresh_borders(layer, state)
    z = activate(layer, _conv(layer, state.x_pad)).contiguous(memory_format=torch.channels_last)
    own = state.revision
    own.number += 1
    own.marks, own.marked = None, -1  # written whole
    record_taken_input(layer, state, x)
    state.take_output(z)


def record_taken_input(layer: SkipConv2d, state: SparseState, x: torch.Tensor) -> None:
    """After the layer took all of ``x`` as its reference (x_ref = x everywhere: no residual pending): the
    record an incremental scan starts from, when ``x`` carries a revision, so that the next frame scans only
    what the layer before wrote meanwhile. (The probe after a back-off and the first skip frame of a stream
    scanned their input whole: openpose-mbv2-14 τ 0.3 ran ~15 such scans a frame.) The gate map is left as
    the frame set it (a busy frame's: every block, what ``last_gate`` reports); the next step gates its
    blocks again, against a zero residual."""
    maps = state.maps
    if maps is None or revision_of(x) is None:
        state.scanned, state.last_idle = None, False  # (no record of where the input changed)
        return
    maps.r_abs.zero_()
    state.scanned, state.last_idle = (seen_now(x), gate_limits(layer, maps)), True


def refresh_borders(layer: SkipConv2d, state: SparseState) -> None:
    """After the reference input changed: borders of a non-zero padding mode mirror the interior."""
    if layer.padding_mode != "zeros" and layer.padding != (0, 0):
        state.x_pad.copy_(_pad(layer, state.x_ref))


def update_reference(layer: SkipConv2d, state: SparseState, x: torch.Tensor, owned: torch.Tensor) -> None:
    """x_ref takes the new value at the owned pixels (bit-exact, like ``torch.where`` in the reference).

    A channels_last input is copied pixel row by pixel row (traffic proportional to the owned pixels);
    any other layout goes through one elementwise ``torch.where`` over the whole map.
    """
    if not x.is_contiguous(memory_format=torch.channels_last):
        torch.where(owned, x, state.x_ref, out=state.x_ref)
        return
    n, channels, h, w = x.shape
    hp, wp = state.plan.padded_hw
    ph, pw = layer.padding
    pixels = owned.reshape(-1).nonzero().squeeze(1)
    sample, rest = pixels // (h * w), pixels % (h * w)
    target = sample * (hp * wp) + (rest // w + ph) * wp + rest % w + pw
    x_rows = x.permute(0, 2, 3, 1).reshape(n * h * w, channels)  # a view for channels_last
    pad_rows = state.x_pad.permute(0, 2, 3, 1).view(n * hp * wp, channels)
    pad_rows.index_copy_(0, target, x_rows.index_select(0, pixels))


def recompute_tiles(
    layer: SkipConv2d, state: SparseState, tiles: torch.Tensor, changed: torch.Tensor | None = None
) -> None:
    """z = W * x_ref on the given tiles (only where ``changed``, if given): one gather, one batched
    conv, one scatter."""
    plan = state.plan
    x_pad, z = state.x_pad, state.z
    n_in, channels = x_pad.shape[0], x_pad.shape[1]
    sample, tile_y, tile_x = tiles.unbind(1)
    hp, wp = plan.padded_hw
    gather = (
        (sample * (hp * wp))[:, None, None]
        + plan.in_row_offsets[tile_y][:, :, None]
        + plan.in_cols[tile_x][:, None, :]
    )
    rows = x_pad.permute(0, 2, 3, 1).reshape(n_in * hp * wp, channels)  # a view: x_pad is channels_last
    patches = rows.index_select(0, gather.reshape(-1))
    patches = patches.view(tiles.shape[0], plan.rows.patch, plan.cols.patch, channels).permute(0, 3, 1, 2)
    out = activate(layer, _conv(layer, patches))  # [K, C_out, size_h, size_w]
    ho, wo = plan.out_hw
    scatter = (
        (sample * (ho * wo))[:, None, None]
        + plan.out_row_offsets[tile_y][:, :, None]
        + plan.out_cols[tile_x][:, None, :]
    )
    # tiles may overlap; overlapping outputs are computed from the same inputs, so either write is right
    z_rows = z.permute(0, 2, 3, 1).view(-1, z.shape[1])
    scatter = scatter.reshape(-1)
    values = out.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if changed is not None:  # select the rows to write (a second sync, but far less traffic than where())
        keep = changed.reshape(-1).index_select(0, scatter).nonzero().squeeze(1)
        scatter, values = scatter.index_select(0, keep), values.index_select(0, keep)
    z_rows.index_copy_(0, scatter, values)


def units_per_sample(state: SparseState) -> int:
    """What a crossover is a fraction of: the C++ pixel path's gate blocks, else execution tiles."""
    maps = state.maps
    if maps is not None and maps.pixel_weight is not None:
        return maps.gate.shape[1] * maps.gate.shape[2]
    return state.plan.tiles_per_sample


def dense_macs(layer: SkipConv2d, plan: Plan) -> int:
    return macs_per_output_position(layer) * plan.out_hw[0] * plan.out_hw[1]


def new_counters() -> dict:
    """Per-layer counters of what the backend ran: frames per path (idle: nothing changed; plain: the dense
    convolution without a gate), tiles, MACs with the halo."""
    return {
        "sparse_frames": 0, "dense_frames": 0, "idle_frames": 0, "plain_frames": 0, "tiles": 0, "macs_run": 0,
    }  # fmt: skip


# -- auto-tuning --------------------------------------------------------------------------------------

_MEMORY_CACHE: dict[str, float] = {}
_PLAIN_SECONDS: dict[str, float] = {}  # plain convolution time per layer geometry (this process only)


def tuning_key(layer: SkipConv2d, x: torch.Tensor) -> str:
    """What the crossover depends on: device, dtype, streams, the layer's geometry, its padded input size."""
    padded = (x.shape[-2] + 2 * layer.padding[0], x.shape[-1] + 2 * layer.padding[1])
    parts = [
        x.device.type, str(x.dtype).removeprefix("torch."), f"n{x.shape[0]}", f"c{layer.in_channels}",
        f"o{layer.out_channels}", f"g{layer.groups}", "k{}x{}".format(*layer.kernel_size),
        "s{}x{}".format(*layer.stride), "d{}x{}".format(*layer.dilation), "in{}x{}".format(*padded),
        f"t{execution_tile(layer)}", f"b{int(layer.bias is not None)}",
        # the paths cross over differently (the pixel path counts blocks, the others tiles), and each version
        # of the kernel and its product (packed panels or not) does
        kernel_path(layer, x),
        f"m{MEASUREMENT}",
    ]  # fmt: skip
    return "-".join(parts)


def kernel_path(layer: SkipConv2d, x: torch.Tensor) -> str:
    if not native.supports(layer, x):
        return "torch"
    if not pixel_path(layer):
        return f"native{native.source_digest()}"
    # (the vector kernels and the packed panels change what a step costs)
    vectors = f"-v{native.vector_width()}" + ("-packed" if native.packs_weights() else "")
    return f"native{native.source_digest()}-pixel-blocks{vectors}"


def memory_key(layer: SkipConv2d, x: torch.Tensor) -> str:
    return f"{cache_file(x.device)}:{tuning_key(layer, x)}"


def cache_file(device: torch.device) -> Path:
    # looked up on every stream's first frame by every layer: the path is built once per setting
    return _cache_file(os.environ.get("SKIPCONV_CACHE"), device, torch.get_num_threads())


@functools.lru_cache(maxsize=32)
def _cache_file(cache_dir: str | None, device: torch.device, threads: int) -> Path:
    root = Path(cache_dir or Path.home() / ".cache" / "skipconv")
    name = f"{device.type}-torch{torch.__version__}-threads{threads}"
    if device.type == "cuda":
        name += "-" + hashlib.sha1(torch.cuda.get_device_name(device).encode()).hexdigest()[:8]
    return root / "tuning" / f"{name.replace('+', '_')}.json"


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half-written by a crashed run: tune again
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _write_cache(path: Path, key: str, value: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)  # merge: other processes may have tuned other layers meanwhile
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only home must not stop inference; the in-memory cache still holds it
        pass


def crossover_for(layer: SkipConv2d, state: SparseState) -> float:
    """The layer's crossover fraction, from memory, the disk cache, or a fresh measurement."""
    in_memory = state.key or memory_key(layer, state.x_ref)
    if in_memory not in _MEMORY_CACHE:
        key, path = tuning_key(layer, state.x_ref), cache_file(state.x_pad.device)
        cached = _read_cache(path).get(key)
        if cached is None:
            cached = measure_crossover(layer, state)
            _write_cache(path, key, cached)
        _MEMORY_CACHE[in_memory] = cached
    return _MEMORY_CACHE[in_memory]


def _measured_time(
    fn,
    device: torch.device,
    repeats: int = TUNE_REPEATS,
    layer: SkipConv2d | None = None,
    warm: torch.Tensor | None = None,
    shortest: bool = False,
) -> float:
    """The median time of ``repeats`` runs of ``fn`` after a warm-up run (``shortest``: the shortest, see
    ``measure_crossover``).
    On the CPU each timed run of a ``layer``'s work finds the caches as its call inside the model does: its
    state and weights evicted by the other layers' work (a buffer of 4x their size written first), only its
    input (``warm``, just written by the layer before) read back. Timed hot, a sparse step or a convolution
    bound by memory looked cheaper than in the model: openpose-mbv2-14's 1x1 projections scanned a
    192-channel map for ~800 us in frames where the tuner had predicted less than their 320 us convolution,
    and backed off every few frames."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocator, oneDNN primitive cache
    evict = _eviction_bytes(layer) if device.type == "cpu" and layer is not None else 0
    times = []
    for _ in range(repeats):
        sync()
        if evict:
            _eviction_buffer()[: evict // 4].fill_(0.0)
            if warm is not None:
                warm.sum()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if shortest else sorted(times)[len(times) // 2]


@functools.cache
def _eviction_buffer() -> torch.Tensor:
    return torch.empty(EVICT_BYTES // 4)


def _eviction_bytes(layer: SkipConv2d) -> int:
    """What to write before a timed run of ``layer``'s work: 4x its state and weights, at most EVICT_BYTES."""
    held = layer.state_bytes() + layer.weight_layout_bytes() + layer.weight.untyped_storage().nbytes()
    return min(EVICT_BYTES, 4 * held)


def measure_crossover(layer: SkipConv2d, state: SparseState) -> float:
    """Times the dense recompute against the tile path at a few active fractions on the live state.

    Recomputing tiles from ``x_pad`` rewrites ``z`` with the values it already holds, so timing on the
    live state is safe. Sparse time is close to affine in the number of tiles; the crossover is where the
    interpolated sparse time meets ``TUNE_MARGIN`` x the dense time. With the C++ step the gate's own cost
    is timed too (it is paid on every skip frame): a layer whose gate costs about as much as its
    convolution gets a crossover under ``PLAIN_BELOW`` and runs plain dense convolutions.

    Each point is the shortest of ``CROSSOVER_REPEATS`` runs: noise (another process, a page fault) only
    ever adds time, and one crossover, cached, decides a geometry's layers for good. With the median of 3,
    the same hrnet-w32 layers (64 channels at 32x32) were tuned to 0.07 once and to 0.39-0.47 in three
    other runs; at 0.07 all 64 of them backed off on most frames.
    """

    def timed(fn, warm: torch.Tensor | None = None) -> float:
        return _measured_time(fn, device, CROSSOVER_REPEATS, layer=layer, warm=warm, shortest=True)

    with torch.no_grad():
        plan, device = state.plan, state.x_pad.device
        n = state.x_pad.shape[0]
        total = units_per_sample(state) * n
        dense = timed(lambda: _conv(layer, state.x_pad), warm=state.x_pad)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(total, generator=generator).to(device)
        per_sample = plan.tiles_per_sample
        tiles_x = len(plan.cols.starts)
        x = state.x_ref.contiguous(memory_format=torch.channels_last)  # a still frame: nothing to update
        points = [(0.0, 0.0)]
        if state.maps is not None:
            scan = timed(lambda: native_step(layer, state, x, order[:0]), warm=x)
            points = [(0.0, scan)]
        for count in sorted({max(1, round(fraction * total)) for fraction in TUNE_FRACTIONS}):
            chosen = order[:count]
            if state.maps is not None:
                seconds = timed(lambda c=chosen: native_step(layer, state, x, c), warm=x)
            else:
                rest = chosen % per_sample
                tiles = torch.stack([chosen // per_sample, rest // tiles_x, rest % tiles_x], 1)
                seconds = timed(lambda t=tiles: recompute_tiles(layer, state, t))
            points.append((count / total, seconds))
    budget = TUNE_MARGIN * (dense + points[0][1])  # the dense recompute pays the gate too
    if points[0][1] >= TUNE_MARGIN * dense:  # the gate alone costs the convolution
        return 0.0
    if points[1][1] > budget:  # slower than dense even at the first fraction: interpolate from zero
        f1, t1 = points[1]
        return max(0.0, f1 * (budget - points[0][1]) / max(t1 - points[0][1], 1e-12))
    for (f0, t0), (f1, t1) in zip(points[1:], points[2:], strict=False):
        if t1 > budget:
            return f0 + (f1 - f0) * (budget - t0) / (t1 - t0)
    f_last, t_last = points[-1]
    f_prev, t_prev = points[-2]
    if f_last >= 1.0:
        return 1.0
    slope = (t_last - t_prev) / (f_last - f_prev)
    return 1.0 if slope <= 0 else min(1.0, f_last + (budget - t_last) / slope)
