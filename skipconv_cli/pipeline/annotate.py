"""Drawing predictions on frames: boxes, skeletons, the skip-mask heatmap and a text HUD.

Every function returns a new BGR uint8 frame and leaves its input untouched, since the caller may still hold
the frame (for instance as the reference frame of a skip-convolution). The formats are those of the models'
``postprocess`` (see :class:`skipconv_cli.models.registry.ModelSpec`): boxes ``[x1, y1, x2, y2, score,
class]`` and persons ``{"keypoints": [[x, y, score], ...], "score": s}`` in frame pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def color_for(index: int) -> tuple[int, int, int]:
    """A stable, well-separated BGR colour per class or limb index (golden-ratio hue steps)."""
    hue = int((index * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _scale(frame: np.ndarray) -> tuple[float, int]:
    """Font scale and line thickness that stay legible from 320 px to 4K frames."""
    s = max(frame.shape[:2]) / 800.0
    return max(0.4, 0.5 * s), max(1, round(2 * s))


def _label(img: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    """Text on a filled box of ``color``, placed above (x, y) or below it when there is no room."""
    font_scale, thickness = _scale(img)
    text_thickness = max(1, thickness - 1)
    (tw, th), baseline = cv2.getTextSize(text, _FONT, font_scale, text_thickness)
    top = y - th - baseline - 2
    if top < 0:
        top = y
    cv2.rectangle(img, (x, top), (x + tw + 4, top + th + baseline + 2), color, cv2.FILLED)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(img, text, (x + 2, top + th + 1), _FONT, font_scale, ink, text_thickness, cv2.LINE_AA)


def draw_boxes(frame: np.ndarray, boxes: Sequence[Sequence[float]], labels: Sequence[str] = ()) -> np.ndarray:
    """Draw detection boxes ``[x1, y1, x2, y2, score, class]`` with "label score" tags.

    Args:
        frame: BGR uint8 [H, W, 3].
        boxes: one row per detection, frame pixels; ``class`` indexes ``labels``.
        labels: class names; a class outside it is shown by its number.
    """
    out = frame.copy()
    _, thickness = _scale(out)
    for box in boxes:
        x1, y1, x2, y2, score, cls = (float(v) for v in box[:6])
        c = int(cls)
        color = color_for(c)
        p1, p2 = (round(x1), round(y1)), (round(x2), round(y2))
        cv2.rectangle(out, p1, p2, color, thickness, cv2.LINE_AA)
        name = labels[c] if 0 <= c < len(labels) else str(c)
        _label(out, f"{name} {score:.2f}", max(0, p1[0]), max(0, p1[1]), color)
    return out


def draw_persons(
    frame: np.ndarray,
    persons: Sequence[dict],
    limbs: Sequence[tuple[int, int]],
    min_score: float = 0.0,
) -> np.ndarray:
    """Draw skeletons: a line per limb whose two keypoints are present, and a dot per keypoint.

    Args:
        frame: BGR uint8 [H, W, 3].
        persons: ``{"keypoints": [[x, y, score], ...], "score": s}`` per person, frame pixels; a missing
            keypoint has score <= ``min_score``, or is None / NaN.
        limbs: pairs of keypoint indices to join (the pose model defines its skeleton).
        min_score: keypoints at or below this score are not drawn.
    """
    out = frame.copy()
    _, thickness = _scale(out)
    radius = thickness + 2
    for person in persons:
        points = [_point(kp, min_score) for kp in person.get("keypoints", [])]
        for li, (a, b) in enumerate(limbs):
            if a < len(points) and b < len(points) and points[a] and points[b]:
                cv2.line(out, points[a], points[b], color_for(li), thickness + 1, cv2.LINE_AA)
        for ki, p in enumerate(points):
            if p:
                cv2.circle(out, p, radius, color_for(ki), cv2.FILLED, cv2.LINE_AA)
                cv2.circle(out, p, radius, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _point(kp: Sequence[float] | None, min_score: float) -> tuple[int, int] | None:
    if kp is None or len(kp) < 2:
        return None
    x, y = kp[0], kp[1]
    score = kp[2] if len(kp) > 2 else 1.0
    if x is None or y is None or score is None:
        return None
    if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(score)) or score <= min_score:
        return None
    return round(float(x)), round(float(y))


def overlay_mask(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap of ``mask`` (where the network computed, 0..1) over the frame where it is non-zero.

    The mask may have any resolution (e.g. a layer's feature map); it is resized with nearest neighbour so
    the computed cells stay visible as blocks.

    Args:
        frame: BGR uint8 [H, W, 3].
        mask: float [h, w] in 0..1 (values outside are clipped).
        alpha: weight of the heatmap in the blend.
    """
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [h, w], got shape {m.shape}")
    h, w = frame.shape[:2]
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    m = np.nan_to_num(m, nan=0.0)
    heat = cv2.applyColorMap((np.clip(m, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(frame, 1.0 - alpha, heat, alpha, 0.0)
    # Where nothing was computed the frame is shown as it is, so skipped regions read as "untouched".
    return np.where((m > 0)[..., None], blended, frame)


def draw_hud(frame: np.ndarray, text_lines: Sequence[str]) -> np.ndarray:
    """Write lines of text (fps, MAC savings, …) on a dark translucent panel in the top-left corner."""
    out = frame.copy()
    lines = [str(t) for t in text_lines]
    if not lines:
        return out
    font_scale, thickness = _scale(out)
    text_thickness = max(1, thickness - 1)
    sizes = [cv2.getTextSize(t, _FONT, font_scale, text_thickness) for t in lines]
    line_h = max(th + baseline for (_, th), baseline in sizes) + 4
    width = max(tw for (tw, _), _ in sizes) + 12
    height = line_h * len(lines) + 8
    h, w = out.shape[:2]
    x2, y2 = min(w, 4 + width), min(h, 4 + height)
    panel = out[4:y2, 4:x2]
    out[4:y2, 4:x2] = (panel * 0.4).astype(np.uint8)
    for i, text in enumerate(lines):
        y = 4 + 4 + line_h * (i + 1) - 4
        cv2.putText(out, text, (10, y), _FONT, font_scale, (255, 255, 255), text_thickness, cv2.LINE_AA)
    return out
