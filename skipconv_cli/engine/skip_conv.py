"""The Skip-Convolution layer: a ``nn.Conv2d`` that recomputes its output only where its input changed.

The invariant that makes it exact (NOTES.md, "Two design facts"): per stream the layer keeps a reference
input ``x_ref`` and its output ``z = W * x_ref + b``. On each frame a gate marks the outputs worth
recomputing; the input pixels those outputs own take their new value (``d = x - x_ref`` there, zero
elsewhere), and ``z += W * d`` with no bias. ``z = W * x_ref + b`` holds after every frame, so threshold 0
is exact, and change below the threshold stays pending in ``x - x_ref`` until it matters: no drift.

The paper's lossy variant (``reference="previous"``) instead sets ``x_ref = x`` after every frame, so the
skipped change is lost for good; it is kept for comparison.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from skipconv_cli.engine.backends import BACKENDS, native, sparse
from skipconv_cli.engine.gates import (
    GumbelGate,
    blockify,
    channel_abs_sum,
    check_gate_args,
    gumbel_sigmoid,
    support_sum,
)
from skipconv_cli.engine.macs import conv_macs, macs_per_output_position, norm_gate_macs

REFERENCES = ("pending", "previous")
_EPS = 1e-12
# Set on every frame: stored as plain attributes. nn.Module.__setattr__ runs ~8 isinstance checks per
# assignment, which made a plain dense frame of a small layer cost 4x its convolution (86 us vs 21 us).
_FRAME_ATTRIBUTES = frozenset(
    {
        "stats_frames", "stats_dense_frames", "stats_outputs_total", "stats_gate_macs", "_computed_outputs",
        "_computed_counted", "_frames_since_dense", "_last_source", "_last_computed", "_last_gate",
        "_out_hw", "_x_ref", "_z", "_in_scale", "_out_scale", "last_computed", "last_gate", "_plain_frames",
        "_sparse_state", "_state_path",
    }
)  # fmt: skip


@functools.lru_cache(maxsize=512)
def owner_index(
    in_size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[int, ...]:
    """For each input position along one axis, the output position that owns it.

    An input is owned by an output that reads it, preferring ``q // stride`` so that block gates map to
    aligned input blocks. When the owner's gate fires the input takes its new value. Because the owner
    always reads the input, a changed input makes its owner's support norm non-zero: at threshold 0 every
    change is applied. Inputs no output reads keep the aligned owner; their value never matters.
    """
    reach = dilation * (kernel - 1)

    def reads(o: int, q: int) -> bool:
        offset = q - (o * stride - padding)
        return 0 <= offset <= reach and offset % dilation == 0

    owners = []
    for q in range(in_size):
        preferred = min(q // stride, out_size - 1)
        if reads(preferred, q):
            owners.append(preferred)
            continue
        lo = max(0, math.ceil((q + padding - reach) / stride))
        hi = min(out_size - 1, (q + padding) // stride)
        readers = [o for o in range(lo, hi + 1) if reads(o, q)]
        owners.append(min(readers, key=lambda o: abs(o - preferred)) if readers else preferred)
    return tuple(owners)


class SkipConv2d(nn.Conv2d):
    """A 2D convolution over a video stream that computes only where the input changed.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as ``nn.Conv2d``; parameter names (``weight``, ``bias``) are kept so state_dicts load as they are.
        gate: ``"output-norm"`` (default), ``"input-norm"`` or ``"gumbel"`` (see ``gates.py``).
        threshold: scale-free gate threshold (>= 0; default 0.3). 0 recomputes every change: exact.
            Ignored by the Gumbel gate, which decides by its own logits.
        block: 1, 2, 4 or 8: the gate is constant over ``block x block`` output tiles.
        reset_every: recompute densely every this many frames (None: only on the first frame, after
            ``reset()``, or when the input shape, dtype or device changes).
        reference: ``"pending"`` (default: skipped change stays pending, no drift) or ``"previous"``
            (the paper's lossy reference, the true previous input).
        backend: ``"sparse"`` (default; ``backends/sparse.py``: only the tiles that can change are
            recomputed, with a measured per-layer dense fallback; its outputs are channels_last) or
            ``"reference"`` (``z += W * delta`` computed densely; readable, exact counts, supports
            training). The sparse backend needs inference (no gradient required, ``reference="pending"``);
            otherwise the layer runs the reference path. Changing it drops the stream state.

    Shape:
        - Input: (N, C_in, H, W); each of the N samples is an independent stream with its own state.
        - Output: (N, C_out, H_out, W_out) as ``nn.Conv2d``.
        - State per stream (not in the state_dict): the reference input (C_in, H, W), the output
          (C_out, H_out, W_out) and two scales.

    Examples:
        >>> layer = SkipConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), threshold=0.0)
        >>> frames = torch.rand(5, 1, 3, 32, 32)
        >>> outs = [layer(f) for f in frames]   # first frame dense, then only the changes
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        gate: str = "output-norm",
        threshold: float = 0.3,
        block: int = 1,
        reset_every: int | None = None,
        reference: str = "pending",
        backend: str = "sparse",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )  # fmt: skip
        check_gate_args(gate, threshold, block)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}; got {reference!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if reset_every is not None and (not isinstance(reset_every, int) or reset_every < 1):
            raise ValueError(f"reset_every must be a positive integer or None; got {reset_every!r}")
        if isinstance(self.padding, str):
            raise ValueError("SkipConv2d needs explicit padding; convert() resolves padding='same'")
        self.gate_type = gate
        self.threshold = float(threshold)
        self.block = block
        self.reset_every = reset_every
        self.reference = reference
        self._backend = backend
        # sparse backend: fraction of active tiles above which the dense recompute runs (None: measured)
        self.crossover: float | None = None
        # sparse backend: every frame a plain convolution, no state kept (a dense run through the same
        # accounting, at the dense model's speed: ``run --dense``)
        self.always_plain = False
        # sparse backend: hand out copies of the output (set once a downstream op wrote into it)
        self.copy_outputs = False
        self.gate = GumbelGate(self) if gate == "gumbel" else None
        # sparse backend: the activation that alone reads this layer's output, applied here (set by
        # ``convert``; see ``engine.activations``)
        self.fused_activation: tuple[int, float, float] | None = None
        self._owner_cache: dict = {}  # owner index tables of the last input size (kept across streams)
        self.reset()
        self.reset_stats()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options) -> SkipConv2d:
        """A Skip-Conv with ``conv``'s geometry and weights, with an eval-mode BatchNorm folded in."""
        padding = conv.padding
        if isinstance(padding, str):  # "same"/"valid": resolve to numbers (odd kernels only, like torch)
            padding = tuple(
                0 if padding == "valid" else d * (k - 1) // 2
                for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
            )
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
            conv.groups, bias is not None, conv.padding_mode, weight.device, weight.dtype, **options,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", gate={self.gate_type}"
        if self.gate_type != "gumbel":
            s += f", threshold={self.threshold:g}"
        if self.block != 1:
            s += f", block={self.block}"
        if self.reset_every is not None:
            s += f", reset_every={self.reset_every}"
        if self.reference != "pending":
            s += f", reference={self.reference}"
        if self.backend != "sparse":
            s += f", backend={self.backend}"
        return s

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
        if name != self._backend:
            self._backend = name
            self.reset()  # the backends keep their state in different layouts

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FRAME_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- stream state ---------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickled without the stream state (``torch.save`` of a whole model): a loaded copy starts a new
        stream. Nor with the sparse path's copy of the weight, derived again on use (HRNet-w32: 108 MB)."""
        state = sparse.state_without_stream(self)
        state.pop(sparse.WEIGHT_LAYOUTS, None)
        return state

    def reset(self) -> None:
        """Drops the stream state: the next frame is computed densely."""
        self._x_ref: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._in_scale: torch.Tensor | None = None
        self._out_scale: torch.Tensor | None = None
        self._frames_since_dense = 0
        self.last_computed = None  # [N, 1, H_out, W_out] bool, for overlays
        self.last_gate = None  # the gate of the last skip frame (float in training)
        self._sparse_state: sparse.SparseState | None = None
        self._state_path: str | None = None  # which path ("reference"/"sparse") owns the state

    # The C++ step and plain frames leave their maps in a compact form; the bool maps are made on request.

    @property
    def last_computed(self) -> torch.Tensor | None:
        if self._last_source is None:
            return self._last_computed
        kind, value = self._last_source
        if kind == "dense":
            n, out_hw, device = value
            return torch.ones((n, 1, *out_hw), dtype=torch.bool, device=device)
        return (value.mark > 0).unsqueeze(1)

    @last_computed.setter
    def last_computed(self, value: torch.Tensor | None) -> None:
        self._last_computed = value
        self._last_source = None

    @property
    def last_gate(self) -> torch.Tensor | None:
        source = self._last_source
        if source is None or source[0] != "native":
            return self._last_gate
        maps = source[1]
        out_hw = maps.mark.shape[-2:]
        gate = maps.gate.bool().unsqueeze(1)
        gate = gate.repeat_interleave(self.block, -2).repeat_interleave(self.block, -1)
        return gate[..., : out_hw[0], : out_hw[1]]

    @last_gate.setter
    def last_gate(self, value: torch.Tensor | None) -> None:
        self._last_gate = value

    def reset_stats(self) -> None:
        self.stats_frames = 0
        self.stats_dense_frames = 0
        self.stats_outputs_total = 0
        self._computed_outputs = torch.zeros((), dtype=torch.long)
        self._computed_counted = 0  # outputs counted on the host (C++ step)
        self._plain_frames = 0  # frames (x streams) of plain dense convolutions, counted as dense
        self.stats_gate_macs = 0
        self._backend_counters = sparse.new_counters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._sparse_state
        if (
            state is not None
            and state.tuned
            and not torch.is_grad_enabled()
            and x.shape == state.input_key[0]  # a plain frame writes no state: the shape is what matters
            and not (
                self.training and self.gate is not None  # a Gumbel gate in training runs the reference path
            )
        ):
            # the short ways, taken by nearly every frame (the Python of a frame is paid by every layer:
            # 293 in HRNet-w32, where Python is ~5 ms of a 28 ms frame at 4.3x fewer MACs); what
            # ``plain_frame_if_due`` and ``_needs_dense`` check first is checked here, a call less each
            if state.plain_forever or state.plain_left > 0:
                return sparse.plain_frame_if_due(self, state, x)
            if (
                self._state_path == "sparse"
                and self._backend == "sparse"
                and self.reference == "pending"  # (what ``_sparse_allowed`` checks, gradients off)
                and self.reset_every is None
                and state.matches(x)
            ):
                return sparse.step_frame(self, state, x)
        path = "sparse" if self._sparse_allowed(x) else "reference"
        if path != self._state_path:  # e.g. gradients switched on mid-stream: start afresh
            self.reset()
            self._state_path = path
        if path == "sparse":
            if torch.is_grad_enabled():
                with torch.no_grad():
                    return self._sparse_frame(x)
            return self._sparse_frame(x)
        if self._needs_dense(x):
            return self._dense_frame(x)
        return self._skip_frame(x)

    def _sparse_frame(self, x: torch.Tensor) -> torch.Tensor:
        return sparse.dense_frame(self, x) if self._needs_dense(x) else sparse.skip_frame(self, x)

    def _sparse_allowed(self, x: torch.Tensor) -> bool:
        """The sparse backend writes its state in place and drops gradients: inference only."""
        if self._backend != "sparse" or self.reference != "pending":
            return False
        if self.gate_type == "gumbel" and self.training:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _needs_dense(self, x: torch.Tensor) -> bool:
        if self._state_path == "sparse":
            state = self._sparse_state
            if state is None or not state.matches(x):
                return True
        else:
            ref = self._x_ref
            if ref is None or ref.shape != x.shape or ref.dtype != x.dtype or ref.device != x.device:
                return True
        return self.reset_every is not None and self._frames_since_dense >= self.reset_every

    def _dense_frame(self, x: torch.Tensor) -> torch.Tensor:
        z = self._conv_forward(x, self.weight, self.bias)
        with torch.no_grad():
            self._x_ref = x.detach().clone()
            self._z = z.detach().clone()
            self._dense_bookkeeping(x, z)
        return z

    def _dense_bookkeeping(self, x: torch.Tensor, z: torch.Tensor, gated: bool = True) -> None:
        """Scales, counters and overlays of a dense frame (shared by the backends; a layer that will not
        gate, tuned to plain convolutions, needs no scale)."""
        with torch.no_grad():
            n = x.shape[0]
            if not gated:
                pass
            elif self.gate_type in ("output-norm", "gumbel"):  # each gate needs only its own scale
                self._out_scale = native.mean_abs(z).clamp_min(_EPS)
            elif self.gate_type == "input-norm":
                input_support = support_sum(channel_abs_sum(x.detach()), self)
                self._in_scale = input_support.mean((1, 2, 3), keepdim=True).clamp_min(_EPS)
            self._frames_since_dense = 1
            self._last_source = ("dense", (n, tuple(z.shape[-2:]), z.device))
            self._count(n, z.shape[-2:], computed=None, gate_macs=0)

    def _skip_frame(self, x: torch.Tensor) -> torch.Tensor:
        x_ref, z_prev = self._x_ref, self._z
        residual = x - x_ref
        gate = self._gate(residual)
        owned = self._owned_inputs(gate, x.shape[-2:])
        if owned.dtype == torch.bool:
            new_ref = torch.where(owned, x.detach(), x_ref)
            delta = new_ref - x_ref
        else:  # training: a straight-through 0/1 gate keeps the gradient path to the gate's parameters
            delta = residual * owned
            new_ref = (x_ref + delta).detach()
        z = z_prev + self._conv_forward(delta, self.weight, None)
        with torch.no_grad():
            self._x_ref = x.detach().clone() if self.reference == "previous" else new_ref
            self._z = z.detach().clone()
            self._skip_bookkeeping(x, owned, z.shape[-2:])
        return z

    def _plain_bookkeeping(self, n: int, dense_source: tuple) -> None:
        """A plain dense frame (sparse backend): one counter, added in as dense frames by
        ``layer_stats``; scales kept from the last dense frame. As lean as can be: it runs every frame, so
        it writes the instance dict directly (what ``__setattr__`` does for these names, without the call)."""
        attributes = self.__dict__
        attributes["_plain_frames"] += n
        attributes["_frames_since_dense"] = 1
        attributes["_last_source"] = dense_source

    def _native_bookkeeping(self, n: int, maps, computed: int) -> None:
        """A frame of the C++ step: it counted the outputs it computed (the same footprint as below).
        What ``_count`` does, with the per-frame constants the maps hold; it runs every frame, so it
        writes the instance dict directly (as ``_plain_bookkeeping``)."""
        attributes = self.__dict__
        attributes["_frames_since_dense"] += 1
        attributes["_last_source"] = maps.source
        attributes["stats_frames"] += n
        attributes["stats_outputs_total"] += n * maps.outputs
        attributes["stats_gate_macs"] += n * maps.gate_macs
        attributes["_computed_counted"] += computed

    def _skip_bookkeeping(self, x: torch.Tensor, owned: torch.Tensor, out_hw: tuple[int, ...]) -> None:
        """Counts the outputs really needed (the footprint of the updated inputs) and the gate's cost; the
        same for every backend, whatever extra (halo) work a backend does."""
        with torch.no_grad():
            computed = support_sum(owned.detach().to(x.dtype), self) > 0
            self._frames_since_dense += 1
            self.last_computed = computed
            in_hw = x.shape[-2:]
            gate_macs = norm_gate_macs(self, in_hw, out_hw)  # a Gumbel gate is a weighted norm gate: the same
            self._count(x.shape[0], out_hw, computed=computed, gate_macs=gate_macs)

    def _gate(self, residual: torch.Tensor, abs_sum: torch.Tensor | None = None) -> torch.Tensor:
        """The output-resolution gate: bool, or a straight-through float while training a Gumbel gate.

        ``abs_sum``: ``channel_abs_sum(residual)`` when the caller has it already.
        """
        if abs_sum is None:
            abs_sum = channel_abs_sum(residual.detach())
        support = support_sum(abs_sum, self)
        changed = support > 0
        if self.gate_type == "gumbel":
            logits = self.gate(residual, self, self._out_scale)
            if self.training:
                gate = gumbel_sigmoid(logits) * changed.to(logits.dtype)
            else:
                gate = (logits > 0) & changed
        elif self.gate_type == "input-norm":
            gate = support > self.threshold * self._in_scale if self.threshold > 0 else changed
        else:
            # ||W||_1 of Eq. 7 divided by the number of weights: the estimate is then the output change
            # at p relative to the mean output, comparable across layers of any fan-in (NOTES.md).
            estimate = support * self.weight.detach().abs().mean()
            gate = estimate > self.threshold * self._out_scale if self.threshold > 0 else changed
        gate = blockify(gate, self.block)
        self.last_gate = gate
        return gate

    def _owned_inputs(self, gate: torch.Tensor, in_hw: torch.Size) -> torch.Tensor:
        """The input pixels whose new value is taken: those owned by a gated output."""
        rows, cols = self._owner_tensors(tuple(in_hw), tuple(gate.shape[-2:]), gate.device)
        return gate.index_select(-2, rows).index_select(-1, cols)

    def _owner_tensors(
        self, in_hw: tuple[int, ...], out_hw: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (in_hw, out_hw, device)
        if self._owner_cache.get("key") != key:
            geometry = zip(
                in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.dilation, strict=True
            )
            index = tuple(torch.tensor(owner_index(*axis), device=device) for axis in geometry)
            self._owner_cache = {"key": key, "index": index}
        return self._owner_cache["index"]

    # -- accounting -----------------------------------------------------------------------------------

    def _count(self, n: int, out_hw: torch.Size, computed: torch.Tensor | None, gate_macs: int) -> None:
        positions = n * out_hw[0] * out_hw[1]
        self.stats_frames += n
        self.stats_outputs_total += positions
        self.stats_gate_macs += n * gate_macs
        self._out_hw = (int(out_hw[0]), int(out_hw[1]))
        if computed is None:
            self.stats_dense_frames += n
            self._computed_counted += positions
        else:
            self._computed_outputs = self._computed_outputs.to(computed.device) + computed.sum()

    def state_bytes(self) -> int:
        """Bytes of stream state held for all streams: reference input, output and backend buffers (not the
        copy of the weight the C++ step reads, which does not grow with the streams: see
        ``weight_layout_bytes``)."""
        tensors = [self._x_ref, self._z]
        state = self._sparse_state
        if state is not None:
            maps = vars(state.maps).items() if state.maps is not None else ()
            held = [*vars(state).values(), *(t for name, t in maps if name != "pixel_weight")]
            tensors += [t for t in held if isinstance(t, torch.Tensor)]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None
        }
        return sum(storages.values())

    def weight_layout_bytes(self) -> int:
        """Bytes of the weight's copy in the layout the C++ step's pixel path reads (one for all streams,
        kept across resets)."""
        return sparse.weight_layout_bytes(self)

    def layer_stats(self) -> dict:
        """MACs and active fraction since the last ``reset_stats()`` (summed over streams and frames)."""
        plain_outputs = self._plain_frames * self._out_hw[0] * self._out_hw[1] if self._plain_frames else 0
        computed = int(self._computed_outputs) + self._computed_counted + plain_outputs
        outputs_total = self.stats_outputs_total + plain_outputs
        frames = self.frames_seen
        per_frame_dense = conv_macs(self, self._out_hw) if frames else 0
        return {
            "kernel": list(self.kernel_size),
            "stride": list(self.stride),
            "groups": self.groups,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "macs_dense": per_frame_dense * frames,
            "macs_executed": computed * macs_per_output_position(self) + self.stats_gate_macs,
            "active_fraction": computed / outputs_total if outputs_total else 0.0,
        }

    @property
    def frames_seen(self) -> int:
        """Frames (times streams) since the last ``reset_stats()``, plain dense frames included."""
        return self.stats_frames + self._plain_frames

    def backend_stats(self) -> dict:
        """What the sparse backend ran since ``reset_stats()``.

        Frames per path (``sparse_frames``, ``dense_frames``, ``idle_frames`` with nothing to recompute),
        ``tiles`` recomputed, ``macs_run`` (halo and overlap included, unlike ``layer_stats``) and the
        ``crossover`` in use (None before the first sparse skip frame).
        """
        state = self._sparse_state
        crossover = state.crossover if state is not None and state.tuned else None
        counters = dict(self._backend_counters)
        if self._plain_frames:
            counters["plain_frames"] += self._plain_frames
            counters["macs_run"] += self._plain_frames * conv_macs(self, self._out_hw)
        return {**counters, "crossover": crossover}


def fold_batchnorm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm into the preceding conv's weight and bias."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    folded_weight = weight * scale.reshape(-1, 1, 1, 1)
    base = bias if bias is not None else torch.zeros_like(bn.running_mean)
    folded_bias = (base - bn.running_mean) * scale + beta
    return folded_weight, folded_bias
