"""Read the tensors of a ``.tflite`` file and hand them over as float32 NumPy arrays in PyTorch layout.

Why this exists: the published pose models are TFLite flatbuffers with "weight-only" quantisation (int8
weights, float activations). PyTorch cannot read them, and the project must not depend on TensorFlow, so
this module walks the flatbuffer with the ``tflite`` bindings, lists the operators in execution order, and
dequantizes each weight exactly as TFLite's ``DEQUANTIZE`` does: ``(q - zero_point) * scale`` with the
file's per-channel (or per-tensor) scales.

Layouts: TFLite ``CONV_2D`` weights are OHWI and ``DEPTHWISE_CONV_2D`` weights are 1HW(C*m); PyTorch wants
OIHW with ``in_channels / groups`` as I. :func:`conv_weight_to_oihw` and :func:`depthwise_weight_to_oihw`
do the conversions; :meth:`TfliteModel.conv_layers` returns every convolution ready for ``nn.Conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tflite
from tflite.utils import BUILTIN_OPCODE2NAME

from skipconv_cli.errors import SkipconvError

_NUMPY_TYPES: dict[int, np.dtype] = {
    tflite.TensorType.FLOAT32: np.dtype("<f4"),
    tflite.TensorType.FLOAT16: np.dtype("<f2"),
    tflite.TensorType.INT32: np.dtype("<i4"),
    tflite.TensorType.INT64: np.dtype("<i8"),
    tflite.TensorType.INT8: np.dtype("i1"),
    tflite.TensorType.UINT8: np.dtype("u1"),
    tflite.TensorType.INT16: np.dtype("<i2"),
}
_TYPE_NAMES: dict[int, str] = {
    value: name for name, value in vars(tflite.TensorType).items() if not name.startswith("_")
}
_ACTIVATIONS: dict[int, str] = {
    value: name for name, value in vars(tflite.ActivationFunctionType).items() if not name.startswith("_")
}
_PADDINGS: dict[int, str] = {
    value: name for name, value in vars(tflite.Padding).items() if not name.startswith("_")
}


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of the graph: its shape (TFLite layout), type, data buffer and quantisation."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite type name, e.g. "FLOAT32", "INT8"
    buffer: int
    scales: np.ndarray | None  # float32 [1] (per tensor) or [C] (per channel); None when not quantised
    zero_points: np.ndarray | None
    quantized_dimension: int


@dataclass(frozen=True)
class TfliteOperator:
    """One operator in execution order; ``options`` holds what PyTorch needs (stride, padding, ...)."""

    index: int
    opcode: str  # builtin name, e.g. "CONV_2D"
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, object]


@dataclass(frozen=True)
class ConvWeights:
    """A convolution from the file, converted for ``nn.Conv2d``.

    ``weight`` is OIHW float32 (``[out, in / groups, kH, kW]``); ``padding`` is TFLite's ``"SAME"`` or
    ``"VALID"``; ``activation`` is the fused activation (``"NONE"``, ``"RELU"``, ``"RELU6"``).
    """

    name: str
    depthwise: bool
    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: str
    activation: str


def conv_weight_to_oihw(weight: np.ndarray) -> np.ndarray:
    """TFLite ``CONV_2D`` weight OHWI -> PyTorch OIHW."""
    if weight.ndim != 4:
        raise ValueError(f"conv weight must be 4-D OHWI, got shape {weight.shape}")
    return np.ascontiguousarray(weight.transpose(0, 3, 1, 2))


def depthwise_weight_to_oihw(weight: np.ndarray) -> np.ndarray:
    """TFLite ``DEPTHWISE_CONV_2D`` weight 1HW(C*m) -> PyTorch OIHW ``[C*m, 1, H, W]`` (groups = C).

    TFLite orders the last axis as ``c * m + k`` (input channel c, multiplier k), which is also PyTorch's
    order of the output channels of a grouped conv, so a transpose is all it takes.
    """
    if weight.ndim != 4 or weight.shape[0] != 1:
        raise ValueError(f"depthwise weight must be 4-D 1HWC, got shape {weight.shape}")
    return np.ascontiguousarray(weight.transpose(3, 0, 1, 2))


def dequantize(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, per channel along ``axis`` when there are several scales."""
    q = values.astype(np.float32)
    if scales.size == 1:
        return (q - np.float32(zero_points.reshape(-1)[0])) * np.float32(scales.reshape(-1)[0])
    if scales.size != values.shape[axis]:
        raise ValueError(f"{scales.size} scales for axis {axis} of a tensor of shape {values.shape}")
    shape = [1] * values.ndim
    shape[axis] = -1
    zp = zero_points.astype(np.float32).reshape(shape) if zero_points.size > 1 else np.float32(zero_points[0])
    return (q - zp) * scales.astype(np.float32).reshape(shape)


class TfliteModel:
    """A parsed ``.tflite`` file: tensors, operators (execution order) and float32 weight access.

    Args:
        path: the ``.tflite`` file.

    Raises:
        SkipconvError: the file is missing or not a TFLite flatbuffer with one subgraph.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._buf = self.path.read_bytes()
        except OSError as e:
            raise SkipconvError(f"cannot read TFLite file {self.path}: {e}") from e
        if len(self._buf) < 8 or self._buf[4:8] != b"TFL3":
            raise SkipconvError(f"{self.path} is not a TFLite file (no TFL3 identifier)")
        self._model = tflite.Model.GetRootAsModel(self._buf, 0)
        if self._model.SubgraphsLength() < 1:
            raise SkipconvError(f"{self.path} has no subgraph")
        self._graph = self._model.Subgraphs(0)
        self.tensors: list[TfliteTensor] = [self._read_tensor(i) for i in range(self._graph.TensorsLength())]
        self.operators: list[TfliteOperator] = [
            self._read_operator(i) for i in range(self._graph.OperatorsLength())
        ]
        self._producer = {t: op for op in self.operators for t in op.outputs}

    # ------------------------------------------------------------------ parsing
    def _read_tensor(self, index: int) -> TfliteTensor:
        t = self._graph.Tensors(index)
        q = t.Quantization()
        scales = zero_points = None
        axis = 0
        if q is not None and q.ScaleLength() > 0:
            scales = q.ScaleAsNumpy().astype(np.float32)
            zero_points = (
                q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(1, np.int64)
            )
            axis = q.QuantizedDimension()
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return TfliteTensor(
            index=index,
            name=t.Name().decode(),
            shape=shape,
            dtype=_TYPE_NAMES.get(t.Type(), str(t.Type())),
            buffer=t.Buffer(),
            scales=scales,
            zero_points=zero_points,
            quantized_dimension=axis,
        )

    def _read_operator(self, index: int) -> TfliteOperator:
        op = self._graph.Operators(index)
        code = self._model.OperatorCodes(op.OpcodeIndex())
        # Files from before 2.4 only fill the deprecated int8 field; newer ones fill both.
        opcode = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = BUILTIN_OPCODE2NAME.get(opcode, f"OPCODE_{opcode}")
        inputs = tuple(int(op.Inputs(j)) for j in range(op.InputsLength()))
        outputs = tuple(int(op.Outputs(j)) for j in range(op.OutputsLength()))
        return TfliteOperator(index, name, inputs, outputs, self._read_options(op, name))

    @staticmethod
    def _read_options(op: tflite.Operator, opcode: str) -> dict[str, object]:
        table = op.BuiltinOptions()
        if table is None:
            return {}
        if opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            opt = tflite.Conv2DOptions() if opcode == "CONV_2D" else tflite.DepthwiseConv2DOptions()
            opt.Init(table.Bytes, table.Pos)
            out: dict[str, object] = {
                "padding": _PADDINGS.get(opt.Padding(), str(opt.Padding())),
                "stride": (opt.StrideH(), opt.StrideW()),
                "dilation": (opt.DilationHFactor() or 1, opt.DilationWFactor() or 1),
                "activation": _ACTIVATIONS.get(opt.FusedActivationFunction(), "?"),
            }
            if opcode == "DEPTHWISE_CONV_2D":
                out["depth_multiplier"] = opt.DepthMultiplier()
            return out
        if opcode == "ADD":
            opt = tflite.AddOptions()
            opt.Init(table.Bytes, table.Pos)
            return {"activation": _ACTIVATIONS.get(opt.FusedActivationFunction(), "?")}
        if opcode == "CONCATENATION":
            opt = tflite.ConcatenationOptions()
            opt.Init(table.Bytes, table.Pos)
            return {"axis": opt.Axis(), "activation": _ACTIVATIONS.get(opt.FusedActivationFunction(), "?")}
        if opcode == "RESIZE_BILINEAR":
            opt = tflite.ResizeBilinearOptions()
            opt.Init(table.Bytes, table.Pos)
            return {
                "align_corners": bool(opt.AlignCorners()),
                "half_pixel_centers": bool(opt.HalfPixelCenters()),
            }
        return {}

    # ------------------------------------------------------------------ data access
    def raw_array(self, index: int) -> np.ndarray | None:
        """Stored data of tensor ``index``, own type, TFLite layout (None: computed at run time)."""
        t = self.tensors[index]
        buf = self._model.Buffers(t.buffer)
        if buf is None:
            return None
        if buf.Offset() > 1:  # files over 2 GB keep data outside the flatbuffer
            start, size = int(buf.Offset()), int(buf.Size())
            data = np.frombuffer(self._buf, dtype=np.uint8, count=size, offset=start)
        elif buf.DataLength() == 0:
            return None
        else:
            data = buf.DataAsNumpy()
        dtype = _NUMPY_TYPES.get(self._graph.Tensors(index).Type())
        if dtype is None:
            raise SkipconvError(f"{self.path}: tensor {t.name!r} has unsupported type {t.dtype}")
        return np.frombuffer(data.tobytes(), dtype=dtype).reshape(t.shape).copy()

    def float_array(self, index: int) -> np.ndarray:
        """Tensor ``index`` as float32 in TFLite layout, dequantized; follows a ``DEQUANTIZE`` to its input.

        Raises:
            SkipconvError: the tensor has no constant data (it is an activation).
        """
        producer = self._producer.get(index)
        if producer is not None and producer.opcode == "DEQUANTIZE":
            return self.float_array(producer.inputs[0])
        t = self.tensors[index]
        data = self.raw_array(index)
        if data is None:
            raise SkipconvError(f"{self.path}: tensor {t.name!r} holds no constant data")
        if t.dtype in ("FLOAT32", "FLOAT16"):
            return data.astype(np.float32)
        if t.scales is None or t.zero_points is None:
            raise SkipconvError(f"{self.path}: integer tensor {t.name!r} has no quantisation parameters")
        return dequantize(data, t.scales, t.zero_points, t.quantized_dimension)

    def weight_tensor(self, index: int) -> TfliteTensor:
        """The stored tensor behind ``index`` (through a ``DEQUANTIZE``): its name and quantisation."""
        producer = self._producer.get(index)
        if producer is not None and producer.opcode == "DEQUANTIZE":
            return self.weight_tensor(producer.inputs[0])
        return self.tensors[index]

    def conv_layers(self) -> list[ConvWeights]:
        """Every ``CONV_2D`` / ``DEPTHWISE_CONV_2D`` in execution order, weights in PyTorch OIHW float32."""
        layers = []
        for op in self.operators:
            if op.opcode not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                continue
            depthwise = op.opcode == "DEPTHWISE_CONV_2D"
            w = self.float_array(op.inputs[1])
            weight = depthwise_weight_to_oihw(w) if depthwise else conv_weight_to_oihw(w)
            has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
            bias = self.float_array(op.inputs[2]) if has_bias else None
            layers.append(
                ConvWeights(
                    name=self.weight_tensor(op.inputs[1]).name,
                    depthwise=depthwise,
                    weight=weight,
                    bias=bias,
                    stride=op.options["stride"],  # type: ignore[arg-type]
                    dilation=op.options["dilation"],  # type: ignore[arg-type]
                    padding=str(op.options["padding"]),
                    activation=str(op.options["activation"]),
                )
            )
        return layers

    def summary(self) -> list[str]:
        """One line per operator: ``index opcode inputs -> outputs`` with tensor names and shapes."""

        def describe(i: int) -> str:
            if i < 0:
                return "-"
            t = self.tensors[i]
            return f"{t.name}{list(t.shape)}:{t.dtype}"

        return [
            f"{op.index} {op.opcode} {', '.join(map(describe, op.inputs))} -> "
            f"{', '.join(map(describe, op.outputs))} {op.options or ''}"
            for op in self.operators
        ]
