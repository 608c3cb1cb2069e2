"""Turning any PyTorch model into a Skip-Conv model, and the stream-level controls around it."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from skipconv_cli.engine.gates import check_gate_args
from skipconv_cli.engine.skip_conv import SkipConv2d, fold_batchnorm

DEFAULT_THRESHOLD = 0.3
Thresholds = float | Mapping[str, float]


def convert(
    model: nn.Module,
    gate: str = "output-norm",
    threshold: Thresholds = DEFAULT_THRESHOLD,
    block: int = 1,
    reset_every: int | None = None,
    *,
    reference: str = "pending",
    backend: str = "reference",
) -> nn.Module:
    """Returns a copy of ``model`` in which every ``nn.Conv2d`` is a :class:`SkipConv2d`.

    A ``nn.BatchNorm2d`` in eval mode that directly follows a conv (its only consumer) is folded into the
    conv and replaced by ``nn.Identity``. The caller's model is left untouched.

    Args:
        model: any module containing at least one ``nn.Conv2d``.
        gate: ``"output-norm"``, ``"input-norm"`` or ``"gumbel"``.
        threshold: one scale-free threshold for every layer, or a mapping from layer name (as in
            ``model.named_modules()``) to threshold; layers the mapping does not name get 0.3.
        block: 1, 2, 4 or 8: structured gates over ``block x block`` output tiles.
        reset_every: recompute densely every this many frames (None: never after the first).
        reference: ``"pending"`` (exact, no drift) or ``"previous"`` (the paper's lossy reference).
        backend: ``"reference"`` (dense residual update, supports training) or ``"sparse"`` (recomputes
            only the tiles that can change, with a measured per-layer dense fallback; inference under
            ``torch.no_grad()``/``torch.inference_mode()``; see ``SkipConv2d``).

    Examples:
        >>> fast = convert(my_model.eval(), gate="output-norm", threshold=0.5, block=4)
        >>> for frame in frames: out = fast(frame)
        >>> report(fast)["macs"]["reduction"]
    """
    default = threshold if not isinstance(threshold, Mapping) else DEFAULT_THRESHOLD
    check_gate_args(gate, default, block)
    model = copy.deepcopy(model)
    convs = [(name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to convert")
    per_layer = _per_layer_thresholds(threshold, [name for name, _ in convs], default)
    folds = _batchnorms_to_fold(model)
    for name, conv in convs:
        bn_name = folds.get(name)
        bn = model.get_submodule(bn_name) if bn_name else None
        layer = SkipConv2d.from_conv(
            conv, bn, gate=gate, threshold=per_layer[name], block=block, reset_every=reset_every,
            reference=reference, backend=backend,
        )  # fmt: skip
        layer.train(conv.training)
        _set_submodule(model, name, layer)
        if bn_name:
            _set_submodule(model, bn_name, nn.Identity())
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):  # nn.ReLU(inplace=True) and the like
            module.inplace = False  # (the sparse backend's layers hand out their state: see hand_out)
    model.register_forward_hook(_copy_state_outputs)
    return model


def _copy_state_outputs(module: nn.Module, args: tuple, output: object) -> object:
    """A Skip-Conv layer hands out its state as its output (valid until its next frame); where such a
    tensor is the model's own output, the caller gets a copy it may keep across frames."""
    if isinstance(output, torch.Tensor):
        return output.clone() if getattr(output, "skipconv_state", False) else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple
        return type(output)(*(_copy_state_outputs(module, args, item) for item in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_copy_state_outputs(module, args, item) for item in output)
    if isinstance(output, dict):
        return {key: _copy_state_outputs(module, args, value) for key, value in output.items()}
    return output


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode ``BatchNorm2d`` that directly follows a conv folded into
    that conv (replaced by ``nn.Identity``), the convs staying plain ``nn.Conv2d``.

    The fair dense baseline: an optimised dense deployment folds BatchNorm too, and ``convert`` does.
    """
    model = copy.deepcopy(model)
    for conv_name, bn_name in _batchnorms_to_fold(model).items():
        conv = model.get_submodule(conv_name)
        bias = conv.bias.detach() if conv.bias is not None else None
        weight, bias = fold_batchnorm(conv.weight.detach(), bias, model.get_submodule(bn_name))
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        _set_submodule(model, bn_name, nn.Identity())
    return model


def skip_layers(model: nn.Module) -> list[tuple[str, SkipConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SkipConv2d)]


def _require_skip_layers(model: nn.Module) -> list[tuple[str, SkipConv2d]]:
    layers = skip_layers(model)
    if not layers:
        raise ValueError("the model has no Skip-Conv layer: call skipconv_cli.convert(model) first")
    return layers


def reset(model: nn.Module) -> None:
    """Drops all stream state: the next frame is computed densely in every layer."""
    for _, layer in _require_skip_layers(model):
        layer.reset()


def reset_stats(model: nn.Module) -> None:
    """Starts MAC accounting afresh (the stream state is kept)."""
    for _, layer in _require_skip_layers(model):
        layer.reset_stats()


def set_thresholds(model: nn.Module, threshold: Thresholds) -> None:
    """Changes the thresholds of a converted model in place (one float or a per-layer mapping)."""
    layers = _require_skip_layers(model)
    default = threshold if not isinstance(threshold, Mapping) else DEFAULT_THRESHOLD
    per_layer = _per_layer_thresholds(threshold, [name for name, _ in layers], default)
    for name, layer in layers:
        check_gate_args(layer.gate_type, per_layer[name], layer.block)
        layer.threshold = float(per_layer[name])


def set_backend(model: nn.Module, name: str) -> None:
    """Switches every Skip-Conv layer to the ``"reference"`` or ``"sparse"`` backend; the stream state
    is dropped, so the next frame is dense."""
    for _, layer in _require_skip_layers(model):
        layer.backend = name


def report(model: nn.Module) -> dict:
    """MAC accounting since the last ``reset_stats``: totals and one entry per Skip-Conv layer.

    ``macs_executed`` counts the outputs really computed (the footprint of the updated inputs) plus the
    gates' own cost; ``reduction`` is dense / executed.
    """
    layers = []
    frames = 0
    for name, layer in _require_skip_layers(model):
        frames = max(frames, layer.frames_seen)
        layers.append({"name": name, **layer.layer_stats()})
    dense = sum(entry["macs_dense"] for entry in layers)
    executed = sum(entry["macs_executed"] for entry in layers)
    return {
        "frames": frames,
        "macs": {"dense": dense, "executed": executed, "reduction": dense / executed if executed else 1.0},
        "layers": layers,
    }


def _per_layer_thresholds(threshold: Thresholds, names: list[str], default: float) -> dict[str, float]:
    if not isinstance(threshold, Mapping):
        return dict.fromkeys(names, float(threshold))
    unknown = sorted(set(threshold) - set(names))
    if unknown:
        raise ValueError(f"thresholds name layers the model does not have: {', '.join(unknown[:5])}")
    for value in threshold.values():
        check_gate_args("output-norm", value, 1)
    return {name: float(threshold.get(name, default)) for name in names}


def _batchnorms_to_fold(model: nn.Module) -> dict[str, str]:
    """Maps conv name -> name of the eval-mode BatchNorm2d that consumes only that conv's output."""
    pairs = _traced_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    return {
        conv: bn
        for conv, bn in pairs.items()
        if not model.get_submodule(bn).training and model.get_submodule(bn).track_running_stats
    }


def _traced_pairs(model: nn.Module) -> dict[str, str] | None:
    """Conv -> BN pairs from a symbolic trace; None when the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow etc.: fall back to nn.Sequential adjacency
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv2d:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        called_once = calls[user.target] == 1 and calls[node.target] == 1
        if isinstance(modules.get(user.target), nn.BatchNorm2d) and called_once:
            pairs[node.target] = user.target
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children[:-1], children[1:], strict=True):
            if type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d):
                dot = f"{prefix}." if prefix else ""
                pairs[dot + name_a] = dot + name_b
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
