"""skipconv: Skip-Convolutions for efficient video processing, for any PyTorch model."""

__version__ = "0.1.0"
