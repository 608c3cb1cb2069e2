"""Gates files: Gumbel gate parameters learned by ``skipconv train-gates``, applied by ``run --gates``.

A gates file is ``torch.save`` of a plain dict (loadable with ``weights_only=True``): the learned tensors
(``<layer>.gate.weight`` / ``<layer>.gate.bias``; with ``--finetune`` also the converted layers' own
weights) under ``"state_dict"``, and metadata: for which model, weights and block size they hold, how they
were trained and what they measured on held-out frames.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from skipconv_cli.errors import SkipconvError
from skipconv_cli.pipeline.calibration import check_same_model

FORMAT = "skipconv-gates/1"


@dataclass
class GatesFile:
    """Learned Gumbel gates and the facts needed to refuse them for the wrong model."""

    model: str
    weights_sha256: str | None
    block: int
    state_dict: dict[str, torch.Tensor]
    training: dict = field(default_factory=dict)  # beta, clip_len, steps, lr, videos + frame ranges, size
    measured: dict = field(default_factory=dict)  # reduction, fidelity, distillation error on held-out frames
    format: str = FORMAT

    def save(self, path: Path) -> None:
        """Writes through a temp file and a rename, so an interrupted save never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = asdict(self)
        data["state_dict"] = {k: v.detach().cpu().clone() for k, v in self.state_dict.items()}
        torch.save(data, tmp)
        os.replace(tmp, path)

    def check_matches(self, model: str, weights_sha256: str | None, block: int) -> None:
        """Refuses gates trained for another model, other weights or another block size."""
        check_same_model(
            "gates file", (self.model, self.weights_sha256), (model, weights_sha256), "train gates"
        )
        if self.block != block:
            raise SkipconvError(
                f"gates were trained with block {self.block}, not {block}: pass --block {self.block}"
            )

    def apply(self, model: nn.Module) -> None:
        """Copies the learned tensors into a model converted with ``gate="gumbel"``."""
        own = model.state_dict()
        unknown = sorted(set(self.state_dict) - set(own))
        if unknown:
            raise SkipconvError(
                f"gates file names parameters the converted model does not have: {', '.join(unknown[:3])} "
                "(was the model converted with --gate gumbel?)"
            )
        for name, value in self.state_dict.items():
            if own[name].shape != value.shape:
                raise SkipconvError(
                    f"gates file has {name} of shape {tuple(value.shape)}, the model {tuple(own[name].shape)}"
                )
        with torch.no_grad():
            for name, value in self.state_dict.items():
                own[name].copy_(value)


def gate_state_dict(model: nn.Module, include_backbone: bool = False) -> dict[str, torch.Tensor]:
    """The tensors a gates file keeps: the gates, and with ``include_backbone`` every parameter."""
    return {
        name: value.detach().cpu().clone()
        for name, value in model.state_dict().items()
        if include_backbone or ".gate." in name or name.startswith("gate.")
    }


def load_gates(path: Path) -> GatesFile:
    path = Path(path)
    if not path.is_file():
        raise SkipconvError(f"gates file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds: all mean "not a gates file"
        raise SkipconvError(f"{path} is not a readable gates file: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SkipconvError(f"{path} is not a skipconv gates file (format {FORMAT!r} expected)")
    try:
        gates = GatesFile(**data)
    except TypeError as e:
        raise SkipconvError(f"gates file {path} has unexpected fields: {e}") from e
    if not isinstance(gates.state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in gates.state_dict.values()
    ):
        raise SkipconvError(f"gates file {path} holds no tensors under 'state_dict'")
    if gates.block not in (1, 2, 4, 8):
        raise SkipconvError(f"gates file {path} has an invalid block size {gates.block!r}")
    return gates


def shipped_gates(model: str) -> Path | None:
    """The gates trained for a built-in model and shipped in the repo's ``weights/gates/``, if any."""
    from skipconv_cli.assets import manifest_dir

    path = manifest_dir() / "weights" / "gates" / f"{model}.gates.pt"
    return path if path.is_file() else None
