"""Pose models: native PyTorch equals the published graphs; decoding finds the people in the clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from skipconv_cli.models.hrnet import hrnet_w32
from skipconv_cli.models.openpose_mbv2 import (
    get_same_padding,
    load_tflite_weights,
    openpose_mbv2_05,
    openpose_mbv2_10,
    openpose_mbv2_14,
    pad_same,
    resize_bilinear_tf_legacy,
)
from skipconv_cli.models.pose import (
    COCO18_LIMB_PAF_CHANNELS,
    COCO18_LIMBS,
    OpenPoseParams,
    decode_openpose,
    postprocess_openpose,
    preprocess_openpose,
)
from skipconv_cli.models.registry import Letterbox, get_model_spec
from skipconv_cli.models.tflite_weights import TfliteModel, depthwise_weight_to_oihw, dequantize
from tests.conftest import read_frames

PERSON_CLIP = "one-by-one-person-detection.mp4"
BUILDERS = {"05": openpose_mbv2_05, "10": openpose_mbv2_10, "14": openpose_mbv2_14}


def _tflite(weights_dir: Path, dm: str) -> Path:
    return weights_dir / f"mobilenet_v2_pose_dm{dm}_368_432_weight_quant.tflite"


def _load(weights_dir: Path, dm: str) -> torch.nn.Module:
    model = BUILDERS[dm]().eval()
    load_tflite_weights(model, _tflite(weights_dir, dm))
    return model


@pytest.fixture(scope="module")
def person_frames(videos_dir: Path) -> list[np.ndarray]:
    """Frames 1250 (a person mid-room, box about [341, 34, 539, 420]) and 1251."""
    return read_frames(videos_dir / PERSON_CLIP, 2, start=1250)


# ---------------------------------------------------------------------------------------------- units
def test_same_padding_is_asymmetric_for_stride_2_on_even_sizes() -> None:
    assert get_same_padding(368, 3, 2) == 1  # TF puts it all at the bottom/right
    assert get_same_padding(23, 3, 2) == 2  # odd sizes pad both sides
    assert get_same_padding(46, 3, 1) == 2


def test_tf_legacy_resize_samples_at_dst_over_two() -> None:
    x = torch.tensor([[[[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]]])
    y = resize_bilinear_tf_legacy(x, (4, 6))
    # columns: src = 0, .5, 1, 1.5, 2, 2.5 (clamped to 2); rows: 0, .5, 1, 1.5 (clamped to 1)
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [0, 1, 2, 3, 4, 4])
    np.testing.assert_allclose(y[0, 0, 1].numpy(), [3, 4, 5, 6, 7, 7])
    np.testing.assert_allclose(y[0, 0, 3].numpy(), y[0, 0, 2].numpy())


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_padding_and_resize_keep_the_layout(channels_last: bool) -> None:
    # a contiguous map out of a channels_last one made every conv after it convert its input back
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 7, 10).contiguous(memory_format=layout)
    padded = pad_same(x, (3, 3), (2, 2), (1, 1))
    assert torch.equal(padded, torch.nn.functional.pad(x, [0, 1, 1, 1]))  # TF: the odd pixel bottom/right
    resized = resize_bilinear_tf_legacy(x, (13, 21))
    assert padded.is_contiguous(memory_format=layout) and resized.is_contiguous(memory_format=layout)
    # src = dst * in / out, upper neighbour clamped, row by row then column by column
    for dst, src in ((0, 0.0), (5, 5 * 7 / 13), (12, 12 * 7 / 13)):
        lo = int(src)
        hi, frac = min(lo + 1, 6), src - lo
        rows = x[:, :, lo] + (x[:, :, hi] - x[:, :, lo]) * frac
        cols = torch.arange(21) * (10 / 21)
        left = cols.floor().long()
        right = (left + 1).clamp(max=9)
        expected = rows[..., left] + (rows[..., right] - rows[..., left]) * (cols - left)
        torch.testing.assert_close(resized[:, :, dst], expected, rtol=0, atol=1e-5)


def test_dequantize_per_channel_and_depthwise_layout() -> None:
    q = np.array([[[[-2, 4]]], [[[1, 3]]]], dtype=np.int8)  # OHWI [2, 1, 1, 2]
    out = dequantize(q, np.array([0.5, 0.25], np.float32), np.array([0, 1]), axis=0)
    np.testing.assert_allclose(out[:, 0, 0, :], [[-1.0, 2.0], [0.0, 0.5]])
    dw = np.arange(18, dtype=np.float32).reshape(1, 3, 3, 2)  # 1HWC
    oihw = depthwise_weight_to_oihw(dw)
    assert oihw.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(oihw[1, 0], dw[0, :, :, 1])


def test_tflite_reader_lists_the_graph(weights_dir: Path) -> None:
    tfl = TfliteModel(_tflite(weights_dir, "05"))
    opcodes = [op.opcode for op in tfl.operators]
    assert opcodes.count("CONV_2D") + opcodes.count("DEPTHWISE_CONV_2D") == 159
    assert opcodes.count("RESIZE_BILINEAR") == 1
    resize = next(op for op in tfl.operators if op.opcode == "RESIZE_BILINEAR")
    assert resize.options == {"align_corners": False, "half_pixel_centers": False}
    assert any(t.dtype == "INT8" for t in tfl.tensors)  # the weights really are int8 in the file


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dm", ["05", "10", "14"])
def test_native_equals_onnx(dm: str, weights_dir: Path, person_frames: list[np.ndarray]) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _load(weights_dir, dm)
    x = torch.cat([preprocess_openpose(f, (368, 432))[0] for f in person_frames])
    with torch.no_grad():
        ours = model(x).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    )  # idle threads would slow later tests
    session = ort.InferenceSession(
        str(weights_dir / f"tfpose_mobilenetv2_dm{dm}_368x432_f32.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )
    ref = np.concatenate([session.run(None, {"image": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    del session
    assert ours.shape == ref.shape == (2, 57, 46, 54)
    assert np.abs(ours - ref).max() < 1e-4


def test_other_input_size() -> None:
    model = openpose_mbv2_05().eval()  # the shapes do not depend on the weights
    with torch.no_grad():
        out = model(torch.full((1, 3, 256, 320), 128.0))
    assert out.shape == (1, 57, 32, 40)


# ---------------------------------------------------------------------------------------------- decoding
def test_dm14_finds_the_person(weights_dir: Path, person_frames: list[np.ndarray]) -> None:
    spec = get_model_spec("openpose-mbv2-14")
    model = _load(weights_dir, "14")
    x, box = spec.preprocess(person_frames[0], spec.input_size)
    with torch.no_grad():
        raw = model(x)[0]
    persons = spec.postprocess(raw, box, spec.default_score_threshold)["persons"]
    assert persons, "no person found on frame 1250"
    kps = np.array(persons[0]["keypoints"])
    found = kps[kps[:, 2] > 0]
    assert len(found) >= 8
    x1, y1, x2, y2 = 341, 34, 539, 420
    mx, my = 0.15 * (x2 - x1), 0.15 * (y2 - y1)  # the box grown by 30%
    assert np.all((found[:, 0] >= x1 - mx) & (found[:, 0] <= x2 + mx))
    assert np.all((found[:, 1] >= y1 - my) & (found[:, 1] <= y2 + my))


def _synthetic_maps(people: list[np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (Gaussian blobs) and PAFs (unit vectors within 1 cell of each limb) for given skeletons."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((19, h, w), np.float32)
    paf = np.zeros((38, h, w), np.float32)
    for kps in people:
        for k, (x, y) in enumerate(kps):
            heat[k] = np.maximum(heat[k], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0))
        for (a, b), (cx, cy) in zip(COCO18_LIMBS, COCO18_LIMB_PAF_CHANNELS, strict=True):
            pa, pb = kps[a], kps[b]
            d = pb - pa
            length = np.linalg.norm(d)
            u = d / length
            t = (xx - pa[0]) * u[0] + (yy - pa[1]) * u[1]
            dist = np.abs((xx - pa[0]) * u[1] - (yy - pa[1]) * u[0])
            band = (t >= -1) & (t <= length + 1) & (dist <= 1.0)
            paf[cx][band], paf[cy][band] = u[0], u[1]
    heat[18] = np.clip(1 - heat[:18].max(axis=0), 0, 1)
    return heat, paf


def test_paf_grouping_separates_two_people() -> None:
    # One upright skeleton (grid cells of a stride-8 46 x 54 map), placed twice side by side.
    base = np.array(
        [[6, 4], [6, 8], [3, 8], [2, 13], [2, 18], [9, 8], [10, 13], [10, 18], [4, 19], [4, 27], [4, 35],
         [8, 19], [8, 27], [8, 35], [5, 3], [7, 3], [4, 4], [8, 4]],
        dtype=np.float32,
    )  # fmt: skip
    people = [base + [4, 3], base + [32, 5]]
    heat, paf = _synthetic_maps(people, (46, 54))
    persons = decode_openpose(heat, paf, (368, 432), OpenPoseParams())
    assert len(persons) == 2
    persons.sort(key=lambda p: p[0][p[0][:, 2] > 0, 0].mean())
    for (kps, score), truth in zip(persons, people, strict=True):
        assert (kps[:, 2] > 0).sum() == 18
        assert score > 0.5
        expected = (truth + 0.5) * 8 - 0.5  # cell centre in input pixels
        assert np.abs(kps[:, :2] - expected).max() <= 4.0  # within one stride-4 cell


def test_postprocess_maps_back_to_frame_and_handles_nothing() -> None:
    box = Letterbox(scale=0.5, pad_x=10.0, pad_y=20.0, frame_size=(400, 800), input_size=(256, 448))
    empty = postprocess_openpose(np.zeros((57, 46, 54), np.float32), box, 0.4)
    assert empty == {"persons": []}


# ---------------------------------------------------------------------------------------------- hrnet
def test_hrnet_w32_shape_and_size() -> None:
    model = hrnet_w32().eval()
    assert 28.4e6 < sum(p.numel() for p in model.parameters()) < 28.7e6
    spec = get_model_spec("hrnet-w32")
    x, box = spec.preprocess(np.zeros((432, 768, 3), np.uint8), spec.input_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 17, 64, 64)
    assert torch.isfinite(out).all()
    persons = spec.postprocess(out[0], box, spec.default_score_threshold)["persons"]
    assert len(persons) <= 1 and all(len(p["keypoints"]) == 18 for p in persons)
    # Deterministic random weights: two builds are identical.
    again = hrnet_w32()
    assert torch.equal(again.final_layer.weight, model.final_layer.weight)


def test_grouping_merges_two_partial_persons_after_another_person() -> None:
    """A limb joining two disjoint partial persons merges them, whatever else the list holds (regression:
    removing the merged person by equality compared numpy arrays and raised)."""
    from skipconv_cli.models.pose import group_persons

    peaks = [np.array([[10.0, 10, 0.9], [90, 90, 0.9]]), np.array([[10.0, 20, 0.9], [90, 100, 0.9]])]
    peaks += [np.array([[10.0, 30 + 10 * i, 0.9]]) for i in range(4)]
    limbs = ((0, 1), (2, 3), (1, 2), (3, 4), (4, 5))
    connections = [[(1, 1, 0.8), (0, 0, 0.8)], [(0, 0, 0.8)], [(0, 0, 0.8)], [], []]
    persons = group_persons(peaks, connections, limbs, min_parts=1)
    assert sorted(int((kps[:, 2] > 0).sum()) for kps, _ in persons) == [2, 4]
