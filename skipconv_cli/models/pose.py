"""Pose pre- and post-processing as pure functions: letterbox in, persons with COCO-18 keypoints out.

Why here and not in ``forward``: decoding is data-dependent Python (peaks, graph matching) that the
skip-convolution engine must not touch, and keeping it pure makes it testable on synthetic maps.

OpenPose decoding follows tf-pose-estimation's ``pafprocess`` (its COCO pairs, PAF channels and
thresholds), cleaned up: heatmaps and PAFs are upsampled from stride 8 to a finer grid, heatmaps smoothed
with a Gaussian, peaks are local maxima above a threshold, each of the 19 limbs scores every candidate
pair by a line integral over its PAF, limbs are matched greedily, and limbs sharing a keypoint are grouped
into persons.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from skipconv_cli.models.registry import Letterbox

COCO18_KEYPOINTS: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip

# tf-pose CocoPairs: the 19 limbs whose PAFs the network predicts (keypoint a -> keypoint b).
COCO18_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
# tf-pose CocoPairsNetwork: for each limb, its (x, y) channels within the 38 PAF channels (output 19 + c).
COCO18_LIMB_PAF_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
# What to draw: the last two limbs (shoulder-ear) only help grouping; tf-pose does not render them.
COCO18_SKELETON: tuple[tuple[int, int], ...] = COCO18_LIMBS[:-2]

COCO17_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# COCO-18 index -> COCO-17 index (-1: the neck, which COCO-17 lacks; it is the mid-shoulder point).
COCO18_FROM_COCO17: tuple[int, ...] = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)

NUM_KEYPOINTS = len(COCO18_KEYPOINTS)


# ---------------------------------------------------------------------------------------------- preprocess
def letterbox(
    frame: np.ndarray, size: tuple[int, int], pad_value: float = 128.0
) -> tuple[np.ndarray, Letterbox]:
    """Resize ``frame`` (H, W, 3) keeping its aspect ratio, centred on a canvas of ``size`` = (height, width).

    Returns the float32 canvas (H, W, 3) and the mapping ``input = frame * scale + (pad_x, pad_y)``.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3), got shape {frame.shape}")
    fh, fw = frame.shape[:2]
    th, tw = size
    scale = min(th / fh, tw / fw)
    nh, nw = max(1, round(fh * scale)), max(1, round(fw * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (nw, nh), interpolation=interp)
    pad_x, pad_y = (tw - nw) // 2, (th - nh) // 2
    canvas = np.full((th, tw, 3), pad_value, dtype=np.float32)
    canvas[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return canvas, Letterbox(
        scale=scale, pad_x=float(pad_x), pad_y=float(pad_y), frame_size=(fh, fw), input_size=(th, tw)
    )


def preprocess_openpose(frame: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """tf-pose input: centred letterbox on 128 grey, BGR 0-255 float, no mean/std -> [1, 3, H, W]."""
    canvas, box = letterbox(frame, size, pad_value=128.0)
    return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None], box


IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def preprocess_imagenet(frame: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """HRNet-style input: centred letterbox, RGB, ImageNet mean/std (padding is the mean, i.e. 0 after)."""
    canvas, box = letterbox(frame, size, pad_value=0.0)
    rgb = canvas[..., ::-1]
    norm = (rgb - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
    h0, w0 = int(box.pad_y), int(box.pad_x)
    h1, w1 = size[0] - h0, size[1] - w0
    mask = np.zeros(size, dtype=bool)
    mask[h0:h1, w0:w1] = True
    norm[~mask] = 0.0
    return torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1), dtype=np.float32))[None], box


# ---------------------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class OpenPoseParams:
    """Decoding settings; defaults follow tf-pose's ``pafprocess`` (thresholds) at a stride-4 grid.

    Attributes:
        stride: grid stride (input pixels) heatmaps/PAFs are upsampled to before decoding; 4 is a good
            speed/precision trade-off (tf-pose uses 2).
        sigma: Gaussian smoothing of the heatmaps, in input pixels (tf-pose: 3 at stride 2).
        peak_threshold: a peak's smoothed heat must exceed this.
        paf_samples: points sampled on the segment between two candidate keypoints.
        paf_sample_min: a sample counts as aligned when its PAF . direction exceeds this.
        paf_aligned_ratio: a limb needs more than this share of aligned samples.
        min_parts: persons with fewer keypoints are dropped.
    """

    stride: int = 4
    sigma: float = 6.0
    peak_threshold: float = 0.1
    paf_samples: int = 10
    paf_sample_min: float = 0.05
    paf_aligned_ratio: float = 0.8
    min_parts: int = 4


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [C, h, w] maps to [C, H, W] (half-pixel centres, as a grid of cell centres)."""
    if maps.shape[1:] == tuple(size):
        return maps.astype(np.float32, copy=False)
    hwc = np.ascontiguousarray(maps.transpose(1, 2, 0), dtype=np.float32)
    out = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(size[0], size[1], -1).transpose(2, 0, 1)


def smooth_heatmaps(heatmaps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each [C, H, W] channel; it suppresses the double peaks of upsampled blobs."""
    if sigma <= 0:
        return heatmaps
    hwc = np.ascontiguousarray(heatmaps.transpose(1, 2, 0), dtype=np.float32)
    out = cv2.GaussianBlur(hwc, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return out.reshape(hwc.shape).transpose(2, 0, 1)


def find_peaks(heatmaps: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Local maxima (3x3 max-pool NMS) above ``threshold`` of each [K, H, W] channel.

    A blob centred between grid points gives a plateau of equal maxima, so maxima within one cell of a
    stronger (or earlier equal) one are dropped; each survivor is refined to the heat-weighted centroid of
    its 3x3 neighbourhood, which puts plateau peaks back between the grid points.

    Returns one float32 array [n, 3] per channel: (x, y, heat) in grid coordinates, strongest first.
    """
    k_count, h, w = heatmaps.shape
    hwc = np.ascontiguousarray(heatmaps.transpose(1, 2, 0), dtype=np.float32)
    pooled = cv2.dilate(hwc, np.ones((3, 3), np.uint8)).reshape(hwc.shape).transpose(2, 0, 1)
    padded = np.pad(heatmaps, ((0, 0), (1, 1), (1, 1)))
    offsets = np.array([-1.0, 0.0, 1.0], np.float32)
    peaks = []
    for k in range(k_count):
        ys, xs = np.nonzero((heatmaps[k] >= pooled[k]) & (heatmaps[k] > threshold))
        order = np.argsort(-heatmaps[k, ys, xs], kind="stable")
        kept: list[tuple[float, float, float]] = []
        taken: list[tuple[int, int]] = []
        for y, x in zip(ys[order].tolist(), xs[order].tolist(), strict=True):
            if any(abs(x - tx) <= 1 and abs(y - ty) <= 1 for tx, ty in taken):
                continue
            taken.append((x, y))
            window = np.maximum(padded[k, y : y + 3, x : x + 3], 0.0)
            total = float(window.sum())
            dx = float(window.sum(axis=0) @ offsets) / total
            dy = float(window.sum(axis=1) @ offsets) / total
            kept.append((x + dx, y + dy, float(heatmaps[k, y, x])))
        peaks.append(np.array(kept, np.float32).reshape(-1, 3))
    return peaks


def score_limb_candidates(
    peaks_a: np.ndarray, peaks_b: np.ndarray, paf_x: np.ndarray, paf_y: np.ndarray, params: OpenPoseParams
) -> np.ndarray:
    """Line-integral score of every (a, b) candidate pair of one limb; returns [m, 3] rows (ia, ib, score).

    The score is the mean of PAF . unit(b - a) over ``paf_samples`` points of the segment, minus a penalty
    for limbs longer than half the map height (tf-pose's criterion 2); a pair is kept only when most
    samples are aligned (criterion 1) and the score is positive.
    """
    if len(peaks_a) == 0 or len(peaks_b) == 0:
        return np.zeros((0, 3), np.float32)
    h, w = paf_x.shape
    a = peaks_a[:, None, :2]
    vec = peaks_b[None, :, :2] - a  # [na, nb, 2]
    norm = np.linalg.norm(vec, axis=-1)
    unit = vec / np.maximum(norm, 1e-6)[..., None]
    t = np.linspace(0.0, 1.0, params.paf_samples, dtype=np.float32)
    pts = a[:, :, None, :] + vec[:, :, None, :] * t[None, None, :, None]  # [na, nb, s, 2]
    xs = np.clip(np.floor(pts[..., 0] + 0.5).astype(np.int64), 0, w - 1)
    ys = np.clip(np.floor(pts[..., 1] + 0.5).astype(np.int64), 0, h - 1)
    dots = paf_x[ys, xs] * unit[..., None, 0] + paf_y[ys, xs] * unit[..., None, 1]
    aligned = (dots > params.paf_sample_min).sum(axis=-1)
    score = dots.mean(axis=-1) + np.minimum(0.0, 0.5 * h / np.maximum(norm, 1e-6) - 1.0)
    keep = (aligned > params.paf_aligned_ratio * params.paf_samples) & (score > 0) & (norm > 1e-6)
    ia, ib = np.nonzero(keep)
    return np.stack([ia, ib, score[ia, ib]], axis=1).astype(np.float32)


def assign_limbs(candidates: np.ndarray) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: best-scoring pairs first, each keypoint used at most once per limb."""
    used_a: set[int] = set()
    used_b: set[int] = set()
    matches = []
    for ia, ib, score in candidates[np.argsort(-candidates[:, 2], kind="stable")] if len(candidates) else []:
        ia, ib = int(ia), int(ib)
        if ia in used_a or ib in used_b:
            continue
        used_a.add(ia)
        used_b.add(ib)
        matches.append((ia, ib, float(score)))
    return matches


@dataclass
class _Person:
    parts: np.ndarray  # [K] global peak index or -1
    score: float  # sum of peak heats and limb scores
    count: int  # keypoints found


def group_persons(
    peaks: list[np.ndarray],
    connections: list[list[tuple[int, int, float]]],
    limbs: tuple[tuple[int, int], ...] = COCO18_LIMBS,
    min_parts: int = 4,
) -> list[tuple[np.ndarray, float]]:
    """Join matched limbs that share a keypoint into persons.

    Args:
        peaks: per keypoint type, [n, 3] (x, y, heat).
        connections: per limb, (index in peaks[a], index in peaks[b], limb score).
        limbs: keypoint pairs, same order as ``connections``; the last two (shoulder-ear) may only extend a
            person, never start one (as in OpenPose).
        min_parts: persons with fewer keypoints are dropped.

    Returns:
        per person, keypoints [K, 3] (x, y, heat; zeros when missing) and the score
        ``(sum of heats + sum of limb scores) / keypoints``.
    """
    num_parts = len(peaks)
    offsets = np.cumsum([0] + [len(p) for p in peaks])
    flat = (
        np.concatenate([p for p in peaks if len(p)], axis=0) if offsets[-1] else np.zeros((0, 3), np.float32)
    )
    persons: list[_Person] = []
    for k, ((pa, pb), conns) in enumerate(zip(limbs, connections, strict=True)):
        for ia, ib, limb_score in conns:
            ga, gb = int(offsets[pa] + ia), int(offsets[pb] + ib)
            found = [p for p in persons if p.parts[pa] == ga or p.parts[pb] == gb]
            if len(found) == 2:
                p1, p2 = found
                if not np.any((p1.parts >= 0) & (p2.parts >= 0)):  # disjoint: this limb joins them
                    p1.parts = np.where(p1.parts >= 0, p1.parts, p2.parts)
                    p1.score += p2.score + limb_score
                    p1.count += p2.count
                    # By identity: _Person compares numpy arrays, so list.remove's == would raise.
                    persons = [p for p in persons if p is not p2]
                # Otherwise the limb links two people who both have this keypoint type: a conflict that
                # OpenPose resolves by sharing a peak between persons; dropping the limb keeps them apart.
                continue
            if len(found) == 1:
                p = found[0]
                added = False
                for part, g in ((pa, ga), (pb, gb)):
                    if p.parts[part] < 0:
                        p.parts[part] = g
                        p.score += float(flat[g, 2])
                        p.count += 1
                        added = True
                if added:
                    p.score += limb_score
            elif not found and k < len(limbs) - 2:
                parts = np.full(num_parts, -1, dtype=np.int64)
                parts[pa], parts[pb] = ga, gb
                persons.append(_Person(parts, float(flat[ga, 2] + flat[gb, 2]) + limb_score, 2))
    out = []
    for p in persons:
        if p.count < min_parts:
            continue
        kps = np.zeros((num_parts, 3), np.float32)
        present = p.parts >= 0
        kps[present] = flat[p.parts[present]]
        out.append((kps, p.score / p.count))
    return out


def decode_openpose(
    heatmaps: np.ndarray,
    pafs: np.ndarray,
    input_size: tuple[int, int],
    params: OpenPoseParams = OpenPoseParams(),
) -> list[tuple[np.ndarray, float]]:
    """Persons from raw heatmaps [>=18, h, w] and PAFs [38, h, w]; keypoints in network-input pixels.

    Maps are taken to cover the input with cells centred at ``(i + 0.5) * stride - 0.5`` (the cell-average
    convention of tf-pose's training targets).
    """
    grid = (max(1, round(input_size[0] / params.stride)), max(1, round(input_size[1] / params.stride)))
    heat = smooth_heatmaps(upsample_maps(heatmaps[:NUM_KEYPOINTS], grid), params.sigma / params.stride)
    paf = upsample_maps(pafs, grid)
    peaks = find_peaks(heat, params.peak_threshold)
    connections = []
    for (pa, pb), (cx, cy) in zip(COCO18_LIMBS, COCO18_LIMB_PAF_CHANNELS, strict=True):
        candidates = score_limb_candidates(peaks[pa], peaks[pb], paf[cx], paf[cy], params)
        connections.append(assign_limbs(candidates))
    persons = group_persons(peaks, connections, COCO18_LIMBS, params.min_parts)
    sy, sx = input_size[0] / grid[0], input_size[1] / grid[1]
    for kps, _ in persons:
        present = kps[:, 2] > 0
        kps[present, 0] = (kps[present, 0] + 0.5) * sx - 0.5
        kps[present, 1] = (kps[present, 1] + 0.5) * sy - 0.5
    return persons


def to_frame(keypoints: np.ndarray, box: Letterbox) -> list[list[float]]:
    """Network-input keypoints [K, 3] -> frame pixels, clipped to the frame; missing stay [0, 0, 0]."""
    fh, fw = box.frame_size
    out = []
    for x, y, s in keypoints.tolist():
        if s <= 0:
            out.append([0.0, 0.0, 0.0])
            continue
        fx = min(max((x - box.pad_x) / box.scale, 0.0), fw - 1.0)
        fy = min(max((y - box.pad_y) / box.scale, 0.0), fh - 1.0)
        out.append([fx, fy, float(s)])
    return out


def _as_chw(raw: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = raw.detach().float().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, np.float32)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"postprocess takes one sample, got a batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected raw maps [C, h, w], got shape {arr.shape}")
    return arr


def postprocess_openpose(
    raw: torch.Tensor | np.ndarray,
    box: Letterbox,
    score_threshold: float,
    params: OpenPoseParams = OpenPoseParams(),
) -> dict:
    """tf-pose output [57, h, w] (or [1, 57, h, w]) -> ``{"persons": [...]}`` in frame pixels.

    ``score_threshold`` is the minimum person score (mean of its keypoint heats and limb scores; tf-pose
    uses 0.4). Persons are sorted by score.
    """
    maps = _as_chw(raw)
    if maps.shape[0] != NUM_KEYPOINTS + 1 + 2 * len(COCO18_LIMBS):
        raise ValueError(f"expected 57 OpenPose channels, got {maps.shape[0]}")
    stride = 8
    input_size = (maps.shape[1] * stride, maps.shape[2] * stride)
    persons = decode_openpose(maps[: NUM_KEYPOINTS + 1], maps[NUM_KEYPOINTS + 1 :], input_size, params)
    persons = sorted((p for p in persons if p[1] >= score_threshold), key=lambda p: -p[1])
    return {"persons": [{"keypoints": to_frame(kps, box), "score": float(score)} for kps, score in persons]}


def postprocess_heatmap_argmax(
    raw: torch.Tensor | np.ndarray, box: Letterbox, score_threshold: float
) -> dict:
    """Single-person COCO-17 heatmaps [17, h, w] -> one COCO-18 person by per-channel argmax.

    For the top-down HRNet run on a whole frame (benchmarking): keypoints scoring below ``score_threshold``
    are reported missing; the neck is the mid-shoulder point when both shoulders are present. The person
    score is the mean heat of the keypoints found; no person when none is found.
    """
    maps = _as_chw(raw)
    if maps.shape[0] != len(COCO17_KEYPOINTS):
        raise ValueError(f"expected 17 COCO heatmaps, got {maps.shape[0]}")
    k, h, w = maps.shape
    flat = maps.reshape(k, -1)
    idx = flat.argmax(axis=1)
    score = flat[np.arange(k), idx]
    # Input size is inferred from the stride-4 output; cells are centred at (i + 0.5) * 4 - 0.5.
    xs = (idx % w + 0.5) * 4 - 0.5
    ys = (idx // w + 0.5) * 4 - 0.5
    kps17 = np.stack([xs, ys, np.where(score >= score_threshold, np.maximum(score, 1e-6), 0.0)], axis=1)
    kps18 = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    for i18, i17 in enumerate(COCO18_FROM_COCO17):
        if i17 >= 0:
            kps18[i18] = kps17[i17]
    r_sho, l_sho = kps18[2], kps18[5]
    if r_sho[2] > 0 and l_sho[2] > 0:
        kps18[1] = [(r_sho[0] + l_sho[0]) / 2, (r_sho[1] + l_sho[1]) / 2, min(r_sho[2], l_sho[2])]
    found = kps18[:, 2] > 0
    if not found.any():
        return {"persons": []}
    return {"persons": [{"keypoints": to_frame(kps18, box), "score": float(kps18[found, 2].mean())}]}
