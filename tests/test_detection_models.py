"""The built-in detectors: native PyTorch against onnxruntime, decoding, NMS, and real detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from skipconv_cli.models.detection import (
    box_iou,
    boxes_to_frame,
    decode_yolox,
    grid_cells,
    nms_per_class,
)
from skipconv_cli.models.nanodet import NANODET_M_SPEC, OUTPUT_NAMES
from skipconv_cli.models.registry import Letterbox, ModelSpec
from skipconv_cli.models.yolox import LIGHT_PERSON_SPEC, YOLOX_NANO_SPEC, build_yolox_nano, load_yolox_weights
from tests.conftest import read_frames

# The specs straight from their modules, so these tests do not depend on every other built-in importing.
SPECS = {spec.name: spec for spec in (YOLOX_NANO_SPEC, LIGHT_PERSON_SPEC, NANODET_M_SPEC)}
MODELS = tuple(SPECS)
PERSON_CLIP = "one-by-one-person-detection.mp4"
CAR_CLIP = "car-detection.mp4"
PERSON_FRAME = 1250  # one person, scored 0.896 by the ONNX YOLOX-nano (README)
PERSON_BOX = [341, 34, 539, 420]
CAR_FRAMES = (344, 2)  # start, count: a car entering at the bottom, the clearest car both heads label "car"


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """The shared CI machine has 2 cores; keep intra-op threads from oversubscribing it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(weights_dir: Path) -> dict[str, tuple[ModelSpec, torch.nn.Module]]:
    loaded = {}
    for name in MODELS:
        spec = SPECS[name]
        module = spec.build().eval()
        spec.load_weights(module, weights_dir / spec.weights)
        loaded[name] = (spec, module)
    return loaded


@pytest.fixture(scope="module")
def person_frame(videos_dir: Path) -> np.ndarray:
    return read_frames(videos_dir / PERSON_CLIP, 1, start=PERSON_FRAME)[0]


@pytest.fixture(scope="module")
def car_frames(videos_dir: Path) -> list[np.ndarray]:
    start, count = CAR_FRAMES
    return read_frames(videos_dir / CAR_CLIP, count, start=start)


@pytest.fixture(scope="module")
def person_detections(models, person_frame) -> dict[str, list[list[float]]]:
    """Each model's boxes on the person frame at its own input size, score >= 0.05."""
    return {name: _detect(spec, module, person_frame, 0.05) for name, (spec, module) in models.items()}


def _run(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = module(x)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _detect(
    spec: ModelSpec,
    module: torch.nn.Module,
    frame: np.ndarray,
    threshold: float,
    size: tuple[int, int] | None = None,
) -> list[list[float]]:
    x, box = spec.preprocess(frame, size or spec.input_size)
    outputs = _run(module, x)
    raw = outputs[0][0] if len(outputs) == 1 else tuple(o[0] for o in outputs)
    return spec.postprocess(raw, box, threshold)["boxes"]


def _best(boxes: list[list[float]], class_id: int) -> list[float]:
    matches = [b for b in boxes if b[5] == class_id]
    assert matches, f"no box of class {class_id} in {boxes}"
    return max(matches, key=lambda b: b[4])


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", MODELS)
def test_native_matches_onnxruntime(name, models, weights_dir, person_frame, car_frames):
    ort = pytest.importorskip("onnxruntime")
    spec, module = models[name]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3  # the NanoDet file lists its initializers as inputs: harmless warnings
    session = ort.InferenceSession(
        str(weights_dir / spec.weights), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    if name == "nanodet-m":
        assert tuple(output_names) == OUTPUT_NAMES
    for frame in (person_frame, car_frames[0]):
        x, _ = spec.preprocess(frame, spec.input_size)
        expected = session.run(None, {input_name: x.numpy()})
        actual = _run(module, x)
        assert len(actual) == len(expected)
        for out_name, a, e in zip(output_names, actual, expected, strict=True):
            assert a.shape == e.shape, out_name
            a = a.numpy()
            if name == "nanodet-m":
                np.testing.assert_allclose(a, e, rtol=0, atol=1e-4, err_msg=out_name)
            else:
                # Probabilities (objectness, classes) agree to 1e-4. The box columns are raw offsets and
                # log sizes in cell units (|x| up to ~4) computed from 0-255 inputs: float32 rounding
                # leaves up to ~5e-4 between backends (a float64 run of this module sits within 2e-4
                # of onnxruntime), i.e. under 0.02 px after decoding.
                np.testing.assert_allclose(a[..., 4:], e[..., 4:], rtol=0, atol=1e-4, err_msg="obj/cls")
                np.testing.assert_allclose(a[..., :4], e[..., :4], rtol=0, atol=1e-3, err_msg="box")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("yolox-nano", [(1, 3150, 85)]),
        ("light-person", [(1, 3150, 6)]),
        ("nanodet-m", [(1, 2400, 80), (1, 600, 80), (1, 150, 80), (1, 2400, 32), (1, 600, 32), (1, 150, 32)]),
    ],
)
def test_runs_at_other_sizes(name, expected, models):
    _, module = models[name]
    outputs = _run(module, torch.rand(1, 3, 320, 480) * 255)
    assert [tuple(o.shape) for o in outputs] == expected
    with pytest.raises(ValueError, match="multiples of 32"):
        module(torch.zeros(1, 3, 100, 100))


def test_loading_the_wrong_file_fails_loudly(weights_dir):
    with pytest.raises(ValueError, match="convs"):
        load_yolox_weights(build_yolox_nano(), weights_dir / "nanodet_m_416.onnx")


# --------------------------------------------------------------------------------------- detections


def test_person_found_by_all_three(person_detections):
    yolox_box = _best(person_detections["yolox-nano"], 0)
    assert yolox_box[4] > 0.8
    assert box_iou(yolox_box[:4], PERSON_BOX)[0, 0] > 0.7
    for name in ("nanodet-m", "light-person"):
        box = _best(person_detections[name], 0)
        assert box_iou(box[:4], yolox_box[:4])[0, 0] > 0.5, (name, box, yolox_box)


def test_non_square_input_decodes_to_the_same_person(models, person_frame, person_detections):
    """A wide input swaps nothing: the grid is rebuilt from the input size the letterbox carries."""
    at_416 = _best(person_detections["yolox-nano"], 0)
    wide = _best(_detect(*models["yolox-nano"], person_frame, 0.3, size=(256, 448)), 0)
    assert box_iou(wide[:4], at_416[:4])[0, 0] > 0.7


def test_output_format(person_frame, person_detections):
    boxes = person_detections["nanodet-m"]
    assert len(boxes) > 1
    scores = [b[4] for b in boxes]
    assert scores == sorted(scores, reverse=True)
    height, width = person_frame.shape[:2]
    for x1, y1, x2, y2, score, class_id in boxes:
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert 0.05 <= score <= 1 and isinstance(class_id, int) and 0 <= class_id < 80


@pytest.mark.parametrize("name", ["yolox-nano", "nanodet-m"])
def test_cars_detected(name, models, car_frames):
    found = [b for frame in car_frames for b in _detect(*models[name], frame, 0.25) if b[5] == 2]
    assert found, f"{name} found no car in frames {CAR_FRAMES}"


# ------------------------------------------------------------------------------- decoding and NMS


def test_nms_suppresses_overlaps_within_a_class_only():
    boxes = np.array(
        [
            [0, 0, 100, 100],  # class 0, best
            [5, 5, 105, 105],  # class 0, IoU 0.82 with the first: suppressed
            [0, 0, 100, 100],  # class 1, same place: kept (other class)
            [200, 200, 300, 300],  # class 0, far away: kept
            [10, 0, 110, 100],  # class 1, IoU 0.82 with the class-1 box: suppressed
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    classes = np.array([0, 0, 1, 0, 1])
    assert nms_per_class(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert nms_per_class(boxes, scores, classes, 0.9).tolist() == [0, 1, 2, 3, 4]
    assert nms_per_class(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError):
        nms_per_class(boxes, scores[:2], classes, 0.5)


def test_yolox_decoding_and_frame_mapping():
    size = (64, 96)  # grids 8x12, 4x6, 2x3
    cells, strides = grid_cells(size)
    assert cells.shape == (96 + 24 + 6, 2)
    assert cells[13].tolist() == [1.0, 1.0]  # row-major: index 13 of a 12-wide grid is (x=1, y=1)
    raw = torch.zeros(len(cells), 6)
    raw[:, 4] = 0.5
    raw[:, 5] = 0.8
    boxes, scores = decode_yolox(raw, size)
    assert boxes[13].tolist() == [4.0, 4.0, 12.0, 12.0]  # centre 8, size exp(0) * 8
    assert scores[0].item() == pytest.approx(0.4)
    box = Letterbox(scale=0.5, pad_x=0.0, pad_y=0.0, frame_size=(100, 150), input_size=size)
    assert boxes_to_frame(np.array([[4, 4, 12, 400]]), box).tolist() == [[8, 8, 24, 100]]
