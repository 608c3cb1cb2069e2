"""Learning Gumbel gates from unlabeled video (NOTES.md Eq. 8-9): distillation against the dense model.

No labels are needed: the dense model's own raw outputs are the targets. Each training step runs clips of
``clip_len`` consecutive frames through the model converted with ``gate="gumbel"``: frame 0 is computed
densely (the reference), frames 1..T-1 are skip frames whose gates are sampled (hard 0/1 forward, soft
straight-through gradient). The loss is

    distillation error of the skip frames + beta * expected MAC fraction of the clip,

where the MAC fraction is ``mean over skip frames of sum_l m_l * mean(g_l) / sum_l m_l`` with ``m_l`` the
dense MACs of layer ``l`` (Eq. 9), read from ``layer.last_gate`` after every frame.

Frames are read and preprocessed once: a pool of clips at the training size, with the dense targets, is
kept in memory, so a step costs only the clip's forward and backward passes. A checkpoint (trainable
tensors, optimizer, step, RNG) is written atomically every few steps; ``resume=True`` continues from it.
The result is evaluated at inference (gates thresholded at sigmoid > 0.5) on held-out frames.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skipconv_cli.engine import convert, report, reset, skip_layers
from skipconv_cli.engine.macs import conv_macs
from skipconv_cli.errors import SkipconvError
from skipconv_cli.models.factory import LoadedModel
from skipconv_cli.pipeline.gates_file import GatesFile, gate_state_dict
from skipconv_cli.pipeline.runner import first_sample
from skipconv_cli.pipeline.video import open_source

CHECKPOINT_FORMAT = "skipconv-gates-checkpoint/1"
_EPS = 1e-6


# -- which frames ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoRange:
    """Frames ``[start, stop)`` of a video (``stop=None``: to the end)."""

    input: str
    start: int = 0
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> VideoRange:
        """``PATH``, ``PATH@START-STOP`` or ``PATH@START-`` (frame numbers, stop exclusive)."""
        path, at, frames = text.rpartition("@")
        if not at:
            return cls(text)
        lo, dash, hi = frames.partition("-")
        try:
            start, stop = int(lo or 0), (int(hi) if hi else None)
        except ValueError:
            raise SkipconvError(
                f"frame range must be PATH@START-STOP, e.g. clip.mp4@0-700; got {text!r}"
            ) from None
        if not dash or start < 0 or (stop is not None and stop <= start):
            raise SkipconvError(f"frame range must be PATH@START-STOP with 0 <= START < STOP; got {text!r}")
        return cls(path, start, stop)

    def label(self) -> str:
        return f"{self.input}@{self.start}-{'' if self.stop is None else self.stop}"

    def frames(self) -> Iterator[np.ndarray]:
        """The BGR frames of the range, decoded lazily."""
        count = None if self.stop is None else self.stop - self.start
        yield from open_source(self.input, max_frames=count, start=self.start)

    def length(self) -> int:
        """Frames in the range as the container announces them (the range may end earlier if cut)."""
        source = open_source(self.input, max_frames=self.stop)
        total = source.expected_frames
        source.close()
        if total is None:
            raise SkipconvError(f"{self.input}: cannot train on a live source; use a video file")
        if total <= self.start:
            raise SkipconvError(f"{self.input} has {total} frames; the range starts at {self.start}")
        return total - self.start


# -- configuration --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How gates are trained. ``eval_videos`` empty: the last ``holdout`` share of each range is held out."""

    videos: list[VideoRange]
    input_size: tuple[int, int]
    eval_videos: list[VideoRange] = field(default_factory=list)
    beta: float = 0.1
    block: int = 1
    clip_len: int = 4
    warmup: int = 2
    steps: int = 200
    lr: float = 0.05
    batch: int = 2
    clips: int = 64
    holdout: float = 0.15
    eval_frames: int = 200
    finetune: bool = False
    seed: int = 0
    checkpoint_every: int = 20
    sharpen: float = 10.0
    start_threshold: float = 0.01

    def check(self) -> None:
        if not self.videos:
            raise SkipconvError("train-gates needs at least one video")
        if self.clip_len < 2:
            raise SkipconvError(
                f"--clip-len must be at least 2 (a dense frame and a skip frame); got {self.clip_len}"
            )
        if self.beta < 0 or not math.isfinite(self.beta):
            raise SkipconvError(f"--beta must be a number >= 0; got {self.beta}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise SkipconvError(f"--lr must be > 0; got {self.lr}")
        if self.sharpen < 1 or not math.isfinite(self.sharpen):
            raise SkipconvError(f"--sharpen must be >= 1; got {self.sharpen}")
        if not 0 < self.start_threshold < 10:
            raise SkipconvError(f"--start-threshold must be in (0, 10); got {self.start_threshold}")
        if self.warmup < 0:
            raise SkipconvError(f"--warmup must be >= 0; got {self.warmup}")
        if self.steps < 1 or self.batch < 1 or self.clips < 1:
            raise SkipconvError("--steps, --batch and --clips must be at least 1")
        if self.block not in (1, 2, 4, 8):
            raise SkipconvError(f"--block must be 1, 2, 4 or 8; got {self.block}")
        if not 0 <= self.holdout < 1:
            raise SkipconvError(f"holdout must be in [0, 1); got {self.holdout}")

    @property
    def frames_per_clip(self) -> int:
        return self.clip_len + self.warmup

    def fingerprint(self) -> dict:
        """What must not change between a checkpoint and a resumed run."""
        return {
            "videos": [v.label() for v in self.videos],
            "input_size": list(self.input_size),
            "block": self.block,
            "clip_len": self.clip_len,
            "warmup": self.warmup,
            "batch": self.batch,
            "clips": self.clips,
            "holdout": self.holdout,
            "finetune": self.finetune,
            "seed": self.seed,
            "start_threshold": self.start_threshold,
        }


# -- the pool of clips ----------------------------------------------------------------------------------


@dataclass
class ClipPool:
    """Preprocessed clips [K, T, 3, H, W] with the dense model's raw outputs per frame as targets."""

    frames: torch.Tensor
    targets: list[torch.Tensor]  # each [K, T, ...]: one entry per output tensor of the model
    scales: list[float]  # per output tensor: mean per-channel variance of the targets (normaliser)
    sources: list[dict]  # per video: input, frame range used for training


def split_ranges(config: TrainConfig) -> tuple[list[VideoRange], list[VideoRange]]:
    """Training ranges and held-out ranges (explicit ``eval_videos`` or the tail of each training range)."""
    train, held_out = [], []
    for video in config.videos:
        total = video.length()
        if config.eval_videos or config.holdout == 0:
            train.append(VideoRange(video.input, video.start, video.start + total))
            continue
        keep = max(config.frames_per_clip, int(round(total * (1 - config.holdout))))
        train.append(VideoRange(video.input, video.start, video.start + keep))
        if keep < total:
            held_out.append(VideoRange(video.input, video.start + keep, video.start + total))
    return train, list(config.eval_videos) or held_out


def clip_starts(ranges: list[VideoRange], config: TrainConfig) -> list[tuple[int, int]]:
    """(range index, first frame offset) of ``config.clips`` clips spread evenly over all ranges."""
    candidates = [
        (i, offset)
        for i, video in enumerate(ranges)
        for offset in range(0, (video.stop or 0) - video.start - config.frames_per_clip + 1)
    ]
    if not candidates:
        raise SkipconvError(f"the videos are shorter than one clip of {config.frames_per_clip} frames")
    count = min(config.clips, len(candidates))
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[p] for p in picks]


def as_tensors(raw) -> list[torch.Tensor]:
    """A model's raw outputs (tensor, tuple/list or dict of tensors) as a flat list."""
    if isinstance(raw, torch.Tensor):
        return [raw]
    if isinstance(raw, (tuple, list)):
        return [t for r in raw for t in as_tensors(r)]
    if isinstance(raw, dict):
        return [t for k in sorted(raw) for t in as_tensors(raw[k])]
    raise SkipconvError(f"the model returned {type(raw).__name__}; train-gates needs tensor outputs")


def channel_variance(t: torch.Tensor) -> float:
    """Mean over channels of each channel's variance (channels: dim 1 of NCHW, last dim otherwise)."""
    if t.ndim >= 4:
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
    elif t.ndim == 3:
        per_channel = t.reshape(-1, t.shape[-1]).T
    else:
        per_channel = t.reshape(1, -1)
    return float(per_channel.var(dim=1).mean().clamp_min(1e-8))


def build_pool(
    loaded: LoadedModel,
    ranges: list[VideoRange],
    config: TrainConfig,
    device: torch.device,
    on_status: Callable[[str], None] = lambda _: None,
) -> ClipPool:
    """Reads the clips once, preprocesses them at the training size and computes the dense targets."""
    starts = clip_starts(ranges, config)
    wanted: dict[int, dict[int, int]] = {}  # range -> frame offset -> slot in the flat frame list
    slots = 0
    for i, offset in starts:
        for t in range(config.frames_per_clip):
            if offset + t not in wanted.setdefault(i, {}):
                wanted[i][offset + t] = slots
                slots += 1
    flat: list[torch.Tensor | None] = [None] * slots
    for i, video in enumerate(ranges):
        on_status(f"reading {video.label()}")
        needed = wanted.get(i, {})
        last = max(needed, default=-1)
        for offset, frame in enumerate(video.frames()):
            if offset > last:
                break
            if offset in needed:
                tensor, _ = loaded.spec.preprocess(frame, config.input_size)
                flat[needed[offset]] = tensor[0]
    if any(f is None for f in flat):
        raise SkipconvError("a video ended before its announced frame count (truncated file?)")
    index = torch.tensor(
        [[wanted[i][offset + t] for t in range(config.frames_per_clip)] for i, offset in starts]
    )
    frames = torch.stack(flat)[index]  # type: ignore[arg-type]
    on_status("computing dense targets")
    outputs: list[list[torch.Tensor]] = []
    dense = loaded.module.to(device).eval()
    with torch.no_grad():
        for chunk in torch.split(frames.flatten(0, 1), 8):
            outputs.append([t.cpu() for t in as_tensors(dense(chunk.to(device)))])
    targets = [
        torch.cat([o[j] for o in outputs]).reshape(
            len(starts), config.frames_per_clip, *outputs[0][j].shape[1:]
        )
        for j in range(len(outputs[0]))
    ]
    sources = []
    for i, video in enumerate(ranges):
        offsets = sorted(wanted.get(i, {}))
        if offsets:
            sources.append(
                {
                    "input": video.input,
                    "start": video.start,
                    "stop": video.stop,
                    "clips": sum(1 for j, _ in starts if j == i),
                    "first": video.start + offsets[0],
                    "last": video.start + offsets[-1],
                }
            )
    scales = [channel_variance(t.flatten(0, 1)) for t in targets]
    return ClipPool(frames=frames, targets=targets, scales=scales, sources=sources)


# -- the loss -------------------------------------------------------------------------------------------


def _bernoulli_kl(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    t = target.clamp(_EPS, 1 - _EPS)
    p = pred.clamp(_EPS, 1 - _EPS)
    return t * (t / p).log() + (1 - t) * ((1 - t) / (1 - p)).log()


def is_yolox_format(task: str, outputs: list[torch.Tensor]) -> bool:
    """One [N, anchors, 4 box + objectness + classes] tensor with sigmoided scores (YOLOX, light-person)."""
    return task == "detect" and len(outputs) == 1 and outputs[0].ndim == 3 and outputs[0].shape[-1] >= 6


def distillation_error(
    task: str, pred: list[torch.Tensor], target: list[torch.Tensor], scales: list[float]
) -> torch.Tensor:
    """How far the skip model's raw outputs are from the dense model's, scale-free.

    - YOLOX-format detection: per expected object (sum of the dense objectness), the Bernoulli KL of the
      objectness over all anchors, plus, weighted by the dense objectness, the KL of the class scores and
      the squared error of the raw box offsets (grid units, log sizes). Background anchors' boxes are noise
      that never becomes a detection, so they do not count.
    - Anything else (pose heatmaps and PAFs, other heads): mean squared error divided by the mean
      per-channel variance of the dense outputs, i.e. 1.0 is as wrong as predicting each channel's mean.
    """
    if is_yolox_format(task, target):
        p, t = pred[0], target[0]
        weight = t[..., 4]
        objects = weight.sum().clamp_min(1.0)
        obj = _bernoulli_kl(t[..., 4], p[..., 4]).sum()
        cls = (weight * _bernoulli_kl(t[..., 5:], p[..., 5:]).sum(-1)).sum()
        box = (weight * (p[..., :4] - t[..., :4]).pow(2).sum(-1)).sum()
        return (obj + cls + box) / objects
    terms = [(p - t).pow(2).mean() / s for p, t, s in zip(pred, target, scales, strict=True)]
    return torch.stack(terms).mean()


# -- training -------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    step: int
    loss: float
    distill: float
    mac_fraction: float
    seconds: float


def prepare_model(loaded: LoadedModel, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model converted with Gumbel gates everywhere; only what trains requires a gradient."""
    try:
        # (the reference backend: training runs it anyway, and evaluation then counts what the gates decide)
        model = convert(loaded.module.cpu().eval(), gate="gumbel", block=config.block, backend="reference")
    except ValueError as e:
        raise SkipconvError(str(e)) from e
    model.to(device)
    with torch.no_grad():  # start as output-norm at start_threshold: open nearly everywhere, near exact
        for _, layer in skip_layers(model):
            layer.gate.log_threshold.fill_(math.log(config.start_threshold))
    for name, param in model.named_parameters():
        param.requires_grad_(config.finetune or ".gate." in name or name.startswith("gate."))
    return model


class GateSharpness:
    """Scales every gate's logits by ``k`` during training (a forward hook; the parameters are untouched).

    A sampled gate fires with probability sigmoid(k * logit), the thresholded one at inference where
    logit > 0, whatever k > 0. With k = 1 training converges to gates that fire at random with a small
    probability: they cover every pixel now and then while sampled, and never once thresholded, so
    inference freezes whole layers. Raising k from 1 to ``sharpen`` over training turns the sampled gates
    into the thresholded ones, so the loss ends up measuring what inference will do.
    """

    def __init__(self, model: nn.Module) -> None:
        self.k = 1.0
        self._handles = [
            layer.gate.register_forward_hook(self._scale) for _, layer in skip_layers(model) if layer.gate
        ]

    def _scale(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.k if module.training else output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def set_gate_training(model: nn.Module, training: bool) -> None:
    """Training mode for the skip layers only (sampled gates); other modules (e.g. unfolded BatchNorm,
    dropout) stay in eval mode, since the targets are the eval-mode dense model's."""
    model.eval()
    for _, layer in skip_layers(model):
        layer.train(training)


def clip_loss(
    model: nn.Module,
    task: str,
    frames: torch.Tensor,
    targets: list[torch.Tensor],
    scales: list[float],
    beta: float,
    finetune: bool,
    warmup: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, distillation error and expected MAC fraction of a batch of clips [B, W + T, 3, H, W].

    Frame 0 is dense; the ``warmup`` frames after it run with the current gates thresholded, as at
    inference, without gradient; the last T - 1 frames sample the gates and count in the loss. Warm-up
    puts the layers in the state they have deep into a stream (change left pending by closed gates),
    which a clip fresh from its dense frame never shows: without it, gates learn to freeze layers that
    are harmless for three frames and stale for the rest of a long stream.
    """
    reset(model)
    layers = [layer for _, layer in skip_layers(model)]
    clip_len = frames.shape[1]
    distill = frames.new_zeros(())
    if finetune:  # the backbone moves: keep the dense frame faithful too
        out = as_tensors(model(frames[:, 0]))
        distill = distill + distillation_error(task, out, [t[:, 0] for t in targets], scales)
    else:
        with torch.no_grad():
            model(frames[:, 0])
    dense_macs = torch.tensor(
        [float(conv_macs(layer, tuple(layer.last_computed.shape[-2:]))) for layer in layers],
        device=frames.device,
    )
    share = dense_macs / dense_macs.sum()
    if warmup:
        set_gate_training(model, False)
        with torch.no_grad():
            for t in range(1, 1 + warmup):
                model(frames[:, t])
        set_gate_training(model, True)
    macs = frames.new_zeros(())
    for t in range(1 + warmup, clip_len):
        out = as_tensors(model(frames[:, t]))
        distill = distill + distillation_error(task, out, [x[:, t] for x in targets], scales)
        gates = torch.stack([layer.last_gate.float().mean() for layer in layers])
        macs = macs + (share * gates).sum()
    skip_frames = clip_len - 1 - warmup
    distill = distill / (skip_frames + (1 if finetune else 0))
    macs = macs / skip_frames
    return distill + beta * macs, distill, macs


def checkpoint_path(out: Path) -> Path:
    return Path(str(out) + ".ckpt")


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    fingerprint: dict,
    history: list[dict],
) -> None:
    """Atomic: a temp file renamed over the old checkpoint, so an interrupt never leaves half a file."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "clip_rng": generator.get_state(),
        "history": history,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    fingerprint: dict,
) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one clear line
        raise SkipconvError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SkipconvError(f"{path} is not a train-gates checkpoint")
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise SkipconvError(
            f"checkpoint {path} was made with different settings ({', '.join(changed)}); "
            "start afresh without --resume or use the same settings"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            if name not in params:
                raise SkipconvError(f"checkpoint {path} has {name}, which this model does not")
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["clip_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state.get("history", []))


def train_gates(
    loaded: LoadedModel,
    config: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    device: torch.device | None = None,
    on_step: Callable[[StepStats], None] = lambda _: None,
    on_status: Callable[[str], None] = lambda _: None,
) -> GatesFile:
    """Trains the gates, evaluates them on held-out frames and writes the gates file to ``out``."""
    config.check()
    device = device or torch.device("cpu")
    out = Path(out)
    ckpt = checkpoint_path(out)
    if resume and not ckpt.is_file():
        raise SkipconvError(f"--resume: no checkpoint {ckpt} to resume from")
    torch.manual_seed(config.seed)
    train_ranges, eval_ranges = split_ranges(config)
    pool = build_pool(loaded, train_ranges, config, device, on_status)
    model = prepare_model(loaded, config, device)
    optimizer = torch.optim.Adam(trainable(model), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    fingerprint = {**config.fingerprint(), "model": loaded.name, "weights_sha256": loaded.weights_sha256}
    step, history = 0, []
    if resume:
        step, history = load_checkpoint(ckpt, model, optimizer, generator, fingerprint)
        on_status(f"resumed at step {step}")
    set_gate_training(model, True)
    sharpness = GateSharpness(model)
    started = time.perf_counter()
    clips = pool.frames.shape[0]
    while step < config.steps:
        t0 = time.perf_counter()
        pick = torch.randint(clips, (min(config.batch, clips),), generator=generator)
        frames = pool.frames[pick].to(device)
        targets = [t[pick].to(device) for t in pool.targets]
        sharpness.k = 1.0 + (config.sharpen - 1.0) * step / max(1, config.steps - 1)
        loss, distill, macs = clip_loss(
            model, loaded.spec.task, frames, targets, pool.scales, config.beta, config.finetune, config.warmup
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        stats = StepStats(step, loss.item(), distill.item(), macs.item(), time.perf_counter() - t0)
        history.append(asdict(stats))
        on_step(stats)
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(ckpt, model, optimizer, step, generator, fingerprint, history)
    train_seconds = time.perf_counter() - started
    sharpness.remove()
    reset(model)
    on_status("evaluating on held-out frames")
    measured = evaluate(loaded, model, eval_ranges, config.input_size, device, config.eval_frames)
    recent = history[-min(len(history), 20) :]
    gates = GatesFile(
        model=loaded.name,
        weights_sha256=loaded.weights_sha256,
        block=config.block,
        state_dict=gate_state_dict(model, include_backbone=config.finetune),
        training={
            "beta": config.beta,
            "clip_len": config.clip_len,
            "warmup": config.warmup,
            "sharpen": config.sharpen,
            "start_threshold": config.start_threshold,
            "steps": config.steps,
            "lr": config.lr,
            "batch": config.batch,
            "clips": pool.frames.shape[0],
            "finetune": config.finetune,
            "seed": config.seed,
            "input_size": list(config.input_size),
            "videos": pool.sources,
            "seconds_this_run": round(train_seconds, 1),
            "final_loss": float(np.mean([h["loss"] for h in recent])),
            "final_distillation_error": float(np.mean([h["distill"] for h in recent])),
            "final_mac_fraction": float(np.mean([h["mac_fraction"] for h in recent])),
        },
        measured=measured,
    )
    gates.save(out)
    return gates


# -- evaluation -----------------------------------------------------------------------------------------


def evaluate(
    loaded: LoadedModel,
    model: nn.Module,
    ranges: list[VideoRange],
    input_size: tuple[int, int],
    device: torch.device,
    max_frames: int | None = None,
) -> dict:
    """MAC reduction and fidelity of ``model`` at inference on ``ranges``, against the dense model.

    Each range is one stream (reset at its start, never after), as ``skipconv run`` processes a video.
    Fidelity uses ``pipeline.fidelity`` when present; the distillation error is always recorded.
    """
    from skipconv_cli.engine import reset_stats

    if not ranges:
        return {"frames": 0, "note": "no held-out frames"}
    model.eval()
    dense = loaded.module.to(device).eval()
    spec = loaded.spec
    reference: list[dict] = []
    predicted: list[dict] = []
    errors: list[float] = []
    scales: list[float] | None = None
    per_range = None if max_frames is None else max(1, max_frames // len(ranges))
    executed = dense_macs = 0
    counts: list[int] = []
    for video in ranges:
        reset(model)
        reset_stats(model)
        counts.append(0)
        with torch.no_grad():
            for index, frame in enumerate(video.frames()):
                if per_range is not None and index >= per_range:
                    break
                counts[-1] += 1
                tensor, box = spec.preprocess(frame, input_size)
                tensor = tensor.to(device)
                want = dense(tensor)
                got = model(tensor)
                want_t, got_t = as_tensors(want), as_tensors(got)
                if scales is None:  # one normaliser for the whole evaluation: the first dense frame's
                    scales = [channel_variance(t) for t in want_t]
                if index > 0:  # frame 0 is dense in both: no information
                    errors.append(float(distillation_error(spec.task, got_t, want_t, scales)))
                reference.append(spec.postprocess(first_sample(want), box, spec.default_score_threshold))
                predicted.append(spec.postprocess(first_sample(got), box, spec.default_score_threshold))
        stats = report(model)["macs"]
        executed += stats["executed"]
        dense_macs += stats["dense"]
    result = {
        "frames": len(reference),
        "videos": [
            {"input": v.input, "start": v.start, "stop": v.start + n}
            for v, n in zip(ranges, counts, strict=True)
        ],
        "input_size": list(input_size),
        "macs_reduction": dense_macs / executed if executed else 1.0,
        "distillation_error": float(np.mean(errors)) if errors else 0.0,
        "fidelity": None,
    }
    try:
        from skipconv_cli.pipeline.fidelity import fidelity
    except ImportError:
        result["fidelity_note"] = "pipeline.fidelity not available: only the distillation error is recorded"
    else:
        result["fidelity"] = fidelity(spec.task, reference, predicted)
    return result
