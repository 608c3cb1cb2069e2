"""Pre- and post-processing shared by the built-in detectors (YOLOX, NanoDet), as pure functions.

Everything here runs outside ``nn.Module.forward`` (YOLOX/ultralytics' split): the networks return raw
head tensors, and these functions turn a frame into a network input and the raw tensors back into boxes
in frame pixels. One frame's result is ``{"boxes": [[x1, y1, x2, y2, score, class_id], ...]}``, sorted by
score, highest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from skipconv_cli.models.registry import Letterbox

STRIDES: tuple[int, ...] = (8, 16, 32)

# NanoDet's training normalisation, in BGR order (the frames are BGR too).
NANODET_MEAN: tuple[float, float, float] = (103.53, 116.28, 123.675)
NANODET_STD: tuple[float, float, float] = (57.375, 57.12, 58.395)

COCO_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


# --------------------------------------------------------------------------------------------- pre


def _check_input_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"input size must be positive multiples of 32 (height, width), got {size}")
    return height, width


def letterbox(frame: np.ndarray, size: tuple[int, int], pad_value: float) -> tuple[np.ndarray, Letterbox]:
    """Resize ``frame`` keeping its aspect ratio into the top-left of a ``size`` canvas.

    This is YOLOX's ``preproc`` (bilinear resize, ``int`` truncation of the resized size) and also what
    the NanoDet demos do with pad 0. The canvas is uint8 like the frame, so the network sees exactly the
    resized pixels.

    Args:
        frame: BGR uint8 image [H, W, 3].
        size: network input (height, width).
        pad_value: grey level of the unused area.

    Returns:
        The canvas [height, width, 3] uint8 and how frame pixels map onto it.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a BGR frame [H, W, 3], got shape {frame.shape}")
    height, width = _check_input_size(size)
    frame_h, frame_w = frame.shape[:2]
    scale = min(height / frame_h, width / frame_w)
    new_w, new_h = int(frame_w * scale), int(frame_h * scale)
    canvas = np.full((height, width, 3), pad_value, dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    box = Letterbox(
        scale=scale, pad_x=0.0, pad_y=0.0, frame_size=(frame_h, frame_w), input_size=(height, width)
    )
    return canvas, box


def preprocess_yolox(frame: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """YOLOX input: letterbox with pad 114, BGR, 0-255 float, no normalisation -> [1, 3, H, W]."""
    canvas, box = letterbox(frame, size, pad_value=114)
    tensor = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32))
    return tensor.unsqueeze(0), box


def preprocess_nanodet(frame: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """NanoDet input: letterbox with pad 0, BGR, ``(x - mean) / std`` per channel -> [1, 3, H, W]."""
    canvas, box = letterbox(frame, size, pad_value=0)
    mean = np.asarray(NANODET_MEAN, dtype=np.float32)
    std = np.asarray(NANODET_STD, dtype=np.float32)
    normalised = (canvas.astype(np.float32) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1))).unsqueeze(0), box


# ---------------------------------------------------------------------------------------------- decode


def grid_cells(
    input_size: tuple[int, int], strides: Sequence[int] = STRIDES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer cell coordinates (x, y) [A, 2] and their stride [A] for all levels, row-major per level.

    This is the anchor order of both heads: level by level, then row by row.
    """
    height, width = input_size
    cells, cell_strides = [], []
    for stride in strides:
        ys, xs = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride), indexing="ij")
        cells.append(torch.stack((xs.flatten(), ys.flatten()), dim=1))
        cell_strides.append(torch.full((xs.numel(),), float(stride)))
    return torch.cat(cells).float(), torch.cat(cell_strides)


def _squeeze_batch(tensor: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    """Accept one sample with or without a leading batch dimension of 1."""
    if tensor.ndim == ndim + 1 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != ndim:
        raise ValueError(f"{what}: expected one sample of rank {ndim}, got shape {tuple(tensor.shape)}")
    return tensor


def decode_yolox(
    raw: torch.Tensor, input_size: tuple[int, int], strides: Sequence[int] = STRIDES
) -> tuple[torch.Tensor, torch.Tensor]:
    """YOLOX raw output [A, 5 + C] -> boxes [A, 4] (x1, y1, x2, y2 in input pixels), scores [A, C].

    xy = (p + cell) * stride, wh = exp(p) * stride; objectness and classes are already sigmoided by the
    network, and a class score is obj * cls.
    """
    raw = _squeeze_batch(torch.as_tensor(raw), 2, "YOLOX output").float()
    cells, cell_strides = grid_cells(input_size, strides)
    if raw.shape[0] != cells.shape[0]:
        raise ValueError(
            f"YOLOX output has {raw.shape[0]} anchors, input {input_size} gives {cells.shape[0]}"
        )
    centre = (raw[:, :2] + cells) * cell_strides[:, None]
    half_wh = torch.exp(raw[:, 2:4]) * cell_strides[:, None] / 2
    boxes = torch.cat((centre - half_wh, centre + half_wh), dim=1)
    return boxes, raw[:, 4:5] * raw[:, 5:]


def decode_nanodet(
    cls_preds: Sequence[torch.Tensor],
    dis_preds: Sequence[torch.Tensor],
    input_size: tuple[int, int],
    strides: Sequence[int] = STRIDES,
    reg_max: int = 7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NanoDet (GFL) raw outputs per level -> boxes [A, 4] in input pixels, scores [A, C].

    Each box side is an 8-bin distribution over 0..reg_max; its expected value times the stride is the
    distance from the cell centre to that side (left, top, right, bottom). The cell centre is
    ``(i + 0.5) * stride``, as in NanoDet-m's own GFL head (``get_single_level_center_point``) and its
    ncnn demo; NanoDet-Plus later dropped the 0.5, and some third-party ONNX demos use
    ``i * stride + (stride - 1) / 2``, half a pixel off.
    """
    if len(cls_preds) != len(strides) or len(dis_preds) != len(strides):
        raise ValueError(
            f"expected {len(strides)} cls and dis outputs, got {len(cls_preds)}, {len(dis_preds)}"
        )
    scores = torch.cat(
        [_squeeze_batch(torch.as_tensor(c), 2, "NanoDet cls output") for c in cls_preds]
    ).float()
    dis = torch.cat([_squeeze_batch(torch.as_tensor(d), 2, "NanoDet dis output") for d in dis_preds]).float()
    cells, cell_strides = grid_cells(input_size, strides)
    if scores.shape[0] != cells.shape[0] or dis.shape[0] != cells.shape[0]:
        raise ValueError(
            f"NanoDet outputs have {scores.shape[0]} anchors, input {input_size} gives {cells.shape[0]}"
        )
    if dis.shape[1] != 4 * (reg_max + 1):
        raise ValueError(f"NanoDet dis output has {dis.shape[1]} channels, expected {4 * (reg_max + 1)}")
    bins = torch.arange(reg_max + 1, dtype=torch.float32)
    distances = torch.softmax(dis.reshape(-1, 4, reg_max + 1), dim=2) @ bins * cell_strides[:, None]
    centre = (cells + 0.5) * cell_strides[:, None]
    boxes = torch.cat((centre - distances[:, :2], centre + distances[:, 2:]), dim=1)
    return boxes, scores


# ------------------------------------------------------------------------------------------------- NMS


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1y1x2y2 boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms_per_class(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Greedy non-maximum suppression within each class; indices kept, highest score first.

    Boxes of different classes never suppress each other (they are shifted apart by class, the
    "batched NMS" trick), so a person and the bicycle under them both survive.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    if not (len(boxes) == len(scores) == len(classes)):
        raise ValueError(
            f"boxes, scores, classes differ in length: {len(boxes)}, {len(scores)}, {len(classes)}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    offset = (np.abs(boxes).max() + 1.0) * 2.0
    shifted = boxes + (classes.astype(np.float64) * offset)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(shifted[best], shifted[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


# --------------------------------------------------------------------------------------------- select


def boxes_to_frame(boxes: np.ndarray, box: Letterbox) -> np.ndarray:
    """Map x1y1x2y2 boxes from network-input pixels back to frame pixels, clipped to the frame."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    frame_h, frame_w = box.frame_size
    x = np.clip((boxes[:, 0::2] - box.pad_x) / box.scale, 0, frame_w)
    y = np.clip((boxes[:, 1::2] - box.pad_y) / box.scale, 0, frame_h)
    return np.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), axis=1)


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    box: Letterbox,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int = 100,
) -> dict:
    """Best class per anchor, score threshold, class-wise NMS, frame coordinates, output dict.

    Args:
        boxes: [A, 4] x1y1x2y2 in network-input pixels.
        scores: [A, C] class scores in [0, 1].
        box: how the frame was mapped onto the input.
        score_threshold: minimum score of a returned box.
        iou_threshold: boxes of one class overlapping a better one by more than this are dropped.
        max_detections: at most this many boxes, the best ones.

    Returns:
        ``{"boxes": [[x1, y1, x2, y2, score, class_id], ...]}`` in frame pixels, best first; coordinates
        rounded to 0.01 px and scores to 1e-4 (finer digits are float noise between backends).
    """
    best_scores, best_classes = scores.max(dim=1)
    mask = best_scores >= score_threshold
    cand_boxes = boxes[mask].double().numpy()
    cand_scores = best_scores[mask].double().numpy()
    cand_classes = best_classes[mask].numpy()
    keep = nms_per_class(cand_boxes, cand_scores, cand_classes, iou_threshold)[:max_detections]
    frame_boxes = boxes_to_frame(cand_boxes[keep], box)
    return {
        "boxes": [
            [*(round(float(v), 2) for v in xyxy), round(float(s), 4), int(c)]
            for xyxy, s, c in zip(frame_boxes, cand_scores[keep], cand_classes[keep], strict=True)
        ]
    }


def postprocess_yolox(
    raw: torch.Tensor,
    box: Letterbox,
    score_threshold: float,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
) -> dict:
    """YOLOX / light-person raw output of one frame -> ``{"boxes": [...]}`` in frame pixels."""
    boxes, scores = decode_yolox(raw, box.input_size)
    return select_detections(boxes, scores, box, score_threshold, iou_threshold, max_detections)


def postprocess_nanodet(
    raw: Sequence[torch.Tensor],
    box: Letterbox,
    score_threshold: float,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
) -> dict:
    """NanoDet raw outputs of one frame (cls 8/16/32, dis 8/16/32) -> ``{"boxes": [...]}``."""
    if len(raw) != 2 * len(STRIDES):
        raise ValueError(
            f"NanoDet gives {2 * len(STRIDES)} outputs (cls then dis per stride), got {len(raw)}"
        )
    n = len(STRIDES)
    boxes, scores = decode_nanodet(raw[:n], raw[n:], box.input_size)
    return select_detections(boxes, scores, box, score_threshold, iou_threshold, max_detections)
