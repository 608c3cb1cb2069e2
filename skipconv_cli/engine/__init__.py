"""The engine: Skip-Convolutions for any PyTorch model. Knows nothing of video, models or the CLI."""

from skipconv_cli.engine.allocator import keep_freed_memory
from skipconv_cli.engine.convert import (
    convert,
    fold_batchnorms,
    fuse_activations,
    report,
    reset,
    reset_stats,
    set_backend,
    set_thresholds,
    skip_layers,
)
from skipconv_cli.engine.elementwise import FollowsSparsity, register_zero_pad
from skipconv_cli.engine.onednn import use_onednn
from skipconv_cli.engine.skip_conv import SkipConv2d

__all__ = [
    "FollowsSparsity",
    "SkipConv2d",
    "convert",
    "fold_batchnorms",
    "fuse_activations",
    "keep_freed_memory",
    "register_zero_pad",
    "report",
    "reset",
    "reset_stats",
    "set_backend",
    "set_thresholds",
    "skip_layers",
    "use_onednn",
]
