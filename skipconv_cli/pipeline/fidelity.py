"""Fidelity of a Skip-Conv run: how closely its predictions follow the dense model's on the same frames.

No video comes with labels, so the dense model's predictions are the ground truth. The metrics are the
usual ones, computed against that reference:

* detection: COCO box AP (IoU .50:.05:.95, 101-point interpolated precision, maxDets 100, averaged over the
  classes the reference contains), reimplemented here so the runtime needs no pycocotools; the tests check
  it against pycocotools.
* pose: PCK@alpha as in the paper (a keypoint is correct within alpha x the reference person's size), and
  an OKS-based AP (COCO keypoint AP with the COCO sigmas mapped onto the COCO-18 layout).

All values are in 0..100; the dense model scores 100 against itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# COCO's evaluation grid (pycocotools.cocoeval.Params), written the same way so the floats match.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100
MAX_PERSONS = 20  # COCO keypoint evaluation's maxDets

# COCO keypoint sigmas in COCO-18 order (nose, neck, r_sho, r_elb, r_wri, l_sho, l_elb, l_wri, r_hip,
# r_knee, r_ank, l_hip, l_knee, l_ank, r_eye, l_eye, r_ear, l_ear). COCO has no neck: it gets the
# shoulders' sigma, the closest joint in size and stability.
COCO18_OKS_SIGMAS = (
    np.array([0.26, 0.79, 0.79, 0.72, 0.62, 0.79, 0.72, 0.62, 1.07, 0.87, 0.89, 1.07, 0.87, 0.89, 0.25, 0.25,
              0.35, 0.35])
    / 10.0
)  # fmt: skip

METRICS = {"detect": "AP@[.5:.95]", "pose": "PCK@0.2"}


def fidelity(task: str, reference: list[dict], predicted: list[dict]) -> dict:
    """The task's headline fidelity of ``predicted`` against ``reference``: ``{"metric", "value"}``.

    Detection: COCO AP@[.5:.95]; pose: PCK@0.2. Both 0..100.
    """
    if task == "detect":
        return {"metric": METRICS["detect"], "value": detection_ap(reference, predicted)["AP"]}
    if task == "pose":
        return {"metric": METRICS["pose"], "value": pose_pck(reference, predicted, alpha=0.2)}
    raise ValueError(f"task must be one of {', '.join(METRICS)}; got {task!r}")


# -- detection ---------------------------------------------------------------------------------------


def detection_ap(reference: list[dict], predicted: list[dict]) -> dict[str, float]:
    """COCO box AP of ``predicted`` with the ``reference`` boxes taken as ground truth.

    Args:
        reference: one dict per frame, ``{"boxes": [[x1, y1, x2, y2, score, class], ...]}`` (scores ignored).
        predicted: the same frames, same format.

    Returns:
        ``{"AP": AP@[.5:.95], "AP50": AP@.5}`` in 0..100. Classes only the prediction contains are not
        scored (COCO averages over the ground truth's classes). When the reference has no box at all,
        AP is undefined in COCO; here it is 100 if the prediction has none either, else 0.
    """
    _check_lengths(reference, predicted)
    ref = [_boxes_array(frame, "reference") for frame in reference]
    pred = [_boxes_array(frame, "predicted") for frame in predicted]
    classes = sorted({int(c) for boxes in ref for c in boxes[:, 5]})
    if not classes:
        empty = all(len(b) == 0 for b in pred)
        return {"AP": 100.0 if empty else 0.0, "AP50": 100.0 if empty else 0.0}
    precision = []
    for cls in classes:
        images = []
        for gt, dt in zip(ref, pred, strict=True):
            gt_boxes = gt[gt[:, 5] == cls, :4]
            dt_c = dt[dt[:, 5] == cls]
            order = np.argsort(-dt_c[:, 4], kind="mergesort")[:MAX_DETECTIONS]
            dt_c = dt_c[order]
            images.append((len(gt_boxes), dt_c[:, 4], box_iou_xyxy(dt_c[:, :4], gt_boxes)))
        precision.append(_interpolated_precision(images))
    p = np.stack(precision)  # [classes, iou thresholds, recall thresholds]
    return {"AP": 100.0 * float(p.mean()), "AP50": 100.0 * float(p[:, 0].mean())}


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1y1x2y2 boxes, areas without the +1 (as COCO's maskUtils.iou)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _boxes_array(frame: dict, which: str) -> np.ndarray:
    boxes = frame.get("boxes") if isinstance(frame, dict) else None
    if boxes is None:
        raise ValueError(f"{which} frames must be dicts with 'boxes' (detection predictions)")
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 6) if len(boxes) else np.zeros((0, 6))
    return arr


# -- COCO accumulation, shared by box AP and OKS AP -----------------------------------------------------

# One image for one class: (number of ground-truth objects, detection scores sorted best first,
# similarity matrix [detections, ground truth] -- IoU or OKS).
_Image = tuple[int, np.ndarray, np.ndarray]


def _interpolated_precision(images: Sequence[_Image]) -> np.ndarray:
    """COCO's precision [iou thresholds, recall thresholds] for one class (pycocotools' evaluateImg +
    accumulate for area "all": greedy matching per image in score order, each detection taking the best
    still-unmatched ground truth at or above the threshold; precision made monotone, then sampled at 101
    recall points). A class with no ground truth gives -1 in COCO; callers only pass classes that have some.
    """
    num_gt = sum(n for n, _, _ in images)
    scores, matched = [], []
    for n_gt, det_scores, sim in images:
        scores.append(det_scores)
        matched.append(
            _greedy_match(sim, n_gt) if len(det_scores) else np.zeros((len(IOU_THRESHOLDS), 0), bool)
        )
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    order = np.argsort(-all_scores, kind="mergesort")
    tps = np.concatenate(matched, axis=1)[:, order]
    tp_sum = np.cumsum(tps, axis=1).astype(float)
    fp_sum = np.cumsum(~tps, axis=1).astype(float)
    out = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
    for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
        if not len(tp):
            continue
        recall = tp / num_gt
        precision = tp / (fp + tp + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope, right to left
        inds = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        valid = inds < len(precision)
        out[t, valid] = precision[inds[valid]]
    return out


def _greedy_match(sim: np.ndarray, num_gt: int) -> np.ndarray:
    """[iou thresholds, detections] bool: whether each detection (best first) matched a ground truth."""
    matched = np.zeros((len(IOU_THRESHOLDS), sim.shape[0]), bool)
    if num_gt == 0:
        return matched
    for t, thr in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(num_gt, bool)
        for d in range(sim.shape[0]):
            # COCO: best similarity among free ground truth, at least min(thr, 1 - 1e-10); on ties COCO
            # keeps the last one, hence the argmax over the reversed row.
            candidates = np.where(taken, -1.0, sim[d])
            g = num_gt - 1 - int(np.argmax(candidates[::-1]))
            if candidates[g] >= min(thr, 1 - 1e-10):
                taken[g] = True
                matched[t, d] = True
    return matched


# -- pose --------------------------------------------------------------------------------------------


def pose_pck(reference: list[dict], predicted: list[dict], alpha: float = 0.2) -> float:
    """PCK@alpha of ``predicted`` persons against the ``reference`` persons, 0..100.

    Per frame, reference and predicted persons are paired greedily (most correct keypoints first, then
    smaller mean distance); a reference keypoint (score > 0) is correct when its partner's keypoint is
    present and within ``alpha`` x the reference person's size (the longer side of the box around its
    present keypoints, as in the paper). Keypoints of unpaired reference persons count as wrong; extra
    predicted persons are not penalised (that is what :func:`pose_oks_ap` is for). With no reference
    keypoint at all, PCK is 100 if nothing was predicted either, else 0.
    """
    _check_lengths(reference, predicted)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    correct = total = 0
    any_predicted = False
    for ref_frame, pred_frame in zip(reference, predicted, strict=True):
        ref = _keypoints_array(ref_frame, "reference")
        pred = _keypoints_array(pred_frame, "predicted")
        any_predicted |= bool(len(pred))
        visible = ref[:, :, 2] > 0  # [R, K]
        total += int(visible.sum())
        if not len(ref) or not len(pred):
            continue
        size = _person_size(ref)  # [R]
        dist = np.linalg.norm(ref[:, None, :, :2] - pred[None, :, :, :2], axis=-1)  # [R, P, K]
        ok = (dist <= alpha * size[:, None, None]) & visible[:, None, :] & (pred[None, :, :, 2] > 0)
        hits = ok.sum(-1)  # [R, P]
        mean_dist = np.where(visible[:, None, :], dist, 0).sum(-1) / np.maximum(visible.sum(-1), 1)[:, None]
        pairs = sorted(
            (
                (int(hits[r, p]), -float(mean_dist[r, p]), r, p)
                for r in range(len(ref))
                for p in range(len(pred))
            ),
            reverse=True,
        )
        used_r, used_p = set(), set()
        for h, _, r, p in pairs:
            if r in used_r or p in used_p or h == 0:
                continue
            used_r.add(r)
            used_p.add(p)
            correct += h
    if total == 0:
        return 0.0 if any_predicted else 100.0
    return 100.0 * correct / total


def pose_oks_ap(reference: list[dict], predicted: list[dict]) -> dict[str, float]:
    """COCO keypoint AP (OKS .50:.05:.95, maxDets 20) of ``predicted`` against the ``reference`` persons.

    OKS uses :data:`COCO18_OKS_SIGMAS` and, for the object scale, the area of the box around the reference
    person's present keypoints (COCO uses the segmentation area, which we do not have). Reference persons
    without any keypoint are ignored, as COCO ignores ``num_keypoints == 0``. Returns ``{"AP", "AP50"}``;
    with no reference person: 100 if nothing was predicted, else 0.
    """
    _check_lengths(reference, predicted)
    images = []
    any_predicted = False
    for ref_frame, pred_frame in zip(reference, predicted, strict=True):
        ref = _keypoints_array(ref_frame, "reference")
        ref = ref[(ref[:, :, 2] > 0).any(-1)] if len(ref) else ref
        pred = _keypoints_array(pred_frame, "predicted")
        scores = np.asarray([p.get("score", 0.0) for p in pred_frame["persons"]], dtype=np.float64)
        any_predicted |= bool(len(pred))
        order = np.argsort(-scores, kind="mergesort")[:MAX_PERSONS]
        pred, scores = pred[order], scores[order]
        images.append((len(ref), scores, _oks(pred, ref)))
    if sum(n for n, _, _ in images) == 0:
        value = 0.0 if any_predicted else 100.0
        return {"AP": value, "AP50": value}
    p = _interpolated_precision(images)
    return {"AP": 100.0 * float(p.mean()), "AP50": 100.0 * float(p[0].mean())}


def _oks(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """OKS matrix [predicted, reference] (pycocotools' computeOks, area = keypoint box area)."""
    if not len(pred) or not len(ref):
        return np.zeros((len(pred), len(ref)))
    var = (2 * COCO18_OKS_SIGMAS) ** 2
    visible = ref[:, :, 2] > 0  # [R, K]
    lo = np.where(visible[..., None], ref[:, :, :2], np.inf).min(1)
    hi = np.where(visible[..., None], ref[:, :, :2], -np.inf).max(1)
    area = np.prod(hi - lo, axis=-1)  # [R]
    d2 = ((pred[:, None, :, :2] - ref[None, :, :, :2]) ** 2).sum(-1)  # [P, R, K]
    e = d2 / var / (area[None, :, None] + np.spacing(1)) / 2
    sim = np.exp(-e) * visible[None]
    return sim.sum(-1) / visible.sum(-1)[None]


def _person_size(ref: np.ndarray) -> np.ndarray:
    """Longer side of the box around each person's present keypoints [R] (0 with fewer than two)."""
    visible = ref[:, :, 2] > 0
    lo = np.where(visible[..., None], ref[:, :, :2], np.inf).min(1)
    hi = np.where(visible[..., None], ref[:, :, :2], -np.inf).max(1)
    size = (hi - lo).max(-1)
    return np.where(np.isfinite(size), size, 0.0)


def _keypoints_array(frame: dict, which: str) -> np.ndarray:
    persons = frame.get("persons") if isinstance(frame, dict) else None
    if persons is None:
        raise ValueError(f"{which} frames must be dicts with 'persons' (pose predictions)")
    if not persons:
        return np.zeros((0, len(COCO18_OKS_SIGMAS), 3))
    arr = np.asarray([p["keypoints"] for p in persons], dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (len(COCO18_OKS_SIGMAS), 3):
        raise ValueError(f"{which} persons must have 18 keypoints [x, y, score]; got shape {arr.shape[1:]}")
    return arr


def _check_lengths(reference: list, predicted: list) -> None:
    if len(reference) != len(predicted):
        raise ValueError(f"reference has {len(reference)} frames, predicted {len(predicted)}")
