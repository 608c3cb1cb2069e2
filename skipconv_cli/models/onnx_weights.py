"""Read the weights of a published ONNX file and copy them into a native PyTorch module.

The published detectors come as ONNX graphs exported from PyTorch with BatchNorm folded into the
convolutions, and most of their initializers have lost their names (``"1178"``). What survives is the
order: an exported graph lists its nodes in the order the original ``forward`` ran them. So the loader
pairs the graph's ``Conv`` nodes, in topological order, with the module's ``nn.Conv2d`` layers in the order
a forward pass calls them, and checks every pair (shapes, stride, padding, dilation, groups) so that a
wrong architecture fails loudly instead of loading silently shifted weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skipconv_cli.errors import SkipconvError


@dataclass(frozen=True)
class OnnxConv:
    """One ``Conv`` node of an ONNX graph with its constant weight and bias.

    ``pads`` is ONNX's ``[top, left, bottom, right]``; ``bias`` is None when the node has none.
    """

    node_name: str
    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    group: int


def _load_model(path: Path):  # -> onnx.ModelProto (onnx is imported lazily: it is slow to import)
    import onnx

    path = Path(path)
    if not path.is_file():
        raise SkipconvError(f"weights file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError, ... depending on how the file is broken
        raise SkipconvError(f"{path} is not a readable ONNX file: {e}") from e


def read_onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    """All initializers (constant tensors) of an ONNX file, as ``name -> numpy array``."""
    from onnx import numpy_helper

    graph = _load_model(path).graph
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _topological_nodes(graph) -> list:
    """Graph nodes in a topological order that keeps the file's order wherever it is already valid.

    The ONNX spec requires sorted nodes, and exporters write them in execution order; the stable sort
    only guards against hand-edited files.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        for index, node in enumerate(pending):
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                del pending[index]
                break
        else:
            raise ValueError(f"ONNX graph has a cycle or a missing input near node {pending[0].name!r}")
    return ordered


def read_onnx_convs(path: Path) -> list[OnnxConv]:
    """The ``Conv`` nodes of an ONNX file in topological (= export, = execution) order."""
    import onnx
    from onnx import numpy_helper

    graph = _load_model(path).graph
    inits = {init.name: init for init in graph.initializer}
    convs = []
    for node in _topological_nodes(graph):
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.input[1] not in inits:
            raise ValueError(f"Conv node {node.name!r}: weight {node.input[1]!r} is not a constant")
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is not None and bias_name not in inits:
            raise ValueError(f"Conv node {node.name!r}: bias {bias_name!r} is not a constant")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"Conv node {node.name!r}: auto_pad={attrs['auto_pad']!r} is not supported")
        weight = numpy_helper.to_array(inits[node.input[1]])
        if weight.ndim != 4:
            raise ValueError(f"Conv node {node.name!r}: only 2-D convolutions are supported")
        convs.append(
            OnnxConv(
                node_name=node.name or node.output[0],
                weight=weight,
                bias=numpy_helper.to_array(inits[bias_name]) if bias_name else None,
                strides=tuple(attrs.get("strides", (1, 1))),
                pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
                dilations=tuple(attrs.get("dilations", (1, 1))),
                group=int(attrs.get("group", 1)),
            )
        )
    return convs


def conv_execution_order(module: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Conv2d]]:
    """The module's ``nn.Conv2d`` layers in the order one forward pass on ``example_input`` calls them.

    A layer called more than once (weight sharing) is listed at its first call only.
    """
    names = {m: name for name, m in module.named_modules()}
    order: list[tuple[str, nn.Conv2d]] = []
    seen: set[int] = set()

    def record(conv: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        if id(conv) not in seen:
            seen.add(id(conv))
            order.append((names[conv], conv))

    handles = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _check_pair(name: str, conv: nn.Conv2d, onnx_conv: OnnxConv, check_attributes: bool) -> None:
    where = f"module conv {name!r} vs ONNX node {onnx_conv.node_name!r}"
    if tuple(conv.weight.shape) != onnx_conv.weight.shape:
        raise ValueError(f"{where}: weight shape {tuple(conv.weight.shape)} != {onnx_conv.weight.shape}")
    if onnx_conv.bias is not None and conv.bias is None:
        raise ValueError(f"{where}: the ONNX conv has a bias, the module conv has none")
    if not check_attributes:
        return
    top, left, bottom, right = onnx_conv.pads
    if (top, left) != (bottom, right):
        raise ValueError(f"{where}: asymmetric ONNX pads {onnx_conv.pads} cannot map onto nn.Conv2d")
    expected = {
        "stride": onnx_conv.strides,
        "padding": (top, left),
        "dilation": onnx_conv.dilations,
        "groups": onnx_conv.group,
    }
    actual = {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
    }
    for key, value in expected.items():
        if tuple(np.atleast_1d(actual[key])) != tuple(np.atleast_1d(value)):
            raise ValueError(f"{where}: {key} {actual[key]} != {value}")


def load_convs_in_order(
    module: nn.Module,
    convs: Sequence[OnnxConv],
    example_input: torch.Tensor,
    check_attributes: bool = True,
) -> list[str]:
    """Copy ONNX conv weights into ``module``'s convs, pairing both in execution order.

    Args:
        module: the native architecture; every parameter it has must be a conv weight or bias.
        convs: from :func:`read_onnx_convs`.
        example_input: any input the module accepts (only the call order is used).
        check_attributes: also compare stride, padding, dilation and groups (turn off for graphs whose
            padding lives in separate ``Pad`` nodes).

    Returns:
        The module's conv names in the order they were loaded.

    Raises:
        ValueError: the counts differ or any pair disagrees; nothing is half-loaded in that case.
    """
    order = conv_execution_order(module, example_input)
    if len(order) != len(convs):
        raise ValueError(f"the module runs {len(order)} convs, the ONNX graph has {len(convs)}")
    for (name, conv), onnx_conv in zip(order, convs, strict=True):
        _check_pair(name, conv, onnx_conv, check_attributes)
    loaded = {id(p) for _, conv in order for p in conv.parameters()}
    left_out = [name for name, p in module.named_parameters() if id(p) not in loaded]
    if left_out:
        raise ValueError(f"parameters outside the executed convs would stay random: {left_out[:5]}")
    with torch.no_grad():
        for (_, conv), onnx_conv in zip(order, convs, strict=True):
            conv.weight.copy_(torch.from_numpy(np.array(onnx_conv.weight)))
            if conv.bias is not None:
                if onnx_conv.bias is None:
                    conv.bias.zero_()
                else:
                    conv.bias.copy_(torch.from_numpy(np.array(onnx_conv.bias)))
    return [name for name, _ in order]
