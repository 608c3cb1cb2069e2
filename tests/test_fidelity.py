"""Fidelity metrics: COCO box AP checked against pycocotools, PCK and OKS AP on synthetic persons."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from skipconv_cli.pipeline.fidelity import (
    COCO18_OKS_SIGMAS,
    detection_ap,
    fidelity,
    pose_oks_ap,
    pose_pck,
)


def random_frames(rng: np.random.Generator, frames: int, classes: int = 3) -> list[dict]:
    out = []
    for _ in range(frames):
        boxes = []
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(5, 150, 2)
            boxes.append([x, y, x + w, y + h, float(rng.uniform(0.3, 1.0)), int(rng.integers(0, classes))])
        out.append({"boxes": boxes})
    return out


def perturb(rng: np.random.Generator, frames: list[dict], jitter: float) -> list[dict]:
    """Moved boxes, new scores, some dropped, some extra: what a lossy run does to detections."""
    out = []
    for frame in frames:
        boxes = []
        for x1, y1, x2, y2, _, c in frame["boxes"]:
            if rng.uniform() < 0.15:
                continue
            dx, dy, dw, dh = rng.normal(0, jitter, 4)
            # Keep boxes valid (x2 > x1): real predictions never have negative sides.
            x2n, y2n = max(x2 + dx + dw, x1 + dx + 1), max(y2 + dy + dh, y1 + dy + 1)
            boxes.append([x1 + dx, y1 + dy, x2n, y2n, float(rng.uniform(0.3, 1)), c])
        if rng.uniform() < 0.3:
            boxes += random_frames(rng, 1)[0]["boxes"][:1]
        out.append({"boxes": boxes})
    return out


def cocotools_ap(reference: list[dict], predicted: list[dict]) -> tuple[float, float]:
    """The same AP from pycocotools (a dev-only dependency)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1} for i in range(len(reference))]
    classes = sorted({int(b[5]) for f in reference for b in f["boxes"]})
    anns, dets = [], []
    for i, (ref, pred) in enumerate(zip(reference, predicted, strict=True)):
        for x1, y1, x2, y2, _, c in ref["boxes"]:
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c),
                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        for x1, y1, x2, y2, s, c in pred["boxes"]:
            dets.append(
                {"image_id": i + 1, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in classes]}
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * ev.stats[0], 100 * ev.stats[1]


def test_identical_detections_score_100() -> None:
    frames = random_frames(np.random.default_rng(0), 20)
    assert detection_ap(frames, frames) == {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0)}
    assert fidelity("detect", frames, frames) == {"metric": "AP@[.5:.95]", "value": pytest.approx(100.0)}


@pytest.mark.parametrize("seed", range(8))
def test_detection_ap_agrees_with_pycocotools(seed: int) -> None:
    pytest.importorskip("pycocotools", reason="pycocotools is a dev dependency")
    rng = np.random.default_rng(seed)
    reference = random_frames(rng, 25)
    predicted = perturb(rng, reference, jitter=[1.0, 3.0, 8.0][seed % 3])
    ours = detection_ap(reference, predicted)
    ap, ap50 = cocotools_ap(reference, predicted)
    assert ours["AP"] == pytest.approx(ap, abs=1e-6)
    assert ours["AP50"] == pytest.approx(ap50, abs=1e-6)
    assert ours["AP"] < 100.0


def test_detection_ap_falls_with_larger_error() -> None:
    rng = np.random.default_rng(7)
    reference = random_frames(rng, 30)
    aps = [
        detection_ap(reference, perturb(np.random.default_rng(1), reference, j))["AP"] for j in (0.5, 4, 16)
    ]
    assert aps[0] > aps[1] > aps[2]


def test_detection_ap_hand_computed() -> None:
    # One class, two ground-truth boxes. A detection shifted by 1 px horizontally on a 10x10 box has
    # IoU 90/110 = 0.818: a match at thresholds .50-.80 (7 of 10), a miss above. The second box is missed.
    reference = [{"boxes": [[0, 0, 10, 10, 1, 0], [50, 50, 60, 60, 1, 0]]}]
    predicted = [{"boxes": [[1, 0, 11, 10, 0.9, 0]]}]
    # Where matched: recall 0.5, precision 1 -> the 51 recall points 0..0.5 get precision 1.
    expected = 100 * (7 / 10) * (51 / 101)
    assert detection_ap(reference, predicted)["AP"] == pytest.approx(expected)
    assert detection_ap(reference, predicted)["AP50"] == pytest.approx(100 * 51 / 101)


def test_classes_absent_from_reference_are_not_scored() -> None:
    reference = [{"boxes": [[0, 0, 10, 10, 1, 0]]}]
    predicted = [{"boxes": [[0, 0, 10, 10, 0.9, 0], [30, 30, 40, 40, 0.95, 5]]}]
    assert detection_ap(reference, predicted)["AP"] == pytest.approx(100.0)


def test_empty_reference() -> None:
    empty = [{"boxes": []}] * 3
    assert detection_ap(empty, empty)["AP"] == 100.0
    assert detection_ap(empty, [{"boxes": []}, {"boxes": [[0, 0, 5, 5, 0.5, 1]]}, {"boxes": []}])["AP"] == 0.0


def test_frame_count_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="frames"):
        detection_ap([{"boxes": []}], [])
    with pytest.raises(ValueError, match="task"):
        fidelity("segment", [], [])


# -- pose ----------------------------------------------------------------------------------------------


def person(rng: np.random.Generator, cx: float, cy: float, scale: float = 100.0, missing: int = 3) -> dict:
    kps = [[cx + rng.uniform(-0.3, 0.3) * scale, cy + rng.uniform(-0.5, 0.5) * scale, 0.8] for _ in range(18)]
    for k in rng.choice(18, missing, replace=False):
        kps[k] = [0.0, 0.0, 0.0]
    return {"keypoints": kps, "score": float(rng.uniform(0.4, 1.0))}


def moved(p: dict, offsets: np.ndarray) -> dict:
    kps = [
        [x + dx, y + dy, s] if s > 0 else [0.0, 0.0, 0.0]
        for (x, y, s), (dx, dy) in zip(p["keypoints"], offsets, strict=True)
    ]
    return {"keypoints": kps, "score": p["score"]}


def test_pck_identical_is_100_and_order_free() -> None:
    rng = np.random.default_rng(0)
    frames = [{"persons": [person(rng, 100, 100), person(rng, 400, 120)]} for _ in range(5)]
    swapped = [{"persons": f["persons"][::-1]} for f in frames]
    assert pose_pck(frames, frames) == pytest.approx(100.0)
    assert pose_pck(frames, swapped) == pytest.approx(100.0)
    assert fidelity("pose", frames, swapped) == {"metric": "PCK@0.2", "value": pytest.approx(100.0)}


def test_pck_hand_computed() -> None:
    # Reference person: keypoints 0..3 on a 100-px-wide line -> size 100, tolerance 20 px at alpha 0.2.
    ref_kps = [[0.0, 0.0, 0.0]] * 18
    ref_kps = [[100.0, 50.0, 1.0], [200.0, 50.0, 1.0], [150.0, 60.0, 1.0], [120.0, 70.0, 1.0]] + ref_kps[4:]
    reference = [{"persons": [{"keypoints": ref_kps, "score": 1.0}]}]
    pred_kps = [list(k) for k in ref_kps]
    pred_kps[0] = [119.0, 50.0, 1.0]  # 19 px off: correct
    pred_kps[1] = [221.0, 50.0, 1.0]  # 21 px off: wrong
    pred_kps[2] = [0.0, 0.0, 0.0]  # missing: wrong
    pred_kps[5] = [10.0, 10.0, 1.0]  # not in the reference: not counted
    predicted = [{"persons": [{"keypoints": pred_kps, "score": 0.9}]}]
    assert pose_pck(reference, predicted) == pytest.approx(50.0)  # 2 of 4
    assert pose_pck(reference, predicted, alpha=0.25) == pytest.approx(75.0)
    assert pose_pck(reference, [{"persons": []}]) == 0.0


def test_pck_and_oks_fall_with_noise() -> None:
    rng = np.random.default_rng(3)
    reference = [{"persons": [person(rng, 150, 200), person(rng, 450, 220, 80)]} for _ in range(10)]
    pcks, aps = [], []
    for sigma in (1.0, 8.0, 25.0):
        noise = np.random.default_rng(5)
        predicted = [
            {"persons": [moved(p, noise.normal(0, sigma, (18, 2))) for p in f["persons"]]} for f in reference
        ]
        pcks.append(pose_pck(reference, predicted))
        aps.append(pose_oks_ap(reference, predicted)["AP"])
    assert pcks[0] == pytest.approx(100.0)
    assert pcks[0] > pcks[2] and aps[0] > aps[1] > aps[2]
    assert pose_oks_ap(reference, reference)["AP"] == pytest.approx(100.0)


def test_oks_ap_agrees_with_pycocotools() -> None:
    pytest.importorskip("pycocotools", reason="pycocotools is a dev dependency")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(11)
    reference = [
        {"persons": [person(rng, 150, 200), person(rng, 450, 220, 80)][: 1 + i % 2]} for i in range(12)
    ]
    noise = np.random.default_rng(2)
    predicted = [
        {"persons": [moved(p, noise.normal(0, 6, (18, 2))) for p in f["persons"]]} for f in reference
    ]
    predicted[0]["persons"].append(person(rng, 300, 300))  # a false positive
    anns, dets = [], []
    for i, (ref, pred) in enumerate(zip(reference, predicted, strict=True)):
        for p in ref["persons"]:
            k = np.asarray(p["keypoints"])
            vis = k[:, 2] > 0
            lo, hi = k[vis, :2].min(0), k[vis, :2].max(0)
            flat = np.concatenate([k[:, :2], np.where(vis, 2, 0)[:, None]], 1).ravel().tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "keypoints": flat,
                         "num_keypoints": int(vis.sum()), "area": float(np.prod(hi - lo)), "iscrowd": 0,
                         "bbox": [*lo.tolist(), *(hi - lo).tolist()]})  # fmt: skip
        for p in pred["persons"]:
            k = np.asarray(p["keypoints"])
            dets.append(
                {"image_id": i + 1, "category_id": 1, "keypoints": k.ravel().tolist(), "score": p["score"]}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i + 1} for i in range(len(reference))],
            "annotations": anns,
            "categories": [{"id": 1}],
        }
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "keypoints")
        ev.params.kpt_oks_sigmas = COCO18_OKS_SIGMAS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = pose_oks_ap(reference, predicted)
    assert ours["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(100 * ev.stats[1], abs=1e-6)
