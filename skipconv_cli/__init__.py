"""skipconv: Skip-Convolutions for efficient video processing, for any PyTorch model."""

from skipconv_cli.engine import (
    SkipConv2d,
    convert,
    report,
    reset,
    reset_stats,
    set_backend,
    set_thresholds,
)

__version__ = "0.1.0"
__all__ = ["SkipConv2d", "convert", "report", "reset", "reset_stats", "set_backend", "set_thresholds"]
